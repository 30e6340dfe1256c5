"""Byte-level language modelling on the Wikipedia XML sample, enwik8-style: dense, strided
and fixed Sparse Transformers (Child et al. 2019, section 7.2) at the same size and step
budget, scored in held-out bits per byte.

Launch one attention kind (the three share every other setting):

    python -m experiments.enwik_sparse --workdir workdirs/enwik_fixed \
        --config.model.attention=fixed
    python -m experiments.enwik_sparse --workdir workdirs/enwik_strided \
        --config.model.attention=strided
    python -m experiments.enwik_sparse --workdir workdirs/enwik_dense \
        --config.model.attention=dense

Smoke (seconds): ``--config=experiments/enwik_sparse.py:smoke``.

Data: ``common.data.wikipedia`` (tfds ``wikipedia_xml_sample``): the raw bytes of 206
articles (XML + wiki markup) split 90 / 5 / 5 % by whole articles; the vocabulary is the
256 byte values. Training windows are packed from the train bytes
(``common.data.packing``); validation / test bytes are scored with sliding windows (each
scored byte sees at least ``seq_len - eval.stride`` bytes of context) and reported as
``bits_per_byte = sum(nats) / ln 2 / bytes``. The run prints ``bits_per_byte=<test value>``
and ``ms_per_step=<median train step time>`` (from ``metrics.jsonl``, compilation and
evaluation excluded) and writes ``results.json``. Starting again on the same workdir resumes
from the last checkpoint (``common.training``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import sharding as sharding_lib
from common import training
from common.data import wikipedia
from common.data.packing import PackedWindows, eval_windows
from common.losses import cross_entropy
from nlp import sparse_transformer as st

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        data_dir="",  # tfds data dir; "" = tfds's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
        seq_len=512,  # bytes per training window (= max_len of the model)
    )
    c.model = dict(
        preset="sparse-transformer-enwik8",  # architecture; the fields below override sizes
        attention="fixed",  # "dense" | "strided" | "fixed": the comparison of this experiment
        mode="merged",  # "interleaved" | "merged" | "multihead" (the paper's enwik8: merged)
        num_layers=4,
        num_heads=4,
        d_model=128,
        d_ff=512,
        stride=32,  # l ~ sqrt(seq_len) (the paper: 128 for 12,288 bytes)
        c=8,  # fixed pattern: c / l = 1 / 4 as the paper's 32 / 128
        dropout=0.0,
        remat_policy="",  # "" = none; else a jax.checkpoint_policies name
        dtype="float32",
    )
    c.optim = dict(
        lr=2e-3,
        schedule="cosine",
        warmup_steps=40,
        total_steps=-1,
        min_lr_ratio=0.05,
        b1=0.9,
        b2=0.99,
        eps=1e-8,
        weight_decay=0.01,
        grad_clip=1.0,
    )
    c.train = dict(
        steps=400,  # about 5 minutes per attention kind on 2 shared CPU cores
        batch_size=4,
        accum_steps=1,
        log_every=20,
        eval_every=200,
        checkpoint_every=100,
        keep_checkpoints=2,
        async_checkpoint=True,
        report_mfu=False,
    )
    c.eval = dict(
        batch_size=32,
        max_bytes=20_000,  # validation bytes scored during training
        test_max_bytes=0,  # bytes of the final validation / test scores; 0 = all
        stride=0,  # sliding windows every `stride` bytes; 0 = seq_len // 2
    )
    c.mesh = dict(data=-1, fsdp=1, rules=[list(r) for r in sharding_lib.DEFAULT_RULES])
    if variant == "smoke":  # seconds: plumbing only
        c.data.seq_len = 64
        c.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64, stride=8, c=2)
        c.optim.warmup_steps = 5
        c.train.update(steps=20, batch_size=8, log_every=5, eval_every=10, checkpoint_every=10)
        c.eval.update(max_bytes=2_000, test_max_bytes=4_000)
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
    return c


def build_model(config) -> st.SparseTransformer:
    """The Sparse Transformer of ``config.model``; errors name the field before compiling."""
    m = dict(config.model)
    preset = m.pop("preset")
    dtype = m.pop("dtype")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    m["remat_policy"] = m["remat_policy"] or None
    return st.from_preset(
        preset, **m, vocab_size=256, max_len=config.data.seq_len, dtype=DTYPES[dtype]
    )


def make_evaluator(model: st.SparseTransformer, mesh, batch_size: int, stride: int):
    """``evaluate(params, data, max_bytes) -> (nats, bytes predicted)`` over a byte stream."""

    @jax.jit
    def eval_step(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return cross_entropy(logits, batch["targets"], batch["weights"])

    rows = sharding_lib.process_batch_slice(batch_size)

    def evaluate(params, data, max_bytes=None):
        nats, count = 0.0, 0.0
        for batch in eval_windows(data, model.max_len, batch_size, max_bytes or None, stride):
            batch = sharding_lib.put_batch({k: v[rows] for k, v in batch.items()}, mesh)
            s, c = eval_step(params, batch)
            nats, count = nats + float(s), count + float(c)
        return nats, int(count)

    return evaluate


def bits_per_byte(nats: float, n: int) -> float:
    return nats / math.log(2) / n


def median_step_ms(workdir: str) -> float | None:
    """Median ``step_time_s`` of the logged train steps in ``metrics.jsonl``, in ms."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    times = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == "train" and "step_time_s" in record:
                times.append(record["step_time_s"])
    return 1000 * statistics.median(times) if times else None


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    t0 = time.time()
    model = build_model(config)  # config errors first, before reading or compiling anything
    data_dir = config.data.data_dir or None
    train_bytes = wikipedia.load_bytes("train", data_dir).astype(np.int32)
    val_bytes = wikipedia.load_bytes("validation", data_dir).astype(np.int32)
    test_bytes = wikipedia.load_bytes("test", data_dir).astype(np.int32)
    print(
        f"data: train {len(train_bytes):,} bytes, validation {len(val_bytes):,}, "
        f"test {len(test_bytes):,}; attention={model.attention} mode={model.mode} "
        f"stride={model.stride} c={model.c}",
        flush=True,
    )
    with config.unlocked():
        if config.optim.total_steps <= 0:
            config.optim.total_steps = config.train.steps
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    seq_len, bs = config.data.seq_len, config.train.batch_size
    train_data = PackedWindows(
        train_bytes,
        seq_len,
        bs,
        seed=config.seed,
        process_rows=sharding_lib.process_batch_slice(bs),
    )
    evaluator = make_evaluator(
        model, mesh, config.eval.batch_size, config.eval.stride or seq_len // 2
    )

    def evaluate(params, step):
        nats, n = evaluator(params, val_bytes, config.eval.max_bytes)
        return {"loss": nats / n, "bits_per_byte": bits_per_byte(nats, n)}

    example = jnp.zeros((1, seq_len), jnp.int32)
    init_fn = lambda rng: model.init(rng, example)
    n_params = training.param_count(jax.eval_shape(init_fn, jax.random.key(0))["params"])
    meta = {"model": config.model.to_dict(), "data": config.data.to_dict()}
    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=st.lm_loss_fn(model),
        train_data=train_data,
        evaluate=evaluate,
        meta=meta,
        tokens_per_step=bs * seq_len,
    )
    params = result.state.params
    final_max = config.eval.test_max_bytes or None
    nats, n = evaluator(params, test_bytes, final_max)
    vnats, vn = evaluator(params, val_bytes, final_max)
    summary = {
        "bits_per_byte": bits_per_byte(nats, n),
        "val_bits_per_byte": bits_per_byte(vnats, vn),
        "test_bytes_scored": n,
        "ms_per_step": median_step_ms(workdir),
        "attention": model.attention,
        "mode": model.mode,
        "params": n_params,
        "steps": config.train.steps,
        "wall_s": time.time() - t0,
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(
            f"params={n_params:,} test bytes scored {n:,}; validation "
            f"bits_per_byte={summary['val_bits_per_byte']:.4f}",
            flush=True,
        )
        if summary["ms_per_step"] is not None:
            print(f"ms_per_step={summary['ms_per_step']:.1f}", flush=True)
        print(f"bits_per_byte={summary['bits_per_byte']:.4f}", flush=True)
    return summary


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)

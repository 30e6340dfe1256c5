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

Data: ``common.data.wikipedia`` (tfds ``wikipedia_xml_sample``): the raw bytes of whole
articles (XML + wiki markup) split 90 / 5 / 5 % by article; the vocabulary is the 256 byte
values. Training windows are packed from the train bytes (``common.data.packing``);
validation / test bytes are scored with sliding windows (``common.evaluation.lm_evaluator``:
each scored byte sees at least ``seq_len - eval.stride`` bytes of context) in
``bits_per_byte = sum(nats) / ln 2 / bytes``. ``ms_per_step`` is the median train step time
(compilation and evaluation excluded). Results: ``workdir/results.json``, docs/results.md.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import config as config_lib
from common import evaluation, presets, results, training
from common import sharding as sharding_lib
from common.data import wikipedia
from common.data.packing import PackedWindows
from nlp import sparse_transformer as st


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
        stride=32,  # l ~ sqrt(seq_len), as the paper's 128 for 12,288 bytes
        c=8,  # fixed pattern: c / l = 1 / 4 as the paper's 32 / 128
        dropout=0.0,
        remat_policy="",  # "" = none; else a jax.checkpoint_policies name
        dtype="float32",
    )
    c.optim = config_lib.optim(
        lr=2e-3,  # a 4-layer model tolerates a higher peak than the default
        warmup_steps=40,  # a short run: a short warmup
        min_lr_ratio=0.05,  # decay further: the run ends at the schedule's end
        b2=0.99,  # few steps: a shorter second-moment memory adapts faster
        weight_decay=0.01,  # the Sparse Transformer's light decay
    )
    c.train = config_lib.train(
        steps=400,  # a CPU budget per attention kind
        batch_size=4,  # long windows: few of them per step on a CPU
        log_every=20,  # enough logged intervals for a median step time
        eval_every=200,  # validation twice per run
        checkpoint_every=100,  # a CPU run can be killed: lose at most 100 steps
    )
    c.eval = dict(
        batch_size=32,
        max_bytes=20_000,  # validation bytes scored during training
        test_max_bytes=0,  # bytes of the final validation / test scores; 0 = all
        stride=0,  # sliding windows every `stride` bytes; 0 = seq_len // 2
    )
    c.mesh = config_lib.mesh()
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
    m = {**config.model, "remat_policy": config.model.remat_policy or None}
    return presets.from_config(st.from_preset, m, vocab_size=256, max_len=config.data.seq_len)


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    t0 = time.time()
    model = build_model(config)  # config errors first, before reading or compiling anything
    # Data: the article bytes; the vocabulary is the 256 byte values.
    data_dir = config.data.data_dir or None
    data = {
        s: wikipedia.load_bytes(s, data_dir).astype(np.int32)
        for s in ("train", "validation", "test")
    }
    print(
        f"data: train {len(data['train']):,} bytes, validation {len(data['validation']):,}, "
        f"test {len(data['test']):,}; attention={model.attention} mode={model.mode} "
        f"stride={model.stride} c={model.c}",
        flush=True,
    )
    seq_len, bs = config.data.seq_len, config.train.batch_size
    train_data = PackedWindows(
        data["train"],
        seq_len,
        bs,
        seed=config.seed,
        process_rows=sharding_lib.process_batch_slice(bs),
    )
    init_fn = lambda rng: model.init(rng, jnp.zeros((1, seq_len), jnp.int32))
    n_params = training.param_count(jax.eval_shape(init_fn, jax.random.key(0))["params"])

    # Evaluation: bits per byte of held-out articles, with sliding windows.
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    lm_eval = evaluation.lm_evaluator(
        model, mesh, batch_size=config.eval.batch_size, stride=config.eval.stride or seq_len // 2
    )

    def evaluate(params, step):
        nats, n = lm_eval(params, data["validation"], config.eval.max_bytes)
        return {"loss": nats / n, "bits_per_byte": evaluation.bits_per_unit(nats, n)}

    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=st.lm_loss_fn(model),
        train_data=train_data,
        evaluate=evaluate,
        meta={"model": config.model.to_dict(), "data": config.data.to_dict()},
        tokens_per_step=bs * seq_len,
    )
    params, final_max = result.state.params, config.eval.test_max_bytes or None
    nats, n = lm_eval(params, data["test"], final_max)
    vnats, vn = lm_eval(params, data["validation"], final_max)
    step_s = result.step_time_s
    summary = {
        "bits_per_byte": evaluation.bits_per_unit(nats, n),
        "val_bits_per_byte": evaluation.bits_per_unit(vnats, vn),
        "test_bytes_scored": n,
        "ms_per_step": None if step_s is None else 1000 * step_s,
        "attention": model.attention,
        "mode": model.mode,
        "params": n_params,
        **result.summary(),
        "wall_s": time.time() - t0,
    }
    results.write(workdir, summary, headline=("bits_per_byte", "val_bits_per_byte", "ms_per_step"))
    return summary


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)

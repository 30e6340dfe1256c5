"""The main job: a small GPT-2 trained on the Shakespeare plays, evaluated in bits per char.

Launch (default config: trains in under 10 minutes on a 2-core CPU):

    python -m experiments.gpt_shakespeare --workdir workdirs/gpt_shakespeare

Variants and overrides:

    python -m experiments.gpt_shakespeare --workdir /tmp/gs \
        --config=experiments/gpt_shakespeare.py:smoke --config.train.steps=50

Held-out plays (``common.data.shakespeare``: validation Hamlet + Twelfth Night, test Macbeth
+ Henry V) are scored in bits per character, ``sum(nats) / ln 2 / characters``, which
compares across tokenizers, with sliding windows (each scored token sees at least half a
context of preceding tokens; ``eval.stride``). Starting again on the same workdir resumes
from its last checkpoint; the byte-level BPE vocabulary is trained on the training plays
once and kept in the workdir.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import sharding as sharding_lib
from common import training
from common.data import shakespeare
from common.data.bpe import BPETokenizer
from common.data.packing import PackedWindows, eval_windows
from common.losses import cross_entropy
from nlp import gpt
from nlp.decoding import generate

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        data_dir="",  # tfds data dir; "" = tfds's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
        tokenizer="bpe",  # "bpe": byte-level BPE trained on the training plays; "gpt2"
        vocab_size=2048,  # for tokenizer="bpe"
        seq_len=128,
    )
    c.model = dict(
        preset="gpt2-small",  # architecture; the fields below override its sizes
        num_layers=4,
        num_heads=4,
        d_model=256,
        d_ff=1024,
        dropout=0.0,  # under 1.5 epochs of data: dropout only slows learning
        attn_dropout=0.0,
        dtype="float32",
        remat_policy=ml_collections.config_dict.placeholder(str),  # None: no recomputation
    )
    c.optim = dict(
        lr=3e-3,
        schedule="cosine",
        warmup_steps=50,
        total_steps=-1,
        min_lr_ratio=0.05,
        b1=0.9,
        b2=0.99,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,
    )
    c.train = dict(
        steps=1300,  # 1.64 epochs; 8.3 minutes in all on 2 idle CPU cores (1200: 2.413)
        batch_size=16,
        accum_steps=1,
        log_every=25,
        eval_every=250,
        checkpoint_every=250,
        keep_checkpoints=3,
        async_checkpoint=True,
        report_mfu=True,
    )
    c.eval = dict(
        batch_size=32,
        max_tokens=40_000,  # validation tokens scored during training (the final eval: all)
        stride=0,  # sliding-window eval: windows every `stride` tokens; 0 = seq_len // 2
    )
    c.sample = dict(
        num=2, prompt="ROMEO:", max_new_tokens=120, temperature=0.8, top_k=40, top_p=1.0
    )
    c.mesh = dict(data=-1, fsdp=1, rules=[list(r) for r in sharding_lib.DEFAULT_RULES])
    if variant == "smoke":  # seconds: plumbing only
        c.data.vocab_size = 512
        c.data.seq_len = 32
        c.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64)
        c.optim.warmup_steps = 5
        c.train.update(steps=20, batch_size=8, log_every=5, eval_every=10, checkpoint_every=10)
        c.eval.max_tokens = 2_000
        c.sample.max_new_tokens = 20
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
    return c


def build_model(config, vocab_size: int) -> gpt.GPT:
    m = dict(config.model)
    preset = m.pop("preset")
    dtype = m.pop("dtype")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return gpt.from_preset(
        preset, **m, max_len=config.data.seq_len, vocab_size=vocab_size, dtype=DTYPES[dtype]
    )


def load_tokenizer(config, workdir: str, train_text: str) -> BPETokenizer:
    if config.data.tokenizer == "gpt2":
        return BPETokenizer.gpt2()
    if config.data.tokenizer != "bpe":
        raise ValueError(f"data.tokenizer={config.data.tokenizer!r} is not 'bpe' or 'gpt2'")
    path = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(path):
        return BPETokenizer.load(path)
    tok = BPETokenizer.train([train_text], config.data.vocab_size)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tok.save(path)
    return tok


def make_evaluator(model: gpt.GPT, mesh, batch_size: int, stride: int):
    """``evaluate(params, tokens) -> (nats summed, tokens predicted)`` over a token stream."""

    @jax.jit
    def eval_step(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return cross_entropy(logits, batch["targets"], batch["weights"])

    rows = sharding_lib.process_batch_slice(batch_size)

    def evaluate(params, tokens, max_tokens=None):
        nats, count = 0.0, 0.0
        for batch in eval_windows(tokens, model.max_len, batch_size, max_tokens, stride):
            batch = sharding_lib.put_batch({k: v[rows] for k, v in batch.items()}, mesh)
            s, c = eval_step(params, batch)
            nats, count = nats + float(s), count + float(c)
        return nats, int(count)

    return evaluate


def bits_per_char(nats: float, tokens: np.ndarray, n_pred: int, tok: BPETokenizer) -> float:
    chars = len(tok.decode(tokens[1 : n_pred + 1].tolist()))
    return nats / math.log(2) / chars


def flops_per_token(model: gpt.GPT, n_params: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N + 12 L T d (N without positions)."""
    n = n_params - model.max_len * model.d_model
    return 6 * n + 12 * model.num_layers * model.max_len * model.d_model


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    t0 = time.time()
    data_dir = config.data.data_dir or None
    train_text = shakespeare.load_text("train", data_dir)
    val_text = shakespeare.load_text("validation", data_dir)
    test_text = shakespeare.load_text("test", data_dir)
    tok = load_tokenizer(config, workdir, train_text)
    train_tokens = np.asarray(tok.encode(train_text), np.int32)
    val_tokens = np.asarray(tok.encode(val_text), np.int32)
    test_tokens = np.asarray(tok.encode(test_text), np.int32)
    print(
        f"data: train {len(train_text):,} chars -> {len(train_tokens):,} tokens "
        f"(vocab {tok.vocab_size}); validation {len(val_text):,} chars; test "
        f"{len(test_text):,} chars",
        flush=True,
    )

    with config.unlocked():
        if config.optim.total_steps <= 0:
            config.optim.total_steps = config.train.steps
    model = build_model(config, tok.vocab_size)
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    seq_len, bs = config.data.seq_len, config.train.batch_size
    train_data = PackedWindows(
        train_tokens,
        seq_len,
        bs,
        seed=config.seed,
        process_rows=sharding_lib.process_batch_slice(bs),
    )
    stride = config.eval.stride or seq_len // 2
    evaluator = make_evaluator(model, mesh, config.eval.batch_size, stride)

    def evaluate(params, step):
        nats, n = evaluator(params, val_tokens, config.eval.max_tokens)
        return {"loss": nats / n, "bits_per_char": bits_per_char(nats, val_tokens, n, tok)}

    example = jnp.zeros((1, seq_len), jnp.int32)
    init_fn = lambda rng: model.init(rng, example)
    n_params = training.param_count(jax.eval_shape(init_fn, jax.random.key(0))["params"])
    meta = {
        "model": config.model.to_dict(),
        "data": config.data.to_dict(),
        "vocab_size": tok.vocab_size,
    }
    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=gpt.lm_loss_fn(model),
        train_data=train_data,
        evaluate=evaluate,
        meta=meta,
        flops_per_step=flops_per_token(model, n_params) * bs * seq_len,
        tokens_per_step=bs * seq_len,
    )
    params = result.state.params

    nats, n = evaluator(params, test_tokens)
    test_bpc = bits_per_char(nats, test_tokens, n, tok)
    vnats, vn = evaluator(params, val_tokens)
    val_bpc = bits_per_char(vnats, val_tokens, vn, tok)
    samples = sample_text(model, params, tok, config)
    summary = {
        "bits_per_char": test_bpc,
        "val_bits_per_char": val_bpc,
        "test_loss_per_token": nats / n,
        "params": n_params,
        "wall_s": time.time() - t0,
    }
    if jax.process_index() == 0:
        for i, s in enumerate(samples):
            print(f"--- sample {i} ---\n{s}\n", flush=True)
        with open(os.path.join(workdir, "samples.txt"), "w") as f:
            f.write("\n\n---\n\n".join(samples))
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(
            f"test plays {', '.join(shakespeare.TEST_PLAYS)}: {n:,} tokens; validation "
            f"bits_per_char={val_bpc:.4f}",
            flush=True,
        )
        print(f"bits_per_char={test_bpc:.4f}", flush=True)
    return summary


def sample_text(model: gpt.GPT, params: Any, tok: BPETokenizer, config) -> list[str]:
    sc = config.sample
    prompt = tok.encode(sc.prompt) or [tok.eot_id]
    prompt = np.tile(np.asarray(prompt, np.int32)[None], (sc.num, 1))
    new = min(sc.max_new_tokens, model.max_len - prompt.shape[1])
    out = generate(
        model,
        {"params": params},
        prompt,
        max_new_tokens=new,
        rng=jax.random.key(config.seed + 1),
        temperature=sc.temperature,
        top_k=sc.top_k,
        top_p=sc.top_p,
    )
    return [tok.decode(row.tolist()) for row in np.asarray(out)]


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)

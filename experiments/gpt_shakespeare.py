"""The main job: a small GPT-2 trained on the Shakespeare plays, evaluated in bits per char.

This script is the reference pattern for an experiment: config (only what differs from the
shared sections of ``common.config``, each with its reason), data, model, loss,
``common.training.train``, evaluation (``common.evaluation``), results
(``common.results.write``). Results live in ``workdir/results.json`` and ``docs/results.md``.

Launch:

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

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import config as config_lib
from common import evaluation, results, training
from common import sharding as sharding_lib
from common.data import shakespeare
from common.data.bpe import BPETokenizer, load_or_train_bpe
from common.data.packing import PackedWindows
from common.flops import palm_flops_per_token
from nlp import gpt
from nlp.decoding import generate


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
        remat=False,
    )
    c.optim = config_lib.optim(
        lr=3e-3,  # a 4-layer model tolerates a higher peak than GPT-2's 6e-4
        warmup_steps=50,  # a short run: a short warmup
        min_lr_ratio=0.05,  # decay further: the run ends at the schedule's end
        b2=0.99,  # few steps: a shorter second-moment memory adapts faster
    )
    c.train = config_lib.train(
        steps=1300,  # 1.64 epochs of the training plays at this batch
        batch_size=16,  # small batches: more updates in the CPU time budget
    )
    c.eval = dict(
        batch_size=32,
        max_tokens=40_000,  # validation tokens scored during training (the final eval: all)
        stride=0,  # sliding-window eval: windows every `stride` tokens; 0 = seq_len // 2
    )
    c.sample = dict(
        num=2, prompt="ROMEO:", max_new_tokens=120, temperature=0.8, top_k=40, top_p=1.0
    )
    c.mesh = config_lib.mesh()
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
    preset, dtype = m.pop("preset"), config_lib.dtype(m.pop("dtype"))
    return gpt.from_preset(
        preset, **m, max_len=config.data.seq_len, vocab_size=vocab_size, dtype=dtype
    )


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    t0 = time.time()
    # Data: the plays, tokenized with a BPE trained on the training plays (kept in workdir).
    data_dir = config.data.data_dir or None
    texts = {s: shakespeare.load_text(s, data_dir) for s in ("train", "validation", "test")}
    tok = load_or_train_bpe(
        workdir, [texts["train"]], config.data.vocab_size, kind=config.data.tokenizer
    )
    tokens = {s: np.asarray(tok.encode(t), np.int32) for s, t in texts.items()}
    print(
        f"data: train {len(texts['train']):,} chars -> {len(tokens['train']):,} tokens "
        f"(vocab {tok.vocab_size}); validation {len(texts['validation']):,} chars; test "
        f"{len(texts['test']):,} chars",
        flush=True,
    )
    seq_len, bs = config.data.seq_len, config.train.batch_size
    train_data = PackedWindows(
        tokens["train"],
        seq_len,
        bs,
        seed=config.seed,
        process_rows=sharding_lib.process_batch_slice(bs),
    )

    # Model and loss.
    model = build_model(config, tok.vocab_size)
    init_fn = lambda rng: model.init(rng, jnp.zeros((1, seq_len), jnp.int32))
    n_params = training.param_count(jax.eval_shape(init_fn, jax.random.key(0))["params"])
    n_no_pos = n_params - model.max_len * model.d_model  # the position table is a lookup
    flops_per_token = palm_flops_per_token(n_no_pos, model.num_layers, seq_len, model.d_model)

    # Evaluation: bits per character of held-out plays, with sliding windows.
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    lm_eval = evaluation.lm_evaluator(
        model, mesh, batch_size=config.eval.batch_size, stride=config.eval.stride or seq_len // 2
    )

    def bpc(params, split, max_tokens=None):
        nats, n = lm_eval(params, tokens[split], max_tokens)
        return nats / n, evaluation.bits_per_char(nats, tokens[split], n, tok.decode)

    def evaluate(params, step):
        loss, bits = bpc(params, "validation", config.eval.max_tokens)
        return {"loss": loss, "bits_per_char": bits}

    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=gpt.lm_loss_fn(model),
        train_data=train_data,
        evaluate=evaluate,
        meta={
            "model": config.model.to_dict(),
            "data": config.data.to_dict(),
            "vocab_size": tok.vocab_size,
        },
        flops_per_step=flops_per_token * bs * seq_len,
        tokens_per_step=bs * seq_len,
    )

    # Final scores on all of the held-out plays, written before the optional samples.
    params = result.state.params
    test_loss, test_bpc = bpc(params, "test")
    _, val_bpc = bpc(params, "validation")
    summary = {
        "bits_per_char": test_bpc,
        "val_bits_per_char": val_bpc,
        "test_loss_per_token": test_loss,
        "params": n_params,
        **result.summary(),
        "wall_s": time.time() - t0,
    }
    results.write(workdir, summary, headline=("bits_per_char", "val_bits_per_char"))
    if jax.process_index() == 0:
        plays = ", ".join(shakespeare.TEST_PLAYS)
        print(f"test plays {plays}; validation bits_per_char={val_bpc:.4f}")
        print(f"bits_per_char={test_bpc:.4f}", flush=True)
    samples = sample_text(model, params, tok, config)
    if jax.process_index() == 0:
        for i, s in enumerate(samples):
            print(f"--- sample {i} ---\n{s}\n", flush=True)
        with open(f"{workdir}/samples.txt", "w") as f:
            f.write("\n\n---\n\n".join(samples))
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

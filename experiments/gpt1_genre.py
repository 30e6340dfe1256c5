"""GPT-1 pre-trained as a language model on the Shakespeare training plays, then fine-tuned
(Radford et al. 2018, sections 3.2-3.3) on the genre task of ``experiments.bert_shakespeare``
(``nlp.genre``): same passages, same held-out plays, same model size, so the two compare
side by side. Results in docs/results.md, what was tried in docs/tried/gpt1_genre.md.

Launch (default: 1000 pre-training + 300 fine-tuning steps of 32 x 128 tokens, 4 layers of
width 128):

    python -m experiments.gpt1_genre --workdir workdirs/gpt1_genre

Variants and overrides:

    python -m experiments.gpt1_genre --workdir /tmp/g1 \
        --config=experiments/gpt1_genre.py:smoke --config.finetune.train.steps=20

1. A byte-level BPE vocabulary (GPT-1 used BPE) is trained on the training plays' speech
   lines (``shakespeare.speech_lines``, as BERT's pre-training sees them).
2. Pre-training: next-token prediction on packed windows of those lines (``gpt1``
   architecture: post-LN, learned positions, tanh GELU; sizes overridden below); held-out
   ``lm_loss`` in nats per token of the held-out plays' speech lines.
3. Fine-tuning: ``<start> passage <extract>`` (``nlp.gpt_finetune.single_input``), three
   new embedding rows for the task tokens, a linear head (dropout ``head_dropout`` on its
   input) on the final state at ``<extract>``, loss ``L_task + 0.5 * L_LM`` (eq. 5).

Phases run through ``common.training.train`` in ``workdir/pretrain`` and
``workdir/finetune`` and resume.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from common import config as config_lib
from common import evaluation, presets, results
from common import sharding as sharding_lib
from common.data import shakespeare
from common.data.bpe import load_or_train_bpe
from common.data.packing import PackedWindows
from nlp import genre, gpt
from nlp.gpt_finetune import (
    GPTClassifier,
    TaskTokens,
    add_task_tokens,
    encode_single,
    finetune_loss_fn,
)

# GPT-1's Adam (section 4.1): cosine to 0 after the warmup, w = 0.01 weight decay.
GPT1_ADAM = dict(b2=0.999, weight_decay=0.01, min_lr_ratio=0.0)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = genre.data_config()  # a byte-level BPE vocabulary (+3 task tokens)
    c.model = genre.model_config("gpt1")
    c.lm_weight = 0.5  # lambda of eq. 5
    c.head_dropout = 0.1  # on the classifier's input (section 4.1)
    genre.phases(c, **GPT1_ADAM)  # the phases of experiments.bert_shakespeare
    c.eval = dict(batch_size=64, max_tokens=20_000)  # held-out LM tokens scored
    c.mesh = config_lib.mesh()
    if variant == "smoke":  # seconds: plumbing only
        genre.smoke(c)
        c.data.vocab_size = 512
        c.eval.update(batch_size=32, max_tokens=2_000)
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
    return c


def build_model(config, vocab_size: int) -> gpt.GPT:
    fields = dict(max_len=config.data.max_len, vocab_size=vocab_size)
    return presets.from_config(gpt.from_preset, config.model, **fields)


def speech_text(plays) -> list[str]:
    return ["\n".join(shakespeare.speech_lines(p["text"])) for p in plays]


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    t0 = time.time()
    train_plays, held_out = genre.load_plays(config)
    train_texts = speech_text(train_plays)
    tok = load_or_train_bpe(workdir, train_texts, config.data.vocab_size)
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    max_len = config.data.max_len
    meta = {
        "model": config.model.to_dict(),
        "data": config.data.to_dict(),
        "vocab_size": tok.vocab_size,
    }

    # ---- pre-training: next-token prediction on the training plays
    def stream(texts):
        return np.asarray(
            [t for ids in tok.encode_batch(texts) for t in (*ids, tok.eot_id)], np.int32
        )

    train_stream, held_stream = stream(train_texts), stream(speech_text(held_out))
    model = build_model(config, tok.vocab_size)
    pre_bs = config.pretrain.train.batch_size
    train_windows = PackedWindows(
        train_stream,
        max_len,
        pre_bs,
        seed=config.seed,
        process_rows=sharding_lib.process_batch_slice(pre_bs),
    )
    lm_eval = evaluation.lm_evaluator(model, mesh, batch_size=config.eval.batch_size)

    def evaluate_lm(params):
        nats, n = lm_eval(params, held_stream, config.eval.max_tokens)
        return {"lm_loss": nats / n}

    print(
        f"data: {len(train_plays)} training plays, {len(train_stream):,} BPE tokens (vocab "
        f"{tok.vocab_size} + 3 task tokens); held out: {', '.join(p['title'] for p in held_out)}",
        flush=True,
    )
    example = jnp.zeros((1, max_len), jnp.int32)
    pre, lm_metrics = genre.pretrain(
        config,
        workdir,
        init_fn=lambda rng: model.init(rng, example),
        loss_fn=gpt.lm_loss_fn(model),
        train_data=train_windows,
        evaluate=evaluate_lm,
        meta=meta,
    )

    # ---- fine-tuning: <start> passage <extract> -> genre, L = L_task + lambda L_LM
    task = TaskTokens.after(tok.vocab_size)
    clf = GPTClassifier(
        build_model(config, tok.vocab_size + 3),
        len(shakespeare.FOLIO_GENRES),
        head_dropout=config.head_dropout,
    )

    def encode(plays):
        passages = shakespeare.genre_passages(plays, config.data.passage_chars)
        ids = tok.encode_batch([p["text"] for p in passages])
        return encode_single(ids, [p["label"] for p in passages], max_len, task)

    gpt_params = add_task_tokens(jax.device_get(pre.state.params), jax.random.key(config.seed + 1))
    pretrained = traverse_util.flatten_dict({"gpt": gpt_params}, sep="/")
    ft = genre.finetune(
        config,
        workdir,
        init_fn=genre.init_from(lambda rng: clf.init(rng, example), pretrained),
        loss_fn=finetune_loss_fn(clf, config.lm_weight),
        logits_fn=lambda params, batch: clf.apply(params, batch["tokens"], batch["extract"])[1],
        mesh=mesh,
        train_arrays=encode(train_plays),
        held_arrays=encode(held_out),
        meta=meta,
    )
    summary = {**lm_metrics, **ft, "pretrain": pre.summary(), "wall_s": time.time() - t0}
    headline = ("genre_accuracy", "genre_balanced_accuracy", "lm_loss")
    results.write(workdir, summary, headline=headline)
    return summary


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)

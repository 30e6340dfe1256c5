"""BERT pre-trained (MLM + NSP) on the Shakespeare training plays, then fine-tuned to tell
a passage's genre (comedy / history / tragedy) on plays it has never seen.

Launch (default: 1000 pre-training + 300 fine-tuning steps of 32 x 128 tokens, 4 layers of
width 128; results in docs/results.md, what was tried in docs/tried/bert_shakespeare.md):

    python -m experiments.bert_shakespeare --workdir workdirs/bert_shakespeare

Variants and overrides:

    python -m experiments.bert_shakespeare --workdir /tmp/bs \
        --config=experiments/bert_shakespeare.py:smoke --config.pretrain.train.steps=50

1. A lower-cased WordPiece vocabulary is trained on the training plays (kept in the
   workdir as BERT's ``vocab.txt``).
2. Pre-training (Devlin et al. 2019, section 3.1): documents are the training plays, units
   their lines of speech (``shakespeare.speech_lines``: no speaker names or headings); pairs
   with 50% true next / 50% random B, 15% of tokens chosen, 80/10/10
   (``common.data.mlm``). Held-out ``mlm_accuracy`` is the masked-token accuracy on pairs
   drawn the same way from the four held-out plays; ``mlm_constant_baseline`` that of
   always guessing their most common target.
3. Fine-tuning (section 4.1): ``[CLS] passage [SEP]`` -> ``Dense(3)`` on the pooled
   ``[CLS]``, all weights trained, on the genre task of ``nlp.genre`` (held out: every
   passage of Hamlet, Twelfth Night, Macbeth and Henry V; no model selection on them).

Both phases go through ``common.training.train`` in ``workdir/pretrain`` and
``workdir/finetune``: starting again on the same workdir resumes whichever phase was running.
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
from common.data.mlm import PretrainingPairs
from common.data.wordpiece import WordPieceTokenizer, load_or_train_wordpiece
from nlp import bert, genre

# BERT's Adam (Devlin et al. 2019, appendix A.2): beta2 0.999, eps 1e-6, decay 0.01, linear
# decay to 0 after the warmup.
BERT_ADAM = dict(b2=0.999, eps=1e-6, weight_decay=0.01, schedule="linear", min_lr_ratio=0.0)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = genre.data_config(
        lowercase=True,  # WordPiece vocabulary of BERT's uncased models
        max_predictions=20,  # MLM slots per sequence (15% of 128 = 19)
    )
    c.model = genre.model_config("bert-base")
    genre.phases(c, **BERT_ADAM)
    c.eval = dict(batch_size=64, mlm_batches=20)  # held-out MLM: 20 x 64 pairs
    c.mesh = config_lib.mesh()
    if variant == "smoke":  # seconds: plumbing only
        genre.smoke(c)
        c.data.update(vocab_size=800, max_predictions=10)
        c.eval.update(batch_size=32, mlm_batches=2)
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
    return c


def build_model(config, vocab_size: int, num_labels: int = 0) -> bert.Bert:
    fields = dict(max_len=config.data.max_len, vocab_size=vocab_size, num_labels=num_labels)
    return presets.from_config(bert.from_preset, config.model, **fields)


def documents(plays, tok: WordPieceTokenizer) -> list[list[list[int]]]:
    """Each play as a list of its tokenized speech lines."""
    return [tok.encode_batch(shakespeare.speech_lines(p["text"])) for p in plays]


def pairs(config, docs, tok: WordPieceTokenizer, batch_size: int, seed: int, process_rows=None):
    return PretrainingPairs(
        docs,
        max_len=config.data.max_len,
        batch_size=batch_size,
        max_predictions=config.data.max_predictions,
        vocab_size=tok.vocab_size,
        cls_id=tok.cls_id,
        sep_id=tok.sep_id,
        pad_id=tok.pad_id,
        mask_id=tok.mask_id,
        special_ids=tok.special_ids,
        seed=seed,
        process_rows=process_rows,
    )


def encode_passages(passages, tok: WordPieceTokenizer, max_len: int) -> dict[str, np.ndarray]:
    """``[CLS] passage [SEP]`` (passage truncated to fit), padded: tokens/segments/valid
    ``[n, max_len]`` and labels ``[n]``."""
    ids = tok.encode_batch([p["text"] for p in passages])
    tokens = np.full((len(ids), max_len), tok.pad_id, np.int32)
    for i, seq in enumerate(ids):
        seq = [tok.cls_id, *seq[: max_len - 2], tok.sep_id]
        tokens[i, : len(seq)] = seq
    return {
        "tokens": tokens,
        "segments": np.zeros_like(tokens),
        "valid": (tokens != tok.pad_id).astype(np.int32),
        "labels": np.array([p["label"] for p in passages], np.int32),
    }


def mlm_evaluator(model: bert.Bert, mesh, batches: list[dict[str, np.ndarray]], batch_size: int):
    """``evaluate(params) -> {mlm_accuracy, mlm_loss, nsp_accuracy, mlm_constant_baseline}``
    on fixed held-out batches (the baseline: always guessing their most common target)."""

    def step(params, batch):
        mlm, nsp = model.apply(
            {"params": params},
            batch["tokens"],
            batch["segments"],
            batch["valid"],
            batch["mlm_positions"],
            method=bert.Bert.pretrain,
        )  # [b, max_predictions, vocab], [b, 2]
        w, targets = batch["mlm_weights"], batch["mlm_targets"]  # [b, max_predictions]
        logz = jax.nn.logsumexp(mlm, -1)
        picked = jnp.take_along_axis(mlm, targets[..., None], -1)[..., 0]
        return (
            jnp.sum((jnp.argmax(mlm, -1) == targets) * w),
            jnp.sum((logz - picked) * w),
            jnp.sum(w),
            jnp.sum(jnp.argmax(nsp, -1) == batch["nsp_labels"]),
            batch["nsp_labels"].shape[0],
        )

    sums = evaluation.batch_sums(step, mesh, batch_size)
    targets = np.concatenate([b["mlm_targets"][b["mlm_weights"] > 0] for b in batches])
    constant = float(np.bincount(targets).max() / len(targets))

    def evaluate(params):
        correct, nll, count, nsp_correct, n = sums(params, batches)
        return {
            "mlm_accuracy": correct / count,
            "mlm_loss": nll / count,
            "nsp_accuracy": nsp_correct / n,
            "mlm_constant_baseline": constant,
        }

    return evaluate


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    t0 = time.time()
    train_plays, held_out = genre.load_plays(config)
    tok = load_or_train_wordpiece(
        workdir,
        lambda: [p["text"] for p in train_plays],
        config.data.vocab_size,
        lowercase=config.data.lowercase,
    )
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    max_len = config.data.max_len
    meta = {
        "model": config.model.to_dict(),
        "data": config.data.to_dict(),
        "vocab_size": tok.vocab_size,
    }

    # ---- pre-training: MLM + NSP on the training plays
    model = build_model(config, tok.vocab_size)
    pre_bs = config.pretrain.train.batch_size
    train_pairs = pairs(
        config,
        documents(train_plays, tok),
        tok,
        pre_bs,
        config.seed,
        process_rows=sharding_lib.process_batch_slice(pre_bs),
    )
    eval_pairs = pairs(config, documents(held_out, tok), tok, config.eval.batch_size, seed=12345)
    batches = [eval_pairs.batch_at(s) for s in range(config.eval.mlm_batches)]
    evaluate_mlm = mlm_evaluator(model, mesh, batches, config.eval.batch_size)
    print(
        f"data: {len(train_plays)} training plays, {sum(map(len, train_pairs.docs)):,} lines; "
        f"WordPiece vocab {tok.vocab_size}; held out: {', '.join(p['title'] for p in held_out)}",
        flush=True,
    )
    example = bert.example_inputs(1, max_len)
    pre, mlm_metrics = genre.pretrain(
        config,
        workdir,
        init_fn=lambda rng: model.init(rng, *example),
        loss_fn=bert.pretraining_loss_fn(model),
        train_data=train_pairs,
        evaluate=evaluate_mlm,
        meta=meta,
    )

    # ---- fine-tuning: genre of a passage from the pooled [CLS]
    clf = build_model(config, tok.vocab_size, num_labels=len(shakespeare.FOLIO_GENRES))
    chars = config.data.passage_chars

    def logits_fn(params, batch):
        return clf.apply(
            {"params": params},
            batch["tokens"],
            batch["segments"],
            batch["valid"],
            method=bert.Bert.classify,
        )

    pretrained = traverse_util.flatten_dict(jax.device_get(pre.state.params), sep="/")
    ft = genre.finetune(
        config,
        workdir,
        init_fn=genre.init_from(lambda rng: clf.init(rng, *example), pretrained),
        loss_fn=bert.classification_loss_fn(clf),
        logits_fn=logits_fn,
        mesh=mesh,
        train_arrays=encode_passages(shakespeare.genre_passages(train_plays, chars), tok, max_len),
        held_arrays=encode_passages(shakespeare.genre_passages(held_out, chars), tok, max_len),
        meta=meta,
    )
    summary = {**mlm_metrics, **ft, "pretrain": pre.summary(), "wall_s": time.time() - t0}
    headline = ("genre_accuracy", "genre_balanced_accuracy", "mlm_accuracy", "nsp_accuracy")
    results.write(workdir, summary, headline=headline)
    return summary


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)

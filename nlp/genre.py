"""The Shakespeare genre task shared by ``experiments.bert_shakespeare`` and
``experiments.gpt1_genre``: two training phases (pre-training, then fine-tuning from the
pre-trained weights) and the fine-tuning phase itself, scored on held-out passages.

Passages are ~``passage_chars`` characters of consecutive speech lines
(``common.data.shakespeare.genre_passages``), labelled comedy / history / tragedy by the
First Folio. Fine-tuning batches draw the three genres equally often
(``common.data.classification.LabelledBatches``); every passage of the held-out plays is
scored (``common.evaluation.predictor``, each process placing its own rows):
``genre_accuracy``, ``genre_balanced_accuracy`` (the mean per-genre recall; chance 1/3) and
``recall_<genre>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from common import config as config_lib
from common import evaluation, training
from common import sharding as sharding_lib
from common.data import shakespeare
from common.data.classification import LabelledBatches


def data_config(**extra: Any) -> dict[str, Any]:
    """The ``data`` section both experiments share, plus ``extra`` fields."""
    return dict(
        data_dir="",  # tfds data dir; "" = tfds's default
        train_split="train",  # tfds split of plays to train on (tests: a few plays)
        vocab_size=4000,  # trained on the training plays
        max_len=128,  # tokens per sequence, both phases
        passage_chars=400,  # genre passages: ~100 tokens
        **extra,
    )


def model_config(preset: str) -> dict[str, Any]:
    """The ``model`` section: ``preset``'s architecture at the size both experiments train,
    so that they compare side by side."""
    return dict(
        preset=preset,  # architecture; the fields below override its sizes
        num_layers=4,
        num_heads=4,
        d_model=128,
        d_ff=512,
        dropout=0.1,
        attn_dropout=0.1,
        dtype="float32",
    )


def phase(steps: int, batch_size: int, every: int, **optim: Any) -> dict[str, Any]:
    """The ``optim`` and ``train`` sections of one phase: ``steps`` of ``batch_size``,
    evaluated and checkpointed ``every`` steps; ``optim``: what differs from
    ``common.config.optim``'s defaults."""
    return dict(
        optim=config_lib.optim(**optim),
        train=config_lib.train(
            steps=steps, batch_size=batch_size, eval_every=every, checkpoint_every=every
        ),
    )


def phases(c: ml_collections.ConfigDict, **adam: Any) -> None:
    """``c.pretrain`` and ``c.finetune`` with the optimizer settings ``adam``: 1000 steps of
    32 at peak lr 1e-3 (a small model: above BERT-base's 1e-4), then 300 at 2e-4."""
    c.pretrain = phase(1000, 32, every=250, lr=1e-3, warmup_steps=100, **adam)
    c.finetune = phase(300, 32, every=300, lr=2e-4, warmup_steps=30, **adam)


def phase_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The view of phase ``name`` (``config[name]`` holds its optim + train) that
    ``common.training.train`` reads."""
    return ml_collections.ConfigDict(
        {
            "seed": config.seed,
            "mesh": config.mesh.to_dict(),
            "optim": config[name].optim.to_dict(),
            "train": config[name].train.to_dict(),
        }
    )


def smoke(c: ml_collections.ConfigDict) -> None:
    """The ``smoke`` variant's data, model and phases (seconds: plumbing only)."""
    c.data.update(max_len=64, passage_chars=200)
    c.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64)
    c.pretrain.train.update(steps=20, batch_size=16, eval_every=10, checkpoint_every=10)
    c.pretrain.optim.warmup_steps = 5
    c.finetune.train.update(steps=10, batch_size=16, eval_every=10, checkpoint_every=10)
    c.finetune.optim.warmup_steps = 2


def init_from(init_fn: Callable[[jax.Array], Any], pretrained: Mapping[str, Any]):
    """``init_fn`` whose params that also exist in ``pretrained`` (flat "a/b" keys) take the
    pre-trained values; the others (the new head) keep their fresh initialisation."""

    def init(rng):
        variables = init_fn(rng)
        flat = traverse_util.flatten_dict(variables["params"], sep="/")
        for k, box in flat.items():
            if k in pretrained:
                value = jnp.asarray(pretrained[k])
                flat[k] = (
                    box.replace_boxed(value) if isinstance(box, nn.meta.AxisMetadata) else value
                )
        return {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}

    return init


def load_plays(config: ml_collections.ConfigDict) -> tuple[list[dict], list[dict]]:
    """The training plays (``data.train_split``) and the held-out ones: the validation and
    test plays, all three genres among them."""
    data_dir = config.data.data_dir or None
    held_out = [p for s in ("validation", "test") for p in shakespeare.load_plays(s, data_dir)]
    return shakespeare.load_plays(config.data.train_split, data_dir), held_out


def train_phase(
    config: ml_collections.ConfigDict, workdir: str, name: str, meta: dict[str, Any], **kwargs
) -> training.TrainResult:
    """``common.training.train`` of phase ``name`` in ``workdir/name``; ``kwargs``:
    ``init_fn``, ``loss_fn``, ``train_data``, ``evaluate``."""
    return training.train(
        config=phase_config(config, name),
        workdir=os.path.join(workdir, name),
        meta={**meta, "phase": name},
        tokens_per_step=config[name].train.batch_size * config.data.max_len,
        **kwargs,
    )


def pretrain(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    init_fn: Callable[[jax.Array], Any],
    loss_fn: Callable[..., Any],
    train_data: Any,
    evaluate: Callable[[Any], dict[str, float]],
    meta: dict[str, Any],
) -> tuple[training.TrainResult, dict[str, float]]:
    """Train ``config.pretrain`` in ``workdir/pretrain``; ``evaluate(params)`` scores the
    held-out plays during training and once more at its end (returned with the result)."""
    result = train_phase(
        config,
        workdir,
        "pretrain",
        meta,
        init_fn=init_fn,
        loss_fn=loss_fn,
        train_data=train_data,
        evaluate=lambda params, step: evaluate(params),
    )
    return result, evaluate(result.state.params)


def finetune(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    init_fn: Callable[[jax.Array], Any],
    loss_fn: Callable[..., Any],
    logits_fn: Callable[[Any, dict[str, jax.Array]], jax.Array],
    mesh: jax.sharding.Mesh,
    train_arrays: Mapping[str, np.ndarray],
    held_arrays: Mapping[str, np.ndarray],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Train ``config.finetune`` in ``workdir/finetune`` on ``train_arrays`` from ``init_fn``
    and score every held-out passage with ``logits_fn(params, batch) -> [b, 3]``.

    Returns the genre metrics, the majority-class share of the held-out passages, the
    passage counts, the classifier's size and the phase's ``TrainResult.summary()``.
    """
    batch_size = config.finetune.train.batch_size
    train_data = LabelledBatches(
        train_arrays,
        batch_size,
        seed=config.seed,
        process_rows=sharding_lib.process_batch_slice(batch_size),
    )
    predict = evaluation.predictor(logits_fn, mesh, config.eval.batch_size)
    inputs = {k: v for k, v in held_arrays.items() if k != "labels"}
    labels, names = held_arrays["labels"], shakespeare.FOLIO_GENRES

    def evaluate(params):
        pred = np.argmax(predict(params, inputs), -1)
        m = evaluation.classification_metrics(pred, labels, len(names), names)
        accuracy, balanced = m.pop("accuracy"), m.pop("balanced_accuracy")
        return {"genre_accuracy": accuracy, **m, "genre_balanced_accuracy": balanced}

    ft = train_phase(
        config,
        workdir,
        "finetune",
        meta,
        init_fn=init_fn,
        loss_fn=loss_fn,
        train_data=train_data,
        evaluate=lambda params, step: evaluate(params),
    )
    counts = np.bincount(labels, minlength=len(names))
    return {
        **evaluate(ft.state.params),
        "majority_baseline": float(counts.max() / counts.sum()),
        "held_out_passages": {g: int(c) for g, c in zip(names, counts, strict=True)},
        "train_passages": int(len(train_arrays["labels"])),
        "params": training.param_count(ft.state.params),
        "finetune": ft.summary(),
    }

"""Evaluators shared by the experiments: language-model bits per unit, classification
metrics with a batched sharded predict loop, and corpus BLEU.

Every evaluator runs on every process of a multi-host run and returns the same numbers on
each: host batches are built for the whole global batch, each process places only its rows
(``common.sharding.process_batch_slice``) and results come back replicated. An experiment
uses them after ``common.training.train``::

    lm_eval = evaluation.lm_evaluator(model, mesh, batch_size=32, stride=seq_len // 2)
    nats, n = lm_eval(params, test_tokens)
    bpc = evaluation.bits_per_char(nats, test_tokens, n, tok.decode)

    predict = evaluation.predictor(lambda p, b: model.apply({"params": p}, b["images"]),
                                   mesh, batch_size=256)
    logits = predict(params, {"images": test_images})  # [n, classes], every example
    metrics = evaluation.classification_metrics(logits.argmax(-1), test_labels, 10)

    scores = evaluation.corpus_bleu(hypotheses, references)  # {"bleu", ...}

and the same callables inside ``train(..., evaluate=...)`` for validation during training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from common import sharding as sharding_lib
from common.data.packing import eval_windows
from common.losses import cross_entropy

# ----------------------------------------------------------------------------- language models


def lm_evaluator(
    model: Any, mesh: jax.sharding.Mesh, *, batch_size: int, stride: int | None = None
) -> Callable[..., tuple[float, int]]:
    """``evaluate(params, tokens, max_tokens=None) -> (nats summed, tokens predicted)``.

    Scores every token of ``tokens[1:]`` once with windows of ``model.max_len`` inputs that
    start every ``stride`` tokens (``common.data.packing.eval_windows``; default
    ``model.max_len``: no overlap; ``max_len // 2``: each scored token sees at least half a
    context). ``model.apply({"params": p}, inputs) -> logits``. ``batch_size`` is the global
    number of windows per step (a multiple of the process count and of the mesh size);
    ``max_tokens`` truncates the stream (None: all of it).
    """
    seq_len = model.max_len

    @jax.jit
    def step(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])  # [b, seq_len, vocab]
        return cross_entropy(logits, batch["targets"], batch["weights"])

    rows = sharding_lib.process_batch_slice(batch_size)

    def evaluate(params: Any, tokens: np.ndarray, max_tokens: int | None = None):
        nats, count = 0.0, 0.0
        for batch in eval_windows(tokens, seq_len, batch_size, max_tokens or None, stride):
            batch = sharding_lib.put_batch({k: v[rows] for k, v in batch.items()}, mesh)
            s, c = step(params, batch)
            nats, count = nats + float(s), count + float(c)
        return nats, int(count)

    return evaluate


def bits_per_unit(nats: float, units: int) -> float:
    """Bits per unit (byte, character, word) from summed nats: ``nats / ln 2 / units``."""
    if units <= 0:
        raise ValueError(f"need a positive number of units, got {units}")
    return nats / math.log(2) / units


def bits_per_char(
    nats: float, tokens: np.ndarray, n_pred: int, decode: Callable[[list[int]], str]
) -> float:
    """Bits per character of the ``n_pred`` tokens scored after ``tokens[0]`` (the text they
    decode to), which compares across tokenizers."""
    return bits_per_unit(nats, len(decode(np.asarray(tokens[1 : n_pred + 1]).tolist())))


# ----------------------------------------------------------------------------- classification


def predictor(
    apply_fn: Callable[[Any, dict[str, jax.Array]], Any],
    mesh: jax.sharding.Mesh,
    batch_size: int,
) -> Callable[[Any, Mapping[str, np.ndarray]], Any]:
    """``predict(params, arrays) -> outputs`` for every example, on every process.

    ``arrays``: host arrays with the examples along axis 0 (the same on every process);
    ``apply_fn(params, batch) -> outputs`` (a tree of ``[rows, ...]`` arrays) is jitted once.
    Batches of ``batch_size`` (global; a multiple of the process count and the mesh size)
    are cut in order, the last one padded by repeating its final example; each process
    places its rows of every batch; outputs are gathered, unpadded and returned as numpy.
    """
    step = jax.jit(apply_fn, out_shardings=sharding_lib.replicated(mesh))
    rows = sharding_lib.process_batch_slice(batch_size)

    def predict(params: Any, arrays: Mapping[str, np.ndarray]):
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {len(v) for v in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"arrays differ in length: { {k: len(v) for k, v in arrays.items()} }")
        (n,) = sizes
        if n == 0:
            raise ValueError("nothing to predict: the arrays are empty")
        outs = []
        for start in range(0, n, batch_size):
            idx = np.minimum(np.arange(start, start + batch_size), n - 1)  # pad: repeat last
            batch = sharding_lib.put_batch({k: v[idx[rows]] for k, v in arrays.items()}, mesh)
            out = jax.tree.map(np.asarray, step(params, batch))
            outs.append(jax.tree.map(lambda x, m=min(batch_size, n - start): x[:m], out))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    return predict


def classification_metrics(
    predictions: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """``accuracy``, ``balanced_accuracy`` (the mean recall over the classes present in
    ``labels``) and ``recall_<name>`` per present class (names default to the class ids)."""
    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    if predictions.shape != labels.shape or not len(labels):
        raise ValueError(
            f"need as many predictions as labels (> 0), got {predictions.shape} and {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    out = {"accuracy": float(np.mean(predictions == labels))}
    recalls = []
    for c in range(num_classes):
        of_c = labels == c
        if of_c.any():
            recalls.append(float(np.mean(predictions[of_c] == c)))
            out[f"recall_{names[c]}"] = recalls[-1]
    out["balanced_accuracy"] = float(np.mean(recalls))
    return out


# ----------------------------------------------------------------------------- generation


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacreBLEU corpus BLEU of detokenized ``hypotheses`` against one reference each:
    ``{"bleu": score, "sacrebleu_signature": signature, "bleu_detail": full score line}``.
    The signature pins tokenization and smoothing, so scores compare across papers."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu = BLEU()
    score = bleu.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": float(score.score),
        "sacrebleu_signature": str(bleu.get_signature()),
        "bleu_detail": str(score),
    }

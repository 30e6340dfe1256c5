"""BERT pre-training examples: sentence pairs for next-sentence prediction, masked tokens.

Devlin et al. (2019), section 3.1 and appendix A.1, as the released
``create_pretraining_data.py`` builds them, but drawn on the fly:

* **Pairs** (task #2, NSP): segment A is a run of consecutive units ("sentences"; for the
  plays, lines of speech) of one document; with probability 1/2 segment B is the run that
  follows A in the same document (label 0, IsNext), otherwise a run starting at a random
  unit of a *different* document (label 1, NotNext). A takes a random share of the
  ``max_len - 3`` token budget; B fills the rest. The input is
  ``[CLS] A [SEP] B [SEP]``, segment ids 0 up to the first ``[SEP]`` and 1 after, padded.
* **Masking** (task #1, MLM): of the positions that are not special tokens, 15%
  (``round(0.15 n)``, at least 1, at most ``max_predictions``) are chosen uniformly without
  replacement; each chosen token becomes ``[MASK]`` with probability 0.8, a random token
  with probability 0.1 (uniform over the non-special vocabulary), and stays unchanged with
  probability 0.1. The model predicts the original token at every chosen position.

Example ``g`` is a pure function of ``(seed, g)`` (its own ``numpy`` generator), so batch
``s`` is a pure function of ``(seed, s)`` and the pipeline's state is one step counter, as
in ``common.data.packing``: a resumed run reads exactly the batches an uninterrupted one
would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.data.step_batches import StepBatches

MASK_PROB = 0.15  # share of (non-special) positions chosen for prediction
MASK_TOKEN_PROB = 0.8  # chosen -> [MASK]
RANDOM_TOKEN_PROB = 0.1  # chosen -> a random token; the remaining 0.1 keep their token


def mask_tokens(
    tokens: np.ndarray,  # [len] int
    maskable: np.ndarray,  # [len] bool, False at [CLS] / [SEP] / [PAD]
    rng: np.random.Generator,
    *,
    mask_id: int,
    random_ids: np.ndarray,  # ids a "random token" is drawn from (the non-special ones)
    max_predictions: int,
    mask_prob: float = MASK_PROB,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT's masking of one sequence: ``(masked tokens [len], positions [k], targets [k])``.

    ``positions`` are sorted; ``targets`` are the original tokens there. ``k`` is
    ``min(max_predictions, max(1, round(mask_prob * n)))`` for ``n`` maskable positions
    (0 when ``n`` is 0).
    """
    candidates = np.flatnonzero(maskable)
    n = len(candidates)
    k = 0 if n == 0 else min(max_predictions, max(1, int(round(n * mask_prob))))
    positions = np.sort(rng.choice(candidates, size=k, replace=False))
    targets = tokens[positions].copy()
    out = tokens.copy()
    r = rng.random(k)
    to_mask = r < MASK_TOKEN_PROB
    to_random = (r >= MASK_TOKEN_PROB) & (r < MASK_TOKEN_PROB + RANDOM_TOKEN_PROB)
    out[positions[to_mask]] = mask_id
    out[positions[to_random]] = rng.choice(random_ids, size=int(to_random.sum()))
    return out, positions, targets


class PretrainingPairs(StepBatches):
    """Infinite iterator of BERT pre-training batches (numpy, ``rows`` = this process's
    slice of ``batch_size``):

    ``tokens``, ``segments`` int32 and ``valid`` int32 (1 = real token) ``[rows, max_len]``;
    ``mlm_positions``, ``mlm_targets`` int32 and ``mlm_weights`` float32 (0 = padding slot)
    ``[rows, max_predictions]``; ``nsp_labels`` int32 ``[rows]`` (0 IsNext, 1 NotNext).
    """

    STATE_KEYS = ("seed", "max_len", "batch_size")

    def __init__(
        self,
        documents: Sequence[Sequence[Sequence[int]]],  # documents -> units -> token ids
        *,
        max_len: int,
        batch_size: int,
        max_predictions: int,
        vocab_size: int,
        cls_id: int,
        sep_id: int,
        pad_id: int,
        mask_id: int,
        special_ids: Sequence[int],  # never drawn as random replacements
        seed: int = 0,
        process_rows: slice | None = None,
    ):
        docs = [[np.asarray(u, np.int32) for u in doc if len(u)] for doc in documents]
        problems = []
        if sum(len(d) >= 2 for d in docs) < 1 or sum(bool(d) for d in docs) < 2:
            problems.append(
                "need at least two non-empty documents, one of them with two or more units"
            )
        if max_len < 5:
            problems.append(f"max_len={max_len} leaves no room for [CLS] A [SEP] B [SEP]")
        if max_predictions < 1:
            problems.append(f"max_predictions={max_predictions} must be positive")
        if problems:
            raise ValueError("invalid pre-training data: " + "; ".join(problems))
        self.docs = docs
        # Starts of A: any unit followed by another unit of the same document.
        self.starts = np.array(
            [(d, u) for d, doc in enumerate(docs) for u in range(len(doc) - 1)], np.int64
        )
        self.max_len, self.batch_size, self.max_predictions = max_len, batch_size, max_predictions
        self.cls_id, self.sep_id, self.pad_id, self.mask_id = cls_id, sep_id, pad_id, mask_id
        self.random_ids = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids))
        self.seed = seed
        self.rows = process_rows if process_rows is not None else slice(0, batch_size)
        self.step = 0

    def _run(self, doc: int, unit: int, budget: int, stop: int | None = None) -> list[int]:
        """Tokens of consecutive units from ``(doc, unit)`` while they fit ``budget``
        (the first unit is truncated to fit), ending before unit ``stop``."""
        units = self.docs[doc]
        end = len(units) if stop is None else stop
        out: list[int] = []
        for u in range(unit, end):
            piece = units[u]
            if out and len(out) + len(piece) > budget:
                break
            out.extend(piece[: budget - len(out)].tolist())
            if len(out) >= budget:
                break
        return out

    def example(self, index: int) -> dict[str, Any]:
        """Example ``index`` (a pure function of ``(seed, index)``)."""
        rng = np.random.default_rng([self.seed, index])
        budget = self.max_len - 3
        doc, unit = self.starts[rng.integers(len(self.starts))]
        a_budget = int(rng.integers(1, budget))  # A's share; B gets at least 1 token
        a_units = self.docs[doc]
        a: list[int] = []
        last = unit
        for u in range(unit, len(a_units) - 1):  # leave at least one unit for B
            if a and len(a) + len(a_units[u]) > a_budget:
                break
            a.extend(a_units[u][: a_budget - len(a)].tolist())
            last = u
            if len(a) >= a_budget:
                break
        b_budget = budget - len(a)
        is_next = bool(rng.random() < 0.5)
        if is_next:
            b = self._run(doc, last + 1, b_budget)
        else:
            other = int(rng.integers(len(self.docs) - 1))
            other += other >= doc  # any document but A's
            while not self.docs[other]:  # skip empty documents
                other = int(rng.integers(len(self.docs)))
                other = other if other != doc else (other + 1) % len(self.docs)
            b = self._run(other, int(rng.integers(len(self.docs[other]))), b_budget)
        seq = [self.cls_id, *a, self.sep_id, *b, self.sep_id]
        n = len(seq)
        tokens = np.full(self.max_len, self.pad_id, np.int32)
        tokens[:n] = seq
        segments = np.zeros(self.max_len, np.int32)
        segments[len(a) + 2 : n] = 1
        valid = (np.arange(self.max_len) < n).astype(np.int32)
        maskable = valid.astype(bool)
        maskable[[0, len(a) + 1, n - 1]] = False  # [CLS], both [SEP]
        masked, positions, targets = mask_tokens(
            tokens,
            maskable,
            rng,
            mask_id=self.mask_id,
            random_ids=self.random_ids,
            max_predictions=self.max_predictions,
        )
        k = len(positions)
        pad = self.max_predictions - k
        return {
            "tokens": masked,
            "segments": segments,
            "valid": valid,
            "mlm_positions": np.pad(positions, (0, pad)).astype(np.int32),
            "mlm_targets": np.pad(targets, (0, pad)).astype(np.int32),
            "mlm_weights": np.pad(np.ones(k, np.float32), (0, pad)),
            "nsp_labels": np.int32(0 if is_next else 1),
        }

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        idx = np.arange(self.batch_size)[self.rows] + step * self.batch_size
        examples = [self.example(int(g)) for g in idx]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

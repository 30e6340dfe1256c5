"""Batches of (source, target) token-id pairs for an encoder-decoder translation model.

Pairs of similar length share a batch (Vaswani et al. 2017, section 5.1): each pair goes to
the smallest length bucket holding its source and target plus EOS / BOS, and a bucket's
batch has ``batch_tokens // bucket`` rows, so every batch holds about the same number of
token slots and every bucket compiles once. ``SPECIAL`` (``<|endoftext|>``, id 0 of the
vocabularies ``common.data.bpe`` trains) is BOS, EOS and padding; padding never reaches a
loss (weight 0) or a real position (source mask, causal decoder).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

SPECIAL = 0


def encode_pairs(tok: Any, pairs: Sequence[tuple[str, str]]):
    """``(source ids, target ids)`` lists of text ``pairs``, without specials."""
    return tok.encode_batch([e for e, _ in pairs]), tok.encode_batch([s for _, s in pairs])


def both_sides(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Every source text, then every target text: what a shared vocabulary is trained on."""
    return [e for e, _ in pairs] + [s for _, s in pairs]


def fitting(src, tgt, max_len: int) -> list[int]:
    """Indices of the pairs whose source and target, each with EOS / BOS, fit ``max_len``."""
    return [i for i in range(len(src)) if max(len(src[i]), len(tgt[i])) + 1 <= max_len]


def make_batch(src: list[list[int]], tgt: list[list[int]], length: int, rows: int):
    """Padded arrays for ``rows`` pairs (missing rows: empty pairs with zero weight).

    ``src`` = source + EOS, ``tgt_in`` = BOS + target, ``tgt_out`` = target + EOS, each
    ``[rows, length]``; ``src_mask`` marks real source tokens, ``tgt_weights`` real targets.
    """
    batch = {
        "src": np.full((rows, length), SPECIAL, np.int32),
        "src_mask": np.zeros((rows, length), bool),
        "tgt_in": np.full((rows, length), SPECIAL, np.int32),
        "tgt_out": np.full((rows, length), SPECIAL, np.int32),
        "tgt_weights": np.zeros((rows, length), np.float32),
    }
    batch["src_mask"][:, 0] = True  # empty rows attend to their EOS (no all-masked softmax)
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        s, t = list(s) + [SPECIAL], list(t)
        batch["src"][i, : len(s)] = s
        batch["src_mask"][i, : len(s)] = True
        batch["tgt_in"][i, 1 : len(t) + 1] = t
        batch["tgt_out"][i, : len(t) + 1] = t + [SPECIAL]
        batch["tgt_weights"][i, : len(t) + 1] = 1.0
    return batch


def bucket_of(n: int, buckets: Sequence[int]) -> int:
    """The smallest of ``buckets`` (increasing) that holds ``n`` tokens."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"length {n} is longer than the last bucket {buckets[-1]}")


class BucketedBatches:
    """Training batches of pairs of similar length, reshuffled every epoch.

    Epoch ``e`` shuffles the pairs with seed ``(seed, e)``, fills each bucket's batches of
    ``batch_tokens // bucket`` rows (rounded down to ``multiple``) in that order, drops each
    bucket's incomplete last batch and shuffles the batch order. The state is the count of
    batches served, so a resumed run reads exactly the batches of an uninterrupted one.
    ``process_rows(rows) -> slice``: the rows of a batch this process loads.
    """

    def __init__(self, src, tgt, buckets, batch_tokens, seed=0, multiple=1, process_rows=None):
        self.src, self.tgt = src, tgt
        self.buckets = list(buckets)
        self.seed = seed
        self.rows = {}
        for b in self.buckets:
            rows = (batch_tokens // b) // multiple * multiple
            if rows < multiple:
                raise ValueError(
                    f"data.batch_tokens={batch_tokens} gives bucket {b} fewer rows than the "
                    f"{multiple} devices"
                )
            self.rows[b] = rows
        self.process_rows = process_rows
        self.length = [
            bucket_of(max(len(s), len(t)) + 1, self.buckets) for s, t in zip(src, tgt, strict=True)
        ]
        self.count = 0
        self._epoch, self._plan = -1, []

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.src))
        plan = []
        for b in self.buckets:
            idx = order[np.asarray(self.length)[order] == b]
            n = len(idx) // self.rows[b]
            plan += [(b, idx[i * self.rows[b] : (i + 1) * self.rows[b]]) for i in range(n)]
        if not plan:
            raise ValueError("no bucket holds a full batch: lower data.batch_tokens")
        return [plan[i] for i in rng.permutation(len(plan))]

    def batches_per_epoch(self) -> int:
        return len(self._epoch_plan(0))

    def mean_target_tokens(self) -> float:
        """Real target tokens (with EOS) per batch, averaged over epoch 0."""
        plan = self._epoch_plan(0)
        return float(np.mean([sum(len(self.tgt[i]) + 1 for i in idx) for _, idx in plan]))

    def __next__(self):
        per = len(self._epoch_plan(0)) if self._epoch < 0 else len(self._plan)
        epoch, pos = divmod(self.count, per)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self._epoch_plan(epoch)
        b, idx = self._plan[pos]
        self.count += 1
        if self.process_rows is not None:
            idx = idx[self.process_rows(len(idx))]
        return make_batch([self.src[i] for i in idx], [self.tgt[i] for i in idx], b, len(idx))

    def get_state(self) -> dict[str, Any]:
        return {"count": self.count}

    def set_state(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])


def length_sorted(lengths: Sequence[int], rows: int) -> Iterator[list[int]]:
    """Indices of every item once, shortest first, in chunks of at most ``rows``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), rows):
        yield order[start : start + rows]


def eval_batches(
    src, tgt, buckets_or_len: Sequence[int] | Callable[[int], int], rows: int
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Every pair once, sorted by length, in batches of ``rows`` (the last one padded).

    Yields ``(indices, batch)``; ``buckets_or_len`` is the bucket list (a batch is padded to
    the bucket of its longest pair) or a callable ``n -> padded length``.
    """
    pad_to = (
        buckets_or_len if callable(buckets_or_len) else (lambda n: bucket_of(n, buckets_or_len))
    )
    lengths = [max(len(s), len(t)) for s, t in zip(src, tgt, strict=True)]
    for idx in length_sorted(lengths, rows):
        length = pad_to(max(lengths[i] for i in idx) + 1)
        yield idx, make_batch([src[i] for i in idx], [tgt[i] for i in idx], length, rows)

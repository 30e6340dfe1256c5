"""Batches of fixed-length labelled examples for fine-tuning classifiers.

``LabelledBatches`` draws training batches from pre-encoded examples (any dict of
``[n, ...]`` arrays plus ``labels [n]``). With ``balanced=True`` each row first draws a label
uniformly and then an example of that label, so every class is seen equally often whatever
the class sizes (the genre task's training plays are 16 comedies, 10 histories and 8
tragedies). Batch ``s`` is a pure function of ``(seed, s)``: the pipeline's state is one
step counter, as in ``common.data.packing``. ``eval_batches`` visits every example once in
order, padding the last batch with zero-weight rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from common.data.step_batches import StepBatches


def _check(arrays: Mapping[str, np.ndarray]) -> int:
    if "labels" not in arrays:
        raise ValueError(f"examples need a 'labels' array; got {sorted(arrays)}")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"example arrays differ in length: {sizes}")
    n = sizes["labels"]
    if n == 0:
        raise ValueError("no examples")
    return n


class LabelledBatches(StepBatches):
    """Infinite iterator of batches ``{key: [rows, ...]}`` drawn from ``arrays``."""

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        seed: int = 0,
        balanced: bool = True,
        process_rows: slice | None = None,
    ):
        _check(arrays)
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        labels = self.arrays["labels"]
        self.classes = np.unique(labels)
        self.by_class = [np.flatnonzero(labels == c) for c in self.classes]
        self.batch_size, self.seed, self.balanced = batch_size, seed, balanced
        self.rows = process_rows if process_rows is not None else slice(0, batch_size)
        self.step = 0

    def indices_at(self, step: int) -> np.ndarray:
        """Example indices of batch ``step`` (all rows, before the process slice)."""
        rng = np.random.default_rng([self.seed, step])
        if not self.balanced:
            return rng.integers(len(self.arrays["labels"]), size=self.batch_size)
        cls = rng.integers(len(self.classes), size=self.batch_size)
        return np.array([self.by_class[c][rng.integers(len(self.by_class[c]))] for c in cls])

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices_at(step)[self.rows]
        return {k: v[idx] for k, v in self.arrays.items()}


def eval_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, in batches of ``batch_size`` with a ``weights`` array
    (1 for real rows, 0 for the rows that pad the last batch)."""
    n = _check(arrays)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = {}
        for k, v in arrays.items():
            v = np.asarray(v)
            chunk = np.zeros((batch_size, *v.shape[1:]), v.dtype)
            chunk[: stop - start] = v[start:stop]
            batch[k] = chunk
        batch["weights"] = (np.arange(batch_size) < stop - start).astype(np.float32)
        yield batch

"""Batches of labelled examples for training classifiers (and contrastive image-text models).

``LabelledBatches`` draws training batches from pre-encoded examples (any dict of
``[n, ...]`` arrays plus ``labels [n]``). With ``balanced=True`` each row first draws a label
uniformly and then an example of that label, so every class is seen equally often whatever
the class sizes (the genre task's training plays are 16 comedies, 10 histories and 8
tragedies); with ``balanced=False`` each row is a uniformly random example (the diffusion
experiments' images), and ``transforms`` maps chosen arrays (e.g. uint8 pixels -> floats).
Batch ``s`` is a pure function of ``(seed, s)``: the pipeline's state is one step counter, as
in ``common.data.packing``. ``ShuffledBatches`` reads epochs, each a fresh
permutation of the examples. ``CaptionedImages`` pairs each image with a caption of its
class from a template (for CLIP where no human captions exist). ``eval_batches`` visits every
example once in order, padding the last batch with zero-weight rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

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
    """Infinite iterator of batches ``{key: [rows, ...]}`` drawn from ``arrays``;
    ``transforms[key]`` (optional) maps the rows chosen from ``arrays[key]``."""

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        seed: int = 0,
        balanced: bool = True,
        process_rows: slice | None = None,
        transforms: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    ):
        _check(arrays)
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.transforms = dict(transforms or {})
        if unknown := sorted(set(self.transforms) - set(self.arrays)):
            raise ValueError(f"transforms for {unknown}, which are not among {sorted(arrays)}")
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
        return {k: self.transforms.get(k, _same)(v[idx]) for k, v in self.arrays.items()}


def _same(x: np.ndarray) -> np.ndarray:
    return x


class ShuffledBatches(StepBatches):
    """Infinite iterator of ``{"images" [rows, ...], "labels" int32 [rows]}`` by epochs.

    Each epoch visits the examples in a fresh permutation drawn from ``(seed, epoch)``;
    batch ``s`` holds global samples ``s * batch_size ...``, so the state is one step
    counter and a resumed run reads the batches an uninterrupted one would. ``rows`` is
    this process's slice of the global batch.
    """

    def __init__(self, images, labels, batch_size: int, *, seed: int = 0, process_rows=None):
        if len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"need as many images as labels (>0): {len(images)}, {len(labels)}")
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, seed
        self.rows = process_rows if process_rows is not None else slice(0, batch_size)
        self.step = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
            self._perm = (epoch, perm)
        return self._perm[1]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        n = len(self.labels)
        g = np.arange(self.batch_size)[self.rows] + step * self.batch_size  # global samples
        idx = np.array([self._order(int(i // n))[i % n] for i in g])
        return {"images": self.images[idx], "labels": self.labels[idx]}


class CaptionedImages(StepBatches):
    """Training batches ``{"images" [rows, ...], "tokens" [rows, context]}`` of image-caption
    pairs: row ``r`` of batch ``s`` is a random image with the caption of its class from a
    random template, ``captions[template, label]`` (pre-tokenised). ``transform`` maps the
    chosen images (e.g. uint8 -> standardised float). Batch ``s`` is a pure function of
    ``(seed, s)``, so the state is one step counter.
    """

    def __init__(
        self,
        images: np.ndarray,  # [n, ...]
        labels: np.ndarray,  # int [n]
        captions: np.ndarray,  # int32 [templates, classes, context]
        batch_size: int,
        *,
        seed: int = 0,
        process_rows: slice | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        if len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"{len(images)} images for {len(labels)} labels")
        if labels.max() >= captions.shape[1]:
            raise ValueError(
                f"label {labels.max()} has no caption: {captions.shape[1]} class names"
            )
        self.images, self.labels, self.captions = images, labels, captions
        self.batch_size, self.seed = batch_size, seed
        self.rows = process_rows if process_rows is not None else slice(0, batch_size)
        self.transform = transform or (lambda x: x)
        self.step = 0

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        idx = rng.integers(len(self.labels), size=self.batch_size)[self.rows]
        tmpl = rng.integers(self.captions.shape[0], size=self.batch_size)[self.rows]
        return {
            "images": self.transform(self.images[idx]),
            "tokens": self.captions[tmpl, self.labels[idx]],
        }


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

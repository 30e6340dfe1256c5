"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017) as a tfds dataset, read offline from the
Debian package ``dataset-fashion-mnist``.

The package installs the four original idx files, gzip-compressed, in
``/usr/share/datasets/fashion-mnist/``. Debian re-gzipped them, so the bytes (and the
checksums tfds's public ``fashion_mnist`` builder pins) differ from the upstream
downloads while the decompressed idx data are the same. This module parses the idx files
itself (``read_idx``) and serves them through its own builder, ``fashion_mnist_debian``:
it never touches the public dataset name, which would try the network.

Features: ``image`` uint8 ``[28, 28, 1]`` and ``label``, a ``ClassLabel`` over the ten
``CLASS_NAMES``. Splits are the dataset's own, ``train`` (60,000) and ``test`` (10,000).
``VALIDATION`` / ``TRAIN_MINUS_VALIDATION`` carve a fixed validation set (the last 5,000
examples of the stored ``train`` order) out of ``train`` with tfds's split slicing, for
model selection that never looks at ``test``.

``load_arrays(split, data_dir)`` prepares the dataset on first use and returns whole
splits as numpy arrays, which is what 28 x 28 images want on a CPU; ``normalize``
standardises them with the training images' pixel statistics.
"""

from __future__ import annotations

import gzip
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from common.data.tfds_io import tfds

INSTALL_HINT = "apt-get install dataset-fashion-mnist"
# Where the Debian package puts the files; FASHION_MNIST_DIR overrides it.
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
# The label names of the dataset's README, in label order 0..9.
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SHAPE = (28, 28, 1)
# Per-pixel mean and std of the training images scaled to [0, 1] (tested against the data).
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
# idx file names of each split: (images, labels) and the number of examples.
FILES: dict[str, tuple[str, str, int]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
VALIDATION_SIZE = 5_000
# Fixed split strings over the stored train order (tfds split slicing).
VALIDATION = f"train[{60_000 - VALIDATION_SIZE}:]"
TRAIN_MINUS_VALIDATION = f"train[:{60_000 - VALIDATION_SIZE}]"

# idx magic numbers: 0x0000 then the element type (0x08: unsigned byte) and the rank.
_IDX_UBYTE = 0x08


def files_dir() -> pathlib.Path:
    """The folder holding the idx ``.gz`` files (``$FASHION_MNIST_DIR`` or Debian's)."""
    path = pathlib.Path(os.environ.get("FASHION_MNIST_DIR") or DEFAULT_DIR)
    missing = [
        name
        for images, labels, _ in FILES.values()
        for name in (images, labels)
        if not (path / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} are not in {path}; install the Debian package: "
            f"`{INSTALL_HINT}` (or set FASHION_MNIST_DIR to a folder holding the idx .gz files)."
        )
    return path


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one gzip-compressed idx file of unsigned bytes (LeCun's MNIST format).

    Header: two zero bytes, the type byte (0x08 = uint8), the rank byte, then one
    big-endian uint32 per dimension; the data follow in C order.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # not gzip, or truncated
        raise ValueError(f"{path} is not a readable gzip idx file: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (header {data[:4]!r})")
    rank = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=rank, offset=4))
    offset = 4 + 4 * rank
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says {shape} = {int(np.prod(shape))} bytes of data, "
            f"the file holds {len(data) - offset}"
        )
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def read_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``train`` or ``test`` straight from the idx files, in file order:
    images uint8 ``[N, 28, 28, 1]``, labels int32 ``[N]``."""
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST has splits {sorted(FILES)}, not {split!r}")
    images_name, labels_name, n = FILES[split]
    root = files_dir()
    images, labels = read_idx(root / images_name), read_idx(root / labels_name)
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise ValueError(
            f"{split}: expected {n} images of 28x28 and {n} labels, got {images.shape} "
            f"and {labels.shape}"
        )
    if labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{split}: label {labels.max()} is outside 0..{len(CLASS_NAMES) - 1}")
    return images[..., None], labels.astype(np.int32)


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder):
    """tfds builder ``fashion_mnist_debian``: Fashion-MNIST from the Debian package."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Debian dataset-fashion-mnist idx files."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=IMAGE_SHAPE),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            citation=(
                "Xiao, Rasul, Vollgraf. Fashion-MNIST: a Novel Image Dataset for "
                "Benchmarking Machine Learning Algorithms. arXiv:1708.07747, 2017."
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Reads the installed idx files; downloads nothing."""
        del dl_manager  # Local files only.
        files_dir()  # Fail before any generation when the package is missing.
        return {split: self._generate_examples(split) for split in FILES}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yields ``(index in the file, {"image", "label"})``."""
        images, labels = read_split(split)
        for i in range(len(labels)):
            yield i, {"image": images[i], "label": int(labels[i])}


def builder(data_dir: str | None = None) -> FashionMnistDebian:
    """The prepared builder (prepared into ``data_dir`` on first use; ``None`` means
    tfds's default data dir, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    b = FashionMnistDebian(data_dir=data_dir)
    b.download_and_prepare()
    return b


def load_arrays(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns a whole split as ``(images uint8 [N, 28, 28, 1], labels int32 [N])``.

    ``split`` is any tfds split string over ``train`` and ``test`` (``"test"``,
    ``VALIDATION``, ``"train[:1000]"`` ...); examples come in the stored order, which is
    fixed for a given dataset version.
    """
    data = tfds.as_numpy(builder(data_dir).as_dataset(split=split, batch_size=-1))
    return np.asarray(data["image"], np.uint8), np.asarray(data["label"], np.int32)


def normalize(images: Any) -> Any:
    """uint8 images (numpy or jax) -> float32 pixels ``(p / 255 - PIXEL_MEAN) / PIXEL_STD``."""
    return (images.astype(np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD

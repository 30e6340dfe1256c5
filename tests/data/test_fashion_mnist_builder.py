"""The Fashion-MNIST tfds builder on the real Debian files: counts, labels, a published
statistic, the same images as the idx files, the fixed validation split, clear errors."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from common.data import fashion_mnist


@pytest.fixture(scope="module")
def splits(tfds_dir):
    return {s: fashion_mnist.load_arrays(s, tfds_dir) for s in ("train", "test")}


def test_counts_shapes_and_labels(splits):
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = splits[split]
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int32
        assert labels.min() == 0 and labels.max() == 9
        # Fashion-MNIST is balanced: 6,000 / 1,000 images per class.
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)


def test_known_statistics(splits):
    # The per-pixel mean and std every Fashion-MNIST normalisation uses: 0.2860 / 0.3530
    # (train, pixels scaled to [0, 1]).
    train = splits["train"][0].astype(np.float64) / 255.0
    assert abs(train.mean() - 0.2860) < 1e-4
    assert abs(train.std() - 0.3530) < 1e-4
    # The first image of the upstream training file is an ankle boot (label 9).
    images, labels = fashion_mnist.read_split("train")
    assert labels[0] == 9 and fashion_mnist.CLASS_NAMES[9] == "Ankle boot"


def _digests(images, labels):
    return sorted(
        hashlib.sha1(im.tobytes() + bytes([lb])).hexdigest()
        for im, lb in zip(images, labels, strict=True)
    )


def test_tfds_examples_are_the_idx_files(splits):
    """Same (image, label) pairs as the files, in tfds's stored order."""
    for split in ("train", "test"):
        assert _digests(*splits[split]) == _digests(*fashion_mnist.read_split(split))


def test_builder_info(tfds_dir):
    info = fashion_mnist.builder(tfds_dir).info
    assert info.name == "fashion_mnist_debian"
    assert info.features["label"].names == list(fashion_mnist.CLASS_NAMES)
    assert info.features["image"].shape == (28, 28, 1)
    assert {k: v.num_examples for k, v in info.splits.items()} == {"train": 60_000, "test": 10_000}


def test_validation_split_is_fixed_and_disjoint(splits, tfds_dir):
    val_x, val_y = fashion_mnist.load_arrays(fashion_mnist.VALIDATION, tfds_dir)
    rest_x, _ = fashion_mnist.load_arrays(fashion_mnist.TRAIN_MINUS_VALIDATION, tfds_dir)
    assert len(val_y) == fashion_mnist.VALIDATION_SIZE and len(rest_x) == 55_000
    train_x, train_y = splits["train"]
    np.testing.assert_array_equal(val_x, train_x[55_000:])
    np.testing.assert_array_equal(val_y, train_y[55_000:])
    np.testing.assert_array_equal(rest_x, train_x[:55_000])
    assert np.bincount(val_y, minlength=10).min() > 400  # every class is represented


def test_missing_files_name_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.files_dir()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.read_split("test")


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"\x00" * 12)  # float32 type
    with pytest.raises(ValueError, match="not an idx file of unsigned bytes"):
        fashion_mnist.read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match=r"\(5,\) = 5 bytes of data, the file holds 2"):
        fashion_mnist.read_idx(short)
    plain = tmp_path / "plain.gz"
    plain.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"plain\.gz is not a readable gzip idx file"):
        fashion_mnist.read_idx(plain)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(bad.read_bytes()[:-6])
    with pytest.raises(ValueError, match=r"truncated\.gz is not a readable gzip idx file"):
        fashion_mnist.read_idx(truncated)
    with pytest.raises(ValueError, match="not 'validation'"):
        fashion_mnist.read_split("validation")

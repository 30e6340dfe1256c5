"""The Fashion-MNIST experiment end to end on the real images: a short Swin run learns and
resumes, its pictures are written, its pieces (batches, augmentation, mask picture) hold
their definitions, and bad configs fail by name."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import plots
from common import sharding as sharding_lib
from common.data import fashion_mnist
from common.data.classification import ShuffledBatches
from experiments import fashion_mnist as fm
from vision import augment, swin

# Measured with this smoke config (150 steps of 64 images, 9,600 images, 18.9k params, the
# default conv stem and 1-pixel crops): test accuracy 0.577 on the first 2,000 test images
# with the default test-time augmentation (0.574 with flips alone, 0.5785 without); chance
# is 0.10.
SMOKE_BOUND = 0.50


def smoke_config(tfds_dir, **overrides):
    config = fm.get_config("smoke")
    for key, value in {"data.data_dir": tfds_dir, **overrides}.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


@pytest.mark.slow
def test_short_swin_run_learns_and_resumes(tmp_path, tfds_dir):
    summary = fm.main(smoke_config(tfds_dir), str(tmp_path))
    assert summary["test_accuracy"] > SMOKE_BOUND, summary
    by_tta = summary["test_accuracy_by_tta"]  # the default: crops in training, shifted views
    assert list(by_tta) == ["none", "flip", "flip+shift1"], by_tta
    assert by_tta["flip+shift1"] == summary["test_accuracy"]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert {"images_per_s", "accuracy", "lr", "grad_norm"} <= set(train[-1])
    assert json.load(open(tmp_path / "results.json"))["test_accuracy"] == summary["test_accuracy"]
    for name in ("predictions.png", "swin_shift_mask.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    # Same workdir and config: the run resumes at its last step and scores the same.
    # Scoring without the shifted views (eval.shift_tta=0) drops that rung of the ladder.
    again = fm.main(smoke_config(tfds_dir, **{"eval.shift_tta": 0}), str(tmp_path))
    assert again["resumed_from"] == 150
    assert again["test_accuracy_by_tta"] == {k: by_tta[k] for k in ("none", "flip")}
    assert again["test_accuracy"] == by_tta["flip"]


def test_shuffled_batches_visit_each_example_once_per_epoch_and_resume():
    labels = np.arange(10, dtype=np.int32)
    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    data = ShuffledBatches(images, labels, 4, seed=3)
    seen = np.concatenate([next(data)["labels"] for _ in range(5)])  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # a fresh order per epoch
    resumed = ShuffledBatches(images, labels, 4, seed=3)
    resumed.set_state(ShuffledBatches(images, labels, 4, seed=3).get_state() | {"step": 3})
    batch = next(resumed)
    np.testing.assert_array_equal(batch["labels"], seen[12:16])
    np.testing.assert_array_equal(batch["images"][:, 0, 0, 0], batch["labels"])
    with pytest.raises(ValueError, match="batch_size=8, this pipeline has 4"):
        resumed.set_state({"step": 0, "seed": 3, "batch_size": 8})


def test_augment_is_a_crop_of_the_padded_image_and_a_flip():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 6, 5, 1)), jnp.float32)
    rng = jax.random.key(0)
    np.testing.assert_array_equal(augment.augment(x, rng), x)
    flipped = np.asarray(augment.augment(x, rng, flip=True))
    same = [np.array_equal(f, o) for f, o in zip(flipped, np.asarray(x), strict=True)]
    mirrored = [np.array_equal(f, o[:, ::-1]) for f, o in zip(flipped, np.asarray(x), strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and any(mirrored) and any(same)
    stats = dict(mean=fashion_mnist.PIXEL_MEAN, std=fashion_mnist.PIXEL_STD)
    out = np.asarray(augment.augment(x, rng, crop_pad=2, **stats))
    background = -fashion_mnist.PIXEL_MEAN / fashion_mnist.PIXEL_STD
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=background)
    for o, p in zip(out, padded, strict=True):  # each output is some 6x5 window of its padding
        windows = [p[i : i + 6, j : j + 5] for i in range(5) for j in range(5)]
        assert any(np.allclose(o, w) for w in windows)


@pytest.mark.slow
def test_random_erase_replaces_one_rectangle_of_the_stated_area_in_the_stated_share():
    h, w, prob = 28, 28, 0.5
    x = jnp.full((2000, h, w, 1), 7.0, jnp.float32)  # no fill value (pixels in [0, 1]) is 7
    stats = dict(mean=fashion_mnist.PIXEL_MEAN, std=fashion_mnist.PIXEL_STD)
    out = np.asarray(augment.random_erase(x, jax.random.key(3), prob, **stats))
    changed = out[..., 0] != 7.0  # [b, h, w]
    erased = changed.any((1, 2))
    assert abs(erased.mean() - prob) < 4 * np.sqrt(prob * (1 - prob) / len(x))
    for m in changed[erased][:200]:  # the changed pixels fill their bounding box
        ys, xs = np.nonzero(m)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert m.sum() == box and box <= 0.4 * h * w + h + w  # rounding of each side
    fill = out[..., 0][changed] * fashion_mnist.PIXEL_STD + fashion_mnist.PIXEL_MEAN
    assert fill.min() >= 0.0 and fill.max() <= 1.0 and abs(fill.mean() - 0.5) < 0.01
    area = changed[erased].mean((1, 2))  # the paper's range 0.02-0.4 of the image, clipped
    assert 0.17 < area.mean() < 0.23 and area.min() >= 0.0 and area.max() <= 0.45
    np.testing.assert_array_equal(augment.augment(x, jax.random.key(3), erase_prob=0.0), x)


@pytest.mark.slow
def test_normalized_training_pixels_have_zero_mean_unit_std(tfds_dir):
    images, _ = fashion_mnist.load_arrays("train[:20000]", tfds_dir)
    x = np.asarray(fashion_mnist.normalize(jnp.asarray(images)))
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1.0) < 0.01


def test_shift_mask_picture_shows_the_mask():
    """The right panel's pixels are ``shifted_window_mask`` (white = may attend)."""
    h, w, m, s = 14, 14, 7, 3
    picture = plots.shifted_window_picture(h, w, m, s, swin.shifted_window_mask)
    picture = np.asarray(picture.convert("L"))
    mask = swin.shifted_window_mask(h, w, m, s)  # [4, 49, 49]
    assert mask.shape == (4, 49, 49) and mask[0].all() and not mask[3].all()
    # Locate the last window's panel: its last row/column pixel is the mask's corner.
    n, gap, scale = m * m, 4, 3
    x0 = 16 + 14 * 12 + 16  # pad + left panel + pad
    y0 = 16 + 28  # pad + two caption lines
    i, j = 1, 1  # window 3 in a 2 x 2 layout
    for q, k in [(0, 0), (0, 48), (48, 0), (20, 30), (45, 3)]:
        y = y0 + (i * (n + gap) + q) * scale + 1
        x = x0 + (j * (n + gap) + k) * scale + 1
        assert (picture[y, x] > 127) == mask[3, q, k], (q, k)


def test_shift_mask_picture_pads_a_map_that_is_not_a_multiple_of_the_window():
    """Window 4 on the 14 x 14 map: the block pads to 16 x 16 (16 windows), so must the
    picture (this crashed at the end of a window-4 run before)."""
    picture = plots.shifted_window_picture(14, 14, 4, 2, swin.shifted_window_mask)
    mask = swin.shifted_window_mask(16, 16, 4, 2)  # [16, 16, 16]
    n, gap, scale = 16, 4, 3
    assert picture.width == 16 + 16 * 12 + 16 + (4 * (n + gap) - gap) * scale + 16
    gray = np.asarray(picture.convert("L"))
    x0, y0 = 16 + 16 * 12 + 16, 16 + 28
    i, j = 3, 3  # the last window, which mixes pieces of the rolled map
    assert not mask[15].all()
    for q, k in [(0, 0), (0, 15), (15, 0), (5, 10)]:
        y = y0 + (i * (n + gap) + q) * scale + 1
        x = x0 + (j * (n + gap) + k) * scale + 1
        assert (gray[y, x] > 127) == mask[15, q, k], (q, k)


def test_model_configs_and_bad_inputs():
    model = fm.build_model(fm.get_config())
    assert isinstance(model, swin.Swin)
    (h, w), *_ = model.stage_resolutions(28, 28)
    assert (h, w) == (7, 7) and swin.stage_windows(h, w, model.window_size) == (4, 2)
    vit_model = fm.build_model(fm.get_config("vit"))
    assert vit_model.grid_size == (7, 7)
    config = fm.get_config()
    config.model.family = "resnet"
    with pytest.raises(ValueError, match=r"model.family='resnet' is not one of \('swin', 'vit'\)"):
        fm.build_model(config)
    config = fm.get_config()
    config.model.swin.num_heads = (2, 4)
    with pytest.raises(ValueError, match="num_heads=.* needs one entry per stage"):
        fm.build_model(config)
    with pytest.raises(ValueError, match="unknown variant"):
        fm.get_config("vit,swin")
    with pytest.raises(ValueError, match="unknown variant"):
        fm.get_config("large")


def smoke_predictors(seed: int, **tta):
    """A randomly initialised smoke model's params, 20 random images, and its predictors
    without and with the test-time augmentation ``tta``."""
    model = fm.build_model(fm.get_config("smoke"))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
    mesh = sharding_lib.make_mesh(-1, 1)
    images = np.random.default_rng(seed).integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
    plain = fm.make_predictor(model, mesh, 16)
    return params, images, plain, fm.make_predictor(model, mesh, 16, **tta)


@pytest.mark.slow
def test_flip_tta_averages_the_probabilities_of_the_image_and_its_mirror():
    params, images, plain, tta = smoke_predictors(0, flip_tta=True)
    p = jax.nn.softmax(plain(params, images), -1)
    p_mirror = jax.nn.softmax(plain(params, np.ascontiguousarray(images[:, :, ::-1])), -1)
    np.testing.assert_allclose(np.exp(tta(params, images)), (p + p_mirror) / 2, atol=1e-6)
    assert not np.allclose(p, p_mirror, atol=1e-3)  # the mirror image really differs


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The definition: pixel (i, j) of the result is pixel (i - dy, j - dx) of the image,
    0 (black) where that lies outside."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = images[:, i - dy, j - dx]
    return out


@pytest.mark.slow
def test_shift_tta_averages_the_probabilities_of_every_shifted_and_mirrored_view():
    params, images, plain, tta = smoke_predictors(1, flip_tta=True, shift_tta=1)
    views = augment.tta_views(True, 1)
    assert len(views) == 18 and len(set(views)) == 18
    expected = np.mean(
        [
            jax.nn.softmax(plain(params, shifted(images[:, :, ::-1] if m else images, dy, dx)))
            for dy, dx, m in views
        ],
        axis=0,
    )
    np.testing.assert_allclose(np.exp(tta(params, images)), expected, atol=1e-6)
    one = np.zeros((1, 28, 28, 1), np.uint8)
    one[0, 5, 7] = 255
    moved = augment.shift(fashion_mnist.normalize(jnp.asarray(one)), 1, -2, fm.BLACK)
    np.testing.assert_allclose(moved, fashion_mnist.normalize(shifted(one, 1, -2)), atol=1e-6)
    assert np.argmax(np.asarray(moved).reshape(-1)) == 6 * 28 + 5
    with pytest.raises(ValueError, match="eval.shift_tta=-1 must be >= 0"):
        augment.tta_views(True, -1)

"""vision.augment against direct numpy definitions: a crop is a window of the padded image,
a flip a mirror, a shift moves pixel (i, j) to (i + dy, j + dx), and TTA averages the
probabilities of the listed views."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vision import augment


def np_shift(x: np.ndarray, dy: int, dx: int, value: float) -> np.ndarray:
    """Pixel (i, j) of the result is pixel (i - dy, j - dx) of ``x``, ``value`` outside."""
    out = np.full_like(x, value)
    h, w = x.shape[1:3]
    for i, j in itertools.product(range(h), range(w)):
        if 0 <= i - dy < h and 0 <= j - dx < w:
            out[:, i, j] = x[:, i - dy, j - dx]
    return out


def images(b=64, h=5, w=6, c=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, h, w, c)).astype(np.float32)


def test_random_crop_is_a_window_of_the_padded_image_at_every_offset():
    x, p, value = images(), 1, -0.81
    crop = jax.jit(augment.random_crop, static_argnums=(2, 3))
    out = np.asarray(crop(jnp.asarray(x), jax.random.key(1), p, value))
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=value)
    offsets = []
    for o, q in zip(out, padded, strict=True):
        hits = [
            (i, j)
            for i in range(2 * p + 1)
            for j in range(2 * p + 1)
            if np.array_equal(o, q[i : i + 5, j : j + 6])
        ]
        assert len(hits) == 1
        offsets.append(hits[0])
    assert set(offsets) == set(itertools.product(range(3), range(3)))  # 64 draws, 9 offsets


def test_random_flip_mirrors_about_half_of_the_images():
    x = images(b=400)
    out = np.asarray(augment.random_flip(jnp.asarray(x), jax.random.key(2)))
    mirrored = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x, strict=True)])
    same = np.array([np.array_equal(o, i) for o, i in zip(out, x, strict=True)])
    assert (mirrored ^ same).all()
    assert abs(mirrored.mean() - 0.5) < 4 * np.sqrt(0.25 / len(x))


def test_shift_matches_the_definition_and_pads_with_the_value():
    x = images(b=2)
    for dy, dx in [(0, 0), (1, 0), (0, -2), (-1, 2), (3, 3)]:
        out = np.asarray(augment.shift(jnp.asarray(x), dy, dx, value=-2.5))
        np.testing.assert_array_equal(out, np_shift(x, dy, dx, -2.5))


def test_augment_pads_crops_with_black_in_standardised_pixels():
    mean, std = 0.25, 0.5  # black = -0.5
    x = jnp.full((128, 4, 4, 1), 3.0)
    crop = jax.jit(lambda x, rng: augment.augment(x, rng, crop_pad=1, mean=mean, std=std))
    out = np.asarray(crop(x, jax.random.key(0)))
    assert set(np.unique(out)) == {-0.5, 3.0}
    assert np.array_equal(np.asarray(augment.augment(x, jax.random.key(0))), np.asarray(x))


def test_random_erase_fills_with_standardised_uniform_pixels():
    mean, std = 0.3, 0.4
    x = jnp.full((200, 8, 8, 1), 9.0)
    erase = jax.jit(lambda x, rng: augment.random_erase(x, rng, 1.0, mean=mean, std=std))
    out = np.asarray(erase(x, jax.random.key(4)))
    changed = out != 9.0
    assert changed.any((1, 2, 3)).all()  # prob 1: every image has a rectangle
    pixels = out[changed] * std + mean
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0 and abs(pixels.mean() - 0.5) < 0.03


def test_tta_views_and_logits_average_the_probabilities_of_the_views():
    views = augment.tta_views(True, 1)
    assert len(views) == 18 and len(set(views)) == 18
    assert augment.tta_views(False, 0) == [(0, 0, False)]
    with pytest.raises(ValueError, match="eval.shift_tta=-1 must be >= 0"):
        augment.tta_views(True, -1)
    x = images(b=3, h=4, w=4, c=1)
    w = np.random.default_rng(1).normal(size=(16, 5)).astype(np.float32)
    classify = lambda v: jnp.reshape(v, (v.shape[0], -1)) @ w  # [b, 5]
    value = -1.0
    expected = np.mean(
        [
            jax.nn.softmax(classify(np_shift(x[:, :, ::-1] if m else x, dy, dx, value)))
            for dy, dx, m in views
        ],
        axis=0,
    )
    got = jax.jit(lambda x: augment.tta_logits(classify, x, views, value))(jnp.asarray(x))
    np.testing.assert_allclose(np.exp(got), expected, rtol=1e-5, atol=1e-6)
    one = augment.tta_logits(classify, jnp.asarray(x), [(0, 0, False)], value)
    np.testing.assert_allclose(one, classify(x), rtol=1e-6)  # one view: the logits

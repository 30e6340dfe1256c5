"""Image augmentation on the device, for training and for test-time augmentation (TTA).

Images are standardised ``[b, h, w, c]`` arrays: a pixel ``p`` in ``[0, 1]`` is stored as
``(p - mean) / std``, so black (the background that padding and shifts uncover) is
``background(mean, std) = -mean / std``. Training augmentation (``augment``) is drawn from
the step's rng inside the loss, so a resumed run sees the same augmented batches:

* ``random_crop``: pad each side by ``pad`` pixels of background, then crop a random window
  of the original size (the random-crop augmentation of ResNet / ViT training);
* ``random_flip``: mirror left-right with chance 1/2;
* ``random_erase``: random erasing (Zhong et al. 2020).

Test time: ``tta_views`` lists the shifted and mirrored views, ``shift`` moves an image by
whole pixels, and ``tta_logits`` averages a classifier's probabilities over the views.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def background(mean: float = 0.0, std: float = 1.0) -> float:
    """The standardised value of a black pixel."""
    return -mean / std


def pad(x: jax.Array, width: int, value: float = 0.0) -> jax.Array:
    """``[b, h, w, c]`` -> ``[b, h + 2 width, w + 2 width, c]``, the border ``value``."""
    return jnp.pad(x, ((0, 0), (width, width), (width, width), (0, 0)), constant_values=value)


def random_crop(x: jax.Array, rng: jax.Array, width: int, value: float = 0.0) -> jax.Array:
    """Each image padded by ``width`` pixels of ``value`` and cropped back to its size at a
    uniform offset in ``[0, 2 width]`` along each axis."""
    b, h, w, c = x.shape
    padded = pad(x, width, value)  # [b, h + 2p, w + 2p, c]
    offsets = jax.random.randint(rng, (b, 2), 0, 2 * width + 1)  # [b, 2]
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets
    )


def random_flip(x: jax.Array, rng: jax.Array) -> jax.Array:
    """Each image mirrored left-right with chance 1/2."""
    mirrored = jax.random.bernoulli(rng, 0.5, (x.shape[0], 1, 1, 1))  # [b, 1, 1, 1]
    return jnp.where(mirrored, x[:, :, ::-1], x)


def random_erase(
    x: jax.Array,
    rng: jax.Array,
    prob: float,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 3.3),
    mean: float = 0.0,
    std: float = 1.0,
) -> jax.Array:
    """Random erasing (Zhong et al. 2020) with the paper's ranges: with chance ``prob`` an
    image gets one rectangle of ``area`` x its pixels and height/width ratio in ``aspect``
    (log-uniform), clipped to the image, at a uniform position, filled with uniform random
    pixels in ``[0, 1]`` standardised by ``mean`` and ``std`` like the image."""
    b, h, w, _ = x.shape
    k_on, k_area, k_aspect, k_y, k_x, k_fill = jax.random.split(rng, 6)
    on = jax.random.bernoulli(k_on, prob, (b,))
    s = jax.random.uniform(k_area, (b,), minval=area[0], maxval=area[1]) * (h * w)
    r = jnp.exp(
        jax.random.uniform(k_aspect, (b,), minval=np.log(aspect[0]), maxval=np.log(aspect[1]))
    )
    eh = jnp.clip(jnp.round(jnp.sqrt(s * r)), 1, h).astype(jnp.int32)  # [b]
    ew = jnp.clip(jnp.round(jnp.sqrt(s / r)), 1, w).astype(jnp.int32)
    y0 = jnp.floor(jax.random.uniform(k_y, (b,)) * (h - eh + 1)).astype(jnp.int32)
    x0 = jnp.floor(jax.random.uniform(k_x, (b,)) * (w - ew + 1)).astype(jnp.int32)
    rows, cols = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
    in_rows = (rows >= y0[:, None]) & (rows < (y0 + eh)[:, None])  # [b, h]
    in_cols = (cols >= x0[:, None]) & (cols < (x0 + ew)[:, None])  # [b, w]
    mask = on[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]  # [b, h, w]
    fill = (jax.random.uniform(k_fill, x.shape) - mean) / std
    return jnp.where(mask[..., None], fill.astype(x.dtype), x)


def augment(
    x: jax.Array,
    rng: jax.Array,
    *,
    crop_pad: int = 0,
    flip: bool = False,
    erase_prob: float = 0.0,
    mean: float = 0.0,
    std: float = 1.0,
) -> jax.Array:
    """``random_crop`` (``crop_pad`` > 0, padding with black), ``random_flip`` (``flip``) and
    ``random_erase`` (``erase_prob`` > 0), in that order, independently per image.
    ``x``: ``[b, h, w, c]`` standardised with ``mean`` and ``std``."""
    crop_rng, flip_rng = jax.random.split(rng)
    if crop_pad:
        x = random_crop(x, crop_rng, crop_pad, background(mean, std))
    if flip:
        x = random_flip(x, flip_rng)
    if erase_prob:
        x = random_erase(x, jax.random.fold_in(rng, 2), erase_prob, mean=mean, std=std)
    return x


def shift(x: jax.Array, dy: int, dx: int, value: float = 0.0) -> jax.Array:
    """``x`` ``[b, h, w, c]`` moved down by ``dy`` and right by ``dx`` pixels (negative: up /
    left); the uncovered border is ``value`` (the background, as in the crops)."""
    if not (dy or dx):
        return x
    _, h, w, _ = x.shape
    p = max(abs(dy), abs(dx))
    return pad(x, p, value)[:, p - dy : p - dy + h, p - dx : p - dx + w]


def tta_views(flip: bool, max_shift: int) -> list[tuple[int, int, bool]]:
    """``(dy, dx, mirrored)`` of every test-time view: all shifts in ``[-max_shift,
    max_shift]`` along both axes, each also mirrored when ``flip``; ``[(0, 0, False)]`` is
    no TTA."""
    if max_shift < 0:
        raise ValueError(f"eval.shift_tta={max_shift} must be >= 0")
    offsets = range(-max_shift, max_shift + 1)
    mirrors = (False, True) if flip else (False,)
    return [(dy, dx, m) for dy in offsets for dx in offsets for m in mirrors]


def tta_logits(
    classify: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    views: list[tuple[int, int, bool]],
    value: float = 0.0,
) -> jax.Array:
    """``classify(x)`` ``[b, classes]`` for one view; for several, the log of the mean of the
    class probabilities over ``views`` (mirror, then shift with ``value`` uncovered)."""
    if len(views) == 1 and views[0] == (0, 0, False):
        return classify(x)
    log_p = [
        jax.nn.log_softmax(classify(shift(x[:, :, ::-1] if m else x, dy, dx, value)))
        for dy, dx, m in views
    ]  # each [b, classes]
    return jax.nn.logsumexp(jnp.stack(log_p), axis=0) - jnp.log(len(views))

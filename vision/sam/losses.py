"""SAM's training objective and the simulated interactive prompts (paper appendix A,
"Losses and training" and "Training algorithm").

* Mask loss: focal loss (Lin et al. 2017, ``alpha = 0.25``, ``gamma = 2``, the values
  DETR/MaskFormer use, which the paper follows) and dice loss (Milletari et al. 2016) in a
  20 : 1 ratio. With several output masks only the lowest mask loss is backpropagated, so
  each output is free to specialise on one interpretation of an ambiguous prompt.
* IoU head: mean squared error between each predicted IoU and the IoU of that mask
  (thresholded at 0) with the ground truth, weight 1.
* Interactive prompting: the first prompt is a foreground point drawn uniformly from the
  ground-truth mask, or its bounding box with noise (standard deviation 10% of the box side,
  at most 20 pixels per coordinate); each later point is drawn uniformly from the error
  region between the previous prediction and the ground truth, labelled foreground where the
  error is a false negative and background where it is a false positive.

Masks are ``[..., H, W]``; points are integer pixel coordinates ``(x, y)`` in the same frame
(the prompt encoder adds half a pixel to reach the centre).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def sigmoid_focal_loss(
    logits: Array, targets: Array, alpha: float = 0.25, gamma: float = 2.0
) -> Array:
    """Mean over the last two axes of ``-alpha_t (1 - p_t)^gamma log p_t``: ``[...]``."""
    logits = logits.astype(jnp.float32)
    t = targets.astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    ce = jnp.maximum(logits, 0) - logits * t + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.mean(axis=(-2, -1))


def dice_loss(logits: Array, targets: Array, smooth: float = 1.0) -> Array:
    """``1 - (2 |p t| + s) / (|p| + |t| + s)`` over the last two axes with ``p = sigmoid``."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    t = targets.astype(jnp.float32)
    inter = (p * t).sum(axis=(-2, -1))
    return 1.0 - (2.0 * inter + smooth) / (p.sum(axis=(-2, -1)) + t.sum(axis=(-2, -1)) + smooth)


def mask_iou(logits: Array, targets: Array) -> Array:
    """IoU of ``logits > 0`` with boolean ``targets`` over the last two axes (1 if both empty)."""
    pred = logits > 0
    t = targets.astype(bool)
    inter = (pred & t).sum(axis=(-2, -1))
    union = (pred | t).sum(axis=(-2, -1))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def sam_loss(
    mask_logits: Array,
    iou_pred: Array,
    targets: Array,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """Scalar loss and metrics for ``mask_logits [b, m, H, W]``, ``iou_pred [b, m]`` and
    ground truth ``targets [b, H, W]``. The mask loss is the minimum over the ``m`` outputs
    (per example); the IoU loss covers every output; both are averaged over the batch."""
    t = targets[:, None]  # [b, 1, H, W]
    focal = sigmoid_focal_loss(mask_logits, t)  # [b, m]
    dice = dice_loss(mask_logits, t)  # [b, m]
    per_mask = focal_weight * focal + dice_weight * dice  # [b, m]
    best = jnp.argmin(per_mask, axis=1)  # [b]
    mask_loss = jnp.take_along_axis(per_mask, best[:, None], axis=1)[:, 0]  # [b]
    true_iou = jax.lax.stop_gradient(mask_iou(mask_logits, t))  # [b, m]
    iou_loss = jnp.mean((iou_pred.astype(jnp.float32) - true_iou) ** 2, axis=1)  # [b]
    loss = jnp.mean(mask_loss + iou_weight * iou_loss)
    best_iou = jnp.take_along_axis(true_iou, best[:, None], axis=1)[:, 0]
    return loss, {
        "mask_loss": mask_loss.mean(),
        "iou_loss": iou_loss.mean(),
        "miou": best_iou.mean(),
        "best_mask": best,
    }


# --------------------------------------------------------------------------- prompts


def _uniform_pixel(key: Array, region: Array) -> tuple[Array, Array]:
    """One pixel drawn uniformly from each boolean ``region [b, H, W]``: its ``(x, y)``
    ``[b, 2]`` (float) and whether the region was non-empty ``[b]``."""
    b, h, w = region.shape
    flat = region.reshape(b, h * w)
    logits = jnp.where(flat, 0.0, -jnp.inf)
    idx = jax.random.categorical(key, jnp.where(flat.any(1, keepdims=True), logits, 0.0))
    xy = jnp.stack([idx % w, idx // w], axis=-1).astype(jnp.float32)  # [b, 2]
    return xy, flat.any(axis=1)


def first_point(key: Array, targets: Array) -> tuple[Array, Array]:
    """A foreground point drawn uniformly from each ground-truth mask: points ``[b, 2]`` and
    labels ``[b]`` (1, or -1 for an empty mask)."""
    xy, ok = _uniform_pixel(key, jnp.asarray(targets, bool))
    return xy, jnp.where(ok, 1, -1).astype(jnp.int32)


def error_point(key: Array, pred: Array, targets: Array) -> tuple[Array, Array]:
    """A corrective point drawn uniformly from the error region ``pred != targets``: points
    ``[b, 2]`` and labels ``[b]``: 1 on a false negative (missed object pixel), 0 on a false
    positive, -1 (padding) where the prediction is already exact."""
    pred, targets = jnp.asarray(pred, bool), jnp.asarray(targets, bool)
    xy, ok = _uniform_pixel(key, pred != targets)
    b, _, w = targets.shape
    x, y = xy[:, 0].astype(jnp.int32), xy[:, 1].astype(jnp.int32)
    missed = targets.reshape(b, -1)[jnp.arange(b), y * w + x]  # the error is a false negative
    return xy, jnp.where(ok, missed.astype(jnp.int32), -1)


def noisy_box(key: Array, targets: Array, noise: float = 0.1, max_noise: float = 20.0) -> Array:
    """Each mask's bounding box ``[b, 4]`` (x0, y0, x1, y1; inclusive pixels) with Gaussian
    noise of ``noise`` times the box side (at most ``max_noise`` pixels) per coordinate,
    clipped to the image and kept ordered."""
    b, h, w = targets.shape
    t = jnp.asarray(targets, bool)
    rows, cols = t.any(axis=2), t.any(axis=1)  # [b, H], [b, W]
    x0, y0 = jnp.argmax(cols, axis=1), jnp.argmax(rows, axis=1)
    x1, y1 = w - 1 - jnp.argmax(cols[:, ::-1], axis=1), h - 1 - jnp.argmax(rows[:, ::-1], axis=1)
    box = jnp.stack([x0, y0, x1, y1], axis=-1).astype(jnp.float32)  # [b, 4]
    side = jnp.stack([x1 - x0, y1 - y0, x1 - x0, y1 - y0], axis=-1).astype(jnp.float32)
    std = jnp.minimum(noise * side, max_noise)
    box = box + std * jax.random.normal(key, box.shape)
    box = jnp.clip(box, 0.0, jnp.asarray([w - 1, h - 1, w - 1, h - 1], jnp.float32))
    lo, hi = jnp.minimum(box[:, :2], box[:, 2:]), jnp.maximum(box[:, :2], box[:, 2:])
    return jnp.concatenate([lo, hi], axis=-1)

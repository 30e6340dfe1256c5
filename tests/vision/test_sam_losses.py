"""SAM losses and interactive prompts: focal and dice losses equal their definitions, the
mask loss backpropagates only through the best of the multimask outputs, the IoU loss
targets each mask's true IoU; corrective points come from the error region only (uniformly,
labelled by the kind of error), first points from the object, boxes around it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vision.sam import losses


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_focal_and_dice_equal_definitions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 5, 6)) * 3
    targets = rng.random((3, 2, 5, 6)) < 0.4
    p, t = _sigmoid(logits), targets.astype(float)
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = np.where(targets, p, 1 - p)
    a_t = np.where(targets, 0.25, 0.75)
    want_focal = (a_t * (1 - p_t) ** 2 * ce).mean(axis=(-2, -1))
    got = losses.sigmoid_focal_loss(jnp.asarray(logits, jnp.float32), targets)
    np.testing.assert_allclose(got, want_focal, rtol=1e-5, atol=1e-6)
    want_dice = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
    got = losses.dice_loss(jnp.asarray(logits, jnp.float32), targets)
    np.testing.assert_allclose(got, want_dice, rtol=1e-5, atol=1e-6)


def test_sam_loss_backpropagates_the_best_mask_only():
    rng = np.random.default_rng(1)
    targets = np.zeros((2, 8, 8), bool)
    targets[:, 2:6, 2:6] = True
    logits = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    logits[0, 2] = np.where(targets[0], 5.0, -5.0)  # example 0: mask 2 is right
    logits[1, 0] = np.where(targets[1], 4.0, -4.0)  # example 1: mask 0 is right
    iou_pred = jnp.asarray([[0.1, 0.2, 0.9], [0.5, 0.5, 0.5]])

    def f(lg, ip):
        return losses.sam_loss(lg, ip, jnp.asarray(targets))

    (loss, metrics), (g_logits, g_iou) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(logits), iou_pred
    )
    np.testing.assert_array_equal(metrics["best_mask"], [2, 0])
    norms = np.abs(np.asarray(g_logits)).sum(axis=(-2, -1))  # [2, 3]
    assert norms[0, 2] > 0 and norms[1, 0] > 0
    np.testing.assert_array_equal(norms[0, :2], 0.0)
    np.testing.assert_array_equal(norms[1, 1:], 0.0)
    true_iou = np.asarray(losses.mask_iou(jnp.asarray(logits), targets[:, None]))
    assert true_iou[0, 2] == 1.0 and true_iou[1, 0] == 1.0
    np.testing.assert_allclose(g_iou, 2 * (iou_pred - true_iou) / 3 / 2, rtol=1e-5)
    per_mask = 20 * losses.sigmoid_focal_loss(logits, targets[:, None]) + losses.dice_loss(
        logits, targets[:, None]
    )
    want = np.mean(np.min(per_mask, 1) + np.mean((iou_pred - true_iou) ** 2, 1))
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_error_points_come_from_the_error_region_uniformly():
    target = np.zeros((1, 6, 7), bool)
    target[0, 1:4, 1:5] = True
    pred = np.zeros_like(target)
    pred[0, 2:5, 3:6] = True  # misses some object pixels, adds some background
    error = pred != target
    keys = jax.random.split(jax.random.key(0), 3000)
    pts, labels = jax.vmap(lambda k: losses.error_point(k, pred, target))(keys)
    pts, labels = np.asarray(pts)[:, 0].astype(int), np.asarray(labels)[:, 0]
    x, y = pts[:, 0], pts[:, 1]
    assert error[0, y, x].all()  # every draw lies in the error region
    np.testing.assert_array_equal(labels, target[0, y, x].astype(int))  # FN -> 1, FP -> 0
    counts = np.zeros(error.shape[1:])
    np.add.at(counts, (y, x), 1)
    n = error.sum()
    expected = len(keys) / n
    assert (np.abs(counts[error[0]] - expected) < 5 * np.sqrt(expected)).all()  # uniform
    exact_pts, exact_labels = losses.error_point(jax.random.key(1), target, target)
    assert int(exact_labels[0]) == -1  # nothing to correct: a padding point


def test_first_points_and_boxes_lie_on_the_object():
    target = np.zeros((2, 10, 12), bool)
    target[0, 2:7, 3:9] = True
    target[1, 5:6, 1:2] = True
    keys = jax.random.split(jax.random.key(2), 200)
    pts, labels = jax.vmap(lambda k: losses.first_point(k, target))(keys)
    pts = np.asarray(pts).astype(int)
    assert target[np.arange(2)[None, :], pts[..., 1], pts[..., 0]].all()
    assert (np.asarray(labels) == 1).all()
    box = losses.noisy_box(jax.random.key(3), target, noise=0.0)
    np.testing.assert_array_equal(box, [[3, 2, 8, 6], [1, 5, 1, 5]])
    boxes = np.asarray(jax.vmap(lambda k: losses.noisy_box(k, target))(keys))
    assert (boxes[..., 2:] >= boxes[..., :2]).all()
    assert np.abs(boxes[:, 0] - [3, 2, 8, 6]).max() < 10 * 0.1 * 6  # 10 std (10% of side 6)

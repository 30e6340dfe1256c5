"""Losses against their definitions: the fused projection + cross-entropy vs the composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.losses import cross_entropy, projected_cross_entropy


def _inputs(dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (3, 7, 16)).astype(dtype)  # [batch, len, d]
    w = (0.3 * jax.random.normal(k[1], (50, 16))).astype(dtype)  # [vocab, d]
    targets = jax.random.randint(k[2], (3, 7), 0, 50)
    weights = (jax.random.uniform(k[3], (3, 7)) > 0.3).astype(jnp.float32)
    return x, w, targets, weights


def _mean(loss):
    def f(x, w, targets, weights):
        total, count = loss(x, w, targets, weights)[:2]
        return total / count

    return f


def _composed(x, w, targets, weights):
    logits = jnp.einsum("btd,vd->btv", x.astype(jnp.float32), w.astype(jnp.float32))
    return cross_entropy(logits, targets, weights)


@pytest.mark.slow
def test_projected_cross_entropy_equals_the_composition():
    args = _inputs()
    total, count, nll = projected_cross_entropy(*args)
    np.testing.assert_allclose((total, count), _composed(*args), rtol=1e-6)
    assert float(nll) == float(total)  # no smoothing: the loss is the NLL
    g_new = jax.grad(_mean(projected_cross_entropy), (0, 1))(*args)
    g_ref = jax.grad(_mean(_composed), (0, 1))(*args)
    for new, ref in zip(g_new, g_ref, strict=True):
        np.testing.assert_allclose(new, ref, atol=1e-6)
    # masked-out tokens get no gradient
    weights = args[3]
    assert float(jnp.abs(g_new[0][weights == 0]).max()) == 0.0


def test_projected_cross_entropy_in_bfloat16_keeps_dtypes():
    dtype = jnp.bfloat16
    x, w, targets, weights = _inputs(dtype)
    total, count, _ = projected_cross_entropy(x, w, targets, weights)
    assert total.dtype == jnp.float32  # logits accumulate in float32
    np.testing.assert_allclose(total, _composed(x, w, targets, weights)[0], rtol=1e-2)
    dx, dw = jax.grad(_mean(projected_cross_entropy), (0, 1))(x, w, targets, weights)
    assert dx.dtype == dtype and dw.dtype == dtype


def test_projected_cross_entropy_is_stable_for_large_logits():
    """Logits in the hundreds (exp overflows float32 past ~88): the max is taken out first."""
    x, w, targets, weights = _inputs()
    w = 200.0 * w
    total, _, _ = projected_cross_entropy(x, w, targets, weights)
    assert np.isfinite(float(total))
    np.testing.assert_allclose(total, _composed(x, w, targets, weights)[0], rtol=1e-6)
    g_new = jax.grad(_mean(projected_cross_entropy), (0, 1))(x, w, targets, weights)
    g_ref = jax.grad(_mean(_composed), (0, 1))(x, w, targets, weights)
    for new, ref in zip(g_new, g_ref, strict=True):
        np.testing.assert_allclose(new, ref, atol=1e-5 * float(jnp.abs(ref).max()))


def test_projected_cross_entropy_gradient_with_repeated_targets():
    """The one-hot term of ``dw`` is a scatter-add: tokens sharing a target must all count."""
    x, w, _, weights = _inputs()
    targets = jnp.full((3, 7), 4).at[0, :3].set(9)
    g_new = jax.grad(_mean(projected_cross_entropy), (0, 1))(x, w, targets, weights)
    g_ref = jax.grad(_mean(_composed), (0, 1))(x, w, targets, weights)
    for new, ref in zip(g_new, g_ref, strict=True):
        np.testing.assert_allclose(new, ref, atol=1e-6)


def test_projected_cross_entropy_bfloat16_gradient_is_close():
    x, w, targets, weights = _inputs(jnp.bfloat16)
    g_new = jax.grad(_mean(projected_cross_entropy), (0, 1))(x, w, targets, weights)
    g_ref = jax.grad(_mean(_composed), (0, 1))(x, w, targets, weights)
    for new, ref in zip(g_new, g_ref, strict=True):
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(new.astype(jnp.float32), ref, atol=2e-2 * scale)


def test_projected_cross_entropy_with_label_smoothing():
    """Smoothed loss and unsmoothed NLL, values and gradients (through both outputs at once)
    against ``cross_entropy`` of the logits (torch's ``label_smoothing`` definition)."""
    x, w, targets, weights = _inputs()
    targets = targets.at[0, :3].set(5)  # repeated targets

    def combine(smoothed, nll, count):
        return smoothed / count + 0.3 * nll / count

    def new(x, w):
        total, count, nll = projected_cross_entropy(x, w, targets, weights, 0.1)
        return combine(total, nll, count)

    def ref(x, w):
        logits = jnp.einsum("btd,vd->btv", x, w)
        total, count = cross_entropy(logits, targets, weights, label_smoothing=0.1)
        return combine(total, cross_entropy(logits, targets, weights)[0], count)

    np.testing.assert_allclose(new(x, w), ref(x, w), rtol=1e-6)
    for a, b in zip(jax.grad(new, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="label smoothing must be in"):
        projected_cross_entropy(x, w, targets, weights, 1.0)

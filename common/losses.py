"""Losses, computed in float32 whatever the compute dtype."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (nats) and the summed weight.

    logits ``[..., vocab]``, targets ``[...]`` int, weights ``[...]`` (default all ones).
    With ``label_smoothing = eps`` the target distribution is ``(1 - eps) * one_hot +
    eps / vocab`` (Szegedy et al. 2016; torch's ``cross_entropy(label_smoothing=...)``), so
    the loss per token is ``(1 - eps) * nll + eps * mean_v(-log p_v)``.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = logz - picked  # [...] negative log-likelihood
    if label_smoothing:
        uniform = logz - jnp.mean(logits, axis=-1)  # mean_v(-log p_v)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * uniform
    if weights is None:
        weights = jnp.ones_like(loss)
    weights = weights.astype(jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(weights)


def projected_cross_entropy(
    x: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``cross_entropy(x @ w.T, targets, weights, label_smoothing)`` with a hand-written
    backward pass; returns ``(summed loss, summed weight, summed unsmoothed NLL)`` (the first
    and last are equal without smoothing).

    x ``[..., d]`` (features), w ``[vocab, d]`` (a tied embedding / output projection),
    targets ``[...]`` int, weights ``[...]``. The same values as the composition; what
    differs is the work on the ``[tokens, vocab]`` arrays. Autodiff of the composition keeps
    ``exp(logits - max)``, scatters the target picks, and copies the logit gradient into a
    transposed buffer for ``dw``: five vocab-sized buffers and as many passes. Here the
    forward pass keeps only ``e = exp(logits - max)`` and its row sums ``s``, and the
    backward pass feeds ``e`` to the two matmuls directly, applying the softmax's row scale
    ``1 / s`` and the one-hot term on the small sides::

        g  = softmax - onehot = e / s - onehot          (rows scaled by the loss weights)
        dx = (e @ w) / s - w[targets]
        dw = ((x / s)^T e)^T - scatter(x at targets)

    so no pass over the vocab-sized arrays rebuilds ``g`` (one pass less each way than
    rebuilding it from saved logits), and ``dw`` is contracted over tokens
    directly (a ``[d, vocab]`` transpose instead of a ``[tokens, vocab]`` one). Label
    smoothing ``eps`` adds ``eps * (picked logit - mean logit)`` per token, and the mean
    logit is ``x . mean_v(w)``: its gradient is a rank-one term on the small sides too.
    Logits are accumulated in float32 whatever the dtype of ``x`` and
    ``w``. The token axes are flattened first (see ``common.layers.flat_dot_general`` for
    why).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    d = x.shape[-1]
    flat = (x.reshape(-1, d), w, targets.reshape(-1), weights.reshape(-1))
    return _projected_ce(*flat, float(label_smoothing))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _projected_ce(x, w, targets, weights, eps):  # x [tokens, d], targets, weights [tokens]
    return _projected_ce_fwd(x, w, targets, weights, eps)[0]


def _projected_ce_fwd(x, w, targets, weights, eps):
    logits = jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32)
    e, sums, logz = _exp_rows(logits)  # e [tokens, vocab]; sums, logz [tokens]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    nll = logz - picked  # [tokens]
    loss = nll
    if eps:  # (1 - eps) nll + eps (logz - mean logit)
        mean_logit = x.astype(jnp.float32) @ jnp.mean(w.astype(jnp.float32), axis=0)
        loss = nll + eps * (picked - mean_logit)
    out = (jnp.sum(loss * weights), jnp.sum(weights), jnp.sum(nll * weights))
    # e in [0, 1] is kept (and fed to the backward matmuls) in the compute dtype.
    return out, (x, w, targets, weights, e.astype(x.dtype), sums)


def _exp_rows(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(e, s, logsumexp)`` of finite ``[tokens, vocab]`` logits: ``e = exp(logits - max)``
    and its row sums ``s``, taken as a matrix-vector product: on a CPU, XLA hands an
    exponential feeding a row reduction to YNNPACK as one fused kernel, which is slower than
    a separate exponential and a matrix-vector product (``benchmarks/LOG.md``)."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - top)
    sums = e @ jnp.ones(logits.shape[-1], logits.dtype)
    return e, sums, top[..., 0] + jnp.log(sums)


def _projected_ce_bwd(eps, res, g):
    x, w, targets, weights, e, sums = res
    g_loss, _, g_nll = g  # the summed weight does not depend on x or w
    # Per token, the logit gradient is
    #   on_logz * softmax - on_picked * onehot - (on_mean / vocab) * ones:
    on_logz = weights * (g_loss + g_nll)
    on_picked = weights * ((1.0 - eps) * g_loss + g_nll)
    on_mean = weights * (eps * g_loss)
    row = (on_logz / sums)[:, None]  # the softmax's 1 / s, times its coefficient
    f32 = dict(preferred_element_type=jnp.float32)
    xf = x.astype(jnp.float32)
    ex = jnp.einsum("nv,vd->nd", e, w.astype(e.dtype), **f32)  # [tokens, d]
    dx = row * ex - on_picked[:, None] * w[targets].astype(jnp.float32)
    xs = (row * xf).astype(e.dtype)
    dw = jnp.einsum("nd,nv->dv", xs, e, **f32).T  # [vocab, d]
    dw = dw.at[targets].add(-on_picked[:, None] * xf)
    if eps:
        dx = dx - on_mean[:, None] * jnp.mean(w.astype(jnp.float32), axis=0)
        dw = dw - (on_mean @ xf / w.shape[0])[None, :]
    return dx.astype(x.dtype), dw.astype(w.dtype), None, jnp.zeros_like(weights)


_projected_ce.defvjp(_projected_ce_fwd, _projected_ce_bwd)

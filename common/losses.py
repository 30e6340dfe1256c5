"""Losses, computed in float32 whatever the compute dtype."""

from __future__ import annotations

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
    x: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``cross_entropy(x @ w.T, targets, weights)`` with a hand-written backward pass.

    x ``[..., d]`` (features), w ``[vocab, d]`` (a tied embedding / output projection),
    targets ``[...]`` int, weights ``[...]``. The same value as the composition; what differs
    is the work on the ``[tokens, vocab]`` arrays. Autodiff of the composition keeps
    ``exp(logits - max)``, scatters the target picks, and copies the logit gradient into a
    transposed buffer for ``dw``: five vocab-sized buffers and as many passes. Here the
    forward pass keeps only ``e = exp(logits - max)`` and its row sums ``s``, and the
    backward pass feeds ``e`` to the two matmuls directly, applying the softmax's row scale
    ``1 / s`` and the one-hot term on the small sides::

        g  = softmax - onehot = e / s - onehot          (rows scaled by the loss weights)
        dx = (e @ w) / s - w[targets]
        dw = ((x / s)^T e)^T - scatter(x at targets)

    so no pass over the vocab-sized arrays rebuilds ``g`` (one pass less each way than
    rebuilding it from saved logits: 2.53 -> 2.48 s for forward + backward at the GPT
    benchmark's ``[4096, 384] x [384, 50257]``), and ``dw`` is contracted over tokens
    directly (a ``[d, vocab]`` transpose instead of a ``[tokens, vocab]`` one). Logits are
    accumulated in float32 whatever the dtype of ``x`` and ``w``. The token axes are
    flattened first (see ``common.layers.flat_dot_general`` for why).
    """
    d = x.shape[-1]
    return _projected_ce(x.reshape(-1, d), w, targets.reshape(-1), weights.reshape(-1))


@jax.custom_vjp
def _projected_ce(x, w, targets, weights):  # x [tokens, d], targets and weights [tokens]
    return _projected_ce_fwd(x, w, targets, weights)[0]


def _projected_ce_fwd(x, w, targets, weights):
    logits = jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32)
    e, sums, logz = _exp_rows(logits)  # e [tokens, vocab]; sums, logz [tokens]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    out = (jnp.sum((logz - picked) * weights), jnp.sum(weights))
    # e in [0, 1] is kept (and fed to the backward matmuls) in the compute dtype.
    return out, (x, w, targets, weights, e.astype(x.dtype), sums)


def _exp_rows(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(e, s, logsumexp)`` of finite ``[tokens, vocab]`` logits: ``e = exp(logits - max)``
    and its row sums ``s``, taken as a matrix-vector product. On a CPU, XLA hands an
    exponential feeding a row reduction to YNNPACK as one fused kernel, which ran the GPT
    benchmark's ``[4096, 50257]`` rows in ~160 ms; as a separate exponential and a
    matrix-vector product they take ~60 ms (``benchmarks/README.md``)."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - top)
    sums = e @ jnp.ones(logits.shape[-1], logits.dtype)
    return e, sums, top[..., 0] + jnp.log(sums)


def _projected_ce_bwd(res, g):
    x, w, targets, weights, e, sums = res
    gw = weights * g[0]  # [tokens]; the summed weight does not depend on x or w
    row = (gw / sums)[:, None]  # the softmax's 1 / s, times the loss weight
    f32 = dict(preferred_element_type=jnp.float32)
    ex = jnp.einsum("nv,vd->nd", e, w.astype(e.dtype), **f32)  # [tokens, d]
    dx = row * ex - gw[:, None] * w[targets].astype(jnp.float32)
    xs = (row * x.astype(jnp.float32)).astype(e.dtype)
    dw = jnp.einsum("nd,nv->dv", xs, e, **f32).T  # [vocab, d]
    dw = dw.at[targets].add(-gw[:, None] * x.astype(jnp.float32))
    return dx.astype(x.dtype), dw.astype(w.dtype), None, jnp.zeros_like(weights)


_projected_ce.defvjp(_projected_ce_fwd, _projected_ce_bwd)

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
    is the backward pass of the vocab-sized part. Autodiff of the composition keeps
    ``exp(logits - max)``, scatters the target picks, and copies the ``[tokens, vocab]``
    logit gradient into a transposed buffer for ``dw``: five vocab-sized buffers. Here the
    backward pass rebuilds ``softmax - onehot`` from the saved logits and their logsumexp in
    one fusion and contracts it over tokens directly (``dw = (x^T g)^T``, a ``[d, vocab]``
    transpose instead of a ``[tokens, vocab]`` one): two vocab-sized buffers. Logits are
    accumulated in float32 whatever the dtype of ``x`` and ``w``. The token axes are
    flattened first (see ``common.layers.flat_dot_general`` for why).
    """
    d = x.shape[-1]
    return _projected_ce(x.reshape(-1, d), w, targets.reshape(-1), weights.reshape(-1))


@jax.custom_vjp
def _projected_ce(x, w, targets, weights):  # x [tokens, d], targets and weights [tokens]
    return _projected_ce_fwd(x, w, targets, weights)[0]


def _projected_logits(x, w):
    return jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32)


def _projected_ce_fwd(x, w, targets, weights):
    logits = _projected_logits(x, w)  # [tokens, vocab] float32
    logz = _logsumexp_rows(logits)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    out = (jnp.sum((logz - picked) * weights), jnp.sum(weights))
    return out, (x, w, targets, weights, logits, logz)


def _logsumexp_rows(logits: jax.Array) -> jax.Array:
    """``logsumexp(logits, axis=-1)`` for finite ``[tokens, vocab]`` logits, the row sums of
    ``exp(logits - max)`` taken as a matrix-vector product. On a CPU, XLA hands an
    exponential feeding a row reduction to YNNPACK as one fused kernel, which ran the GPT
    benchmark's ``[4096, 50257]`` rows in ~160 ms; as a separate exponential and a
    matrix-vector product they take ~60 ms (``benchmarks/README.md``)."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    sums = jnp.exp(logits - top) @ jnp.ones(logits.shape[-1], logits.dtype)
    return top[..., 0] + jnp.log(sums)


def _projected_ce_bwd(res, g):
    x, w, targets, weights, logits, logz = res
    g_total = g[0]  # the summed weight does not depend on x or w
    onehot = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
    scale = (weights * g_total)[..., None]
    g_logits = ((jnp.exp(logits - logz[..., None]) - onehot) * scale).astype(x.dtype)
    dx = jnp.einsum("nv,vd->nd", g_logits, w.astype(x.dtype)).astype(x.dtype)
    dw = jnp.einsum("nd,nv->dv", x, g_logits).T.astype(w.dtype)
    return dx, dw, None, jnp.zeros_like(weights)


_projected_ce.defvjp(_projected_ce_fwd, _projected_ce_bwd)

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

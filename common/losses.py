"""Losses, computed in float32 whatever the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (nats) and the summed weight.

    logits ``[..., vocab]``, targets ``[...]`` int, weights ``[...]`` (default all ones).
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = logz - picked  # [...]
    if weights is None:
        weights = jnp.ones_like(nll)
    return jnp.sum(nll * weights), jnp.sum(weights)

"""Boolean attention masks, ``True`` where a query may attend to a key.

Every mask here broadcasts against scores of shape ``[batch, heads, q_len, kv_len]``; the
helpers return ``[1 or batch, 1, q_len, kv_len]`` so they combine with ``&``.
"""

from __future__ import annotations

import jax.numpy as jnp


def causal_mask(q_positions: jnp.ndarray, kv_positions: jnp.ndarray) -> jnp.ndarray:
    """Query at position i sees keys at positions <= i.

    Args:
      q_positions: ``[q_len]`` or ``[batch, q_len]`` absolute positions of the queries.
      kv_positions: ``[kv_len]`` or ``[batch, kv_len]`` absolute positions of the keys.
    Returns:
      ``[batch or 1, 1, q_len, kv_len]`` boolean mask.
    """
    q = jnp.atleast_2d(q_positions)[:, None, :, None]  # [b, 1, q, 1]
    k = jnp.atleast_2d(kv_positions)[:, None, None, :]  # [b, 1, 1, k]
    return k <= q


def band_mask(q_positions: jnp.ndarray, kv_positions: jnp.ndarray, window: int) -> jnp.ndarray:
    """Locally banded causal mask: query i sees keys j with ``i - window < j <= i``.

    This is GPT-3's "locally banded sparse attention" (Brown et al. 2020, section 2.1)
    expressed as a mask over the dense score matrix.
    """
    q = jnp.atleast_2d(q_positions)[:, None, :, None]
    k = jnp.atleast_2d(kv_positions)[:, None, None, :]
    return (k <= q) & (k > q - window)


def padding_mask(kv_valid: jnp.ndarray) -> jnp.ndarray:
    """``kv_valid``: ``[batch, kv_len]`` bool, True for real tokens -> ``[batch, 1, 1, kv_len]``."""
    return kv_valid[:, None, None, :]


def combine(*masks: jnp.ndarray | None) -> jnp.ndarray | None:
    """Logical AND of the masks that are not None (None when all are)."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out

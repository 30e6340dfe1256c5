"""Positional embeddings: learned tables and the fixed sinusoids of Vaswani et al. (2017)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import sharding as sh


def sinusoidal_table(length: int, dim: int, max_timescale: float = 10_000.0) -> np.ndarray:
    """``[length, dim]`` table; sin on even channels, cos on odd (section 3.5 of the paper)."""
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {dim}")
    pos = np.arange(length, dtype=np.float64)[:, None]
    inv = np.exp(-np.log(max_timescale) * np.arange(0, dim, 2, dtype=np.float64) / dim)
    table = np.zeros((length, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(pos * inv)
    table[:, 1::2] = np.cos(pos * inv)
    return table.astype(np.float32)


class LearnedPositional(nn.Module):
    """A learned ``[max_len, dim]`` table, looked up at absolute ``positions``."""

    max_len: int
    dim: int
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), (None, sh.EMBED)),
            (self.max_len, self.dim),
            self.param_dtype,
        )
        return jnp.take(table, positions, axis=0).astype(self.dtype)  # [..., dim]

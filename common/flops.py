"""FLOP counting and the measured matmul peak that MFU is reported against."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp


@functools.cache
def measured_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Best achieved FLOP/s of one ``n x n @ n x n`` matmul on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def compiled_flops(fn: Any, *args: Any) -> float:
    """FLOPs of one call of ``fn(*args)`` from XLA's cost analysis of the compiled program."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", 0.0))

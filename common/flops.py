"""FLOP counting and the measured matmul peak that MFU is reported against."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@functools.cache
def measured_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Best achieved FLOP/s of one ``n x n @ n x n`` matmul over this process's devices.

    The rows of the left operand are split across the local devices (when ``n`` divides
    evenly), so a CPU exposed as several one-thread devices (``common.sharding.
    use_cpu_devices``) is measured with all its cores, as a data-parallel step uses them;
    on one device this is a plain matmul. A multi-process run's peak is this times
    ``jax.process_count()``.
    """
    devices = jax.local_devices()
    if n % len(devices):
        devices = devices[:1]
    mesh = Mesh(np.array(devices), ("rows",))
    a = jax.device_put(jnp.ones((n, n), dtype), NamedSharding(mesh, PartitionSpec("rows")))
    b = jax.device_put(jnp.ones((n, n), dtype), NamedSharding(mesh, PartitionSpec()))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def palm_flops_per_token(n_params: int, num_layers: int, seq_len: int, d_model: int) -> float:
    """Training FLOPs per token of a decoder, PaLM (Chowdhery et al., 2022) appendix B:
    ``6 N + 12 L T d``: forward and backward matmuls over the ``N`` parameters (without the
    position table, which is a lookup) plus attention's scores and weighted sums over a
    context of ``T`` tokens in each of ``L`` layers of width ``d``."""
    return 6.0 * n_params + 12.0 * num_layers * seq_len * d_model


def compiled_flops(fn: Any, *args: Any) -> float:
    """FLOPs of one call of ``fn(*args)`` from XLA's cost analysis of the compiled program."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", 0.0))

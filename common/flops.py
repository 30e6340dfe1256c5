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


def _cost_flops(cost: Any) -> float | None:
    """The ``"flops"`` entry of an XLA cost analysis (a dict, or a list of one per program,
    depending on the JAX version and backend); None where the analysis has none."""
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        return float(cost["flops"])
    return None


def lowered_flops(lowered: jax.stages.Lowered) -> float:
    """FLOPs of a lowered program from XLA's HLO cost analysis, compiling only as a fallback
    for backends whose lowered programs give no analysis (so counting a big preset need not
    compile it). ``compiled_flops`` analyses the optimised program instead."""
    for analyse in (lowered.cost_analysis, lambda: lowered.compile().cost_analysis()):
        flops = _cost_flops(analyse())
        if flops is not None:
            return flops
    raise RuntimeError("XLA's cost analysis gave no FLOPs for this program")


def compiled_flops(fn: Any, *args: Any) -> float:
    """FLOPs of one call of ``fn(*args)`` from XLA's cost analysis of the compiled (optimised)
    program; 0.0 where the analysis has no FLOPs entry."""
    flops = _cost_flops(jax.jit(fn).lower(*args).compile().cost_analysis())
    return 0.0 if flops is None else flops

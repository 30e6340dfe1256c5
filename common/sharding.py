"""Device mesh, logical-axis rules and placement of params and batches.

Models annotate params and activations with *logical* axis names (``embed``, ``mlp``,
``heads``, ``vocab``, ``batch``, ...). ``rules`` maps them onto the mesh axes ``data`` (pure
data parallelism: params replicated) and ``fsdp`` (data parallel with params sharded along
their ``embed`` dimension, ZeRO-3 style). The same code runs on one CPU, 8 simulated CPU
devices, a GPU host or a multi-host TPU pod.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Mesh axis names. Spell them through these constants, never as string literals, in
# modules, experiments and tests (``from common import sharding as sh``; ``sh.FSDP``).
DATA = "data"  # pure data parallelism: params replicated
FSDP = "fsdp"  # data parallelism with params sharded along EMBED (ZeRO-3)
MESH_AXES = (DATA, FSDP)

# Logical axis names that modules annotate params and activations with
# (``nn.with_logical_partitioning(init, (sh.EMBED, sh.MLP))``); DEFAULT_RULES maps them.
BATCH = "batch"  # examples
LENGTH = "length"  # sequence positions / tokens
EMBED = "embed"  # model width d_model
MLP = "mlp"  # feed-forward hidden width
HEADS = "heads"  # attention heads
KV = "kv"  # width of one head
VOCAB = "vocab"  # token vocabulary
NORM = "norm"  # LayerNorm scale and bias

# The residual stream's layout, [batch, length, d_model], constrained after every block.
ACTIVATIONS = (BATCH, LENGTH, EMBED)

# logical axis -> mesh axis (None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    (BATCH, MESH_AXES),
    (EMBED, FSDP),
    (LENGTH, None),
    (VOCAB, None),
    (MLP, None),
    (HEADS, None),
    (KV, None),
    (NORM, None),
)


def maybe_initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join a multi-process run (``jax.distributed.initialize``) when one is configured.

    Arguments default to the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; with none set this is a single-process
    run and nothing happens (on Cloud TPU pods JAX discovers the cluster by itself when
    ``coordinator="auto"``).
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    num_processes = num_processes or int(os.environ["JAX_NUM_PROCESSES"])
    process_id = process_id if process_id is not None else int(os.environ["JAX_PROCESS_ID"])
    # Collectives between CPU processes (tests, CPU clusters); GPUs and TPUs use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


CPU_DEVICE_FLAGS = ("--xla_force_host_platform_device_count", "--xla_cpu_multi_thread_eigen")


def use_cpu_devices(count: int) -> int:
    """Expose XLA's CPU backend as ``count`` devices of one thread each; returns the count.

    ``-1``: one device per core this process may run on; ``0`` (or ``1``): XLA's default
    of one device whose ops use every core. For models whose step is many small ops, data
    parallelism over one-thread devices keeps every core busy where intra-op threading of
    small ops does not (the Fashion-MNIST Swin step, for one). Accelerators are
    unaffected (the flags are the CPU backend's). Sets ``XLA_FLAGS``, so it must run before
    jax starts its backends. If ``XLA_FLAGS`` already names either flag of
    ``CPU_DEVICE_FLAGS``, the user's setting wins and nothing is changed.
    """
    from jax._src import xla_bridge

    if count < -1:
        raise ValueError(f"cpu_devices must be -1 (one per core), 0 or a count, got {count}")
    if count == -1:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = os.environ.get("XLA_FLAGS", "")
    if count <= 1 or any(f in flags for f in CPU_DEVICE_FLAGS):
        return count
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "use_cpu_devices must run before jax's backends start (before any jax.devices() "
            "or computation); set cpu_devices=0 or call it earlier"
        )
    os.environ["XLA_FLAGS"] = (
        f"{flags} {CPU_DEVICE_FLAGS[0]}={count} {CPU_DEVICE_FLAGS[1]}=false".strip()
    )
    return count


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over all devices; ``-1`` takes whatever the other axis leaves."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data / mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} devices")
    arr = np.asarray(devices).reshape(data, fsdp)
    # Auto axes: params and batches are placed with NamedSharding and XLA propagates the rest.
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def logical_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of (possibly ``nn.Partitioned``-boxed) abstract values."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch dimension split over every mesh axis, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(MESH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_batch_slice(global_batch: int) -> slice:
    """Rows of the global batch this process feeds (each process loads only its shard)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by {n} processes")
    per = global_batch // n
    return slice(i * per, (i + 1) * per)


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """Place this process's rows of a host batch (a tree of numpy arrays) on the mesh."""

    def put(x):
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)

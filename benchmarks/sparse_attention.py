"""Sparse attention against dense: forward+backward time, XLA temp memory and FLOPs vs n.

    python -m benchmarks.sparse_attention            # n = 1k ... 16k
    python -m benchmarks.sparse_attention --quick    # n = 1k, 2k

Config (issue 3): batch 1, 8 heads, head_dim 64, float32, CPU. Variants:

* ``dense``: ``common.attention.dot_product_attention(is_causal=True)``, the implementation a
  user would otherwise pick (XLA on CPU; cuDNN's fused attention on a GPU in half precision);
* ``masked <pattern>``: the same dense kernel with the pattern's ``[n, n]`` mask (built
  in-graph from iotas, so no n x n constant), i.e. the naive version of ours;
* ours from ``common.sparse_attention``: ``local`` (block 256, with look-back),
  ``compressed`` (kernel 3, stride 3), ``strided`` (l = 128) and ``fixed`` (l = 128, c = 8),
  the last two in ``"merged"`` mode (every head attends to A | B, the most work per call).

Each variant is jitted once as ``q, k, v, cotangent -> dq, dk, dv`` (forward inside);
``temp`` is ``compile().memory_analysis().temp_size_in_bytes`` and ``GFLOP`` XLA's cost
analysis of the same executable. Timings alternate between variants (one call of each per
round, best of the rounds); a variant whose buffers would not fit in the free RAM is
compiled but not run, and masked dense is timed only up to n = 4096 (beyond, a call takes
as long as dense's: tens of seconds). The last line is the ``RESULT`` of issue 3 (keys
named after the lengths measured: ``--quick`` reports 2k in place of 8k and 16k).
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import sparse_attention as sa
from common.attention import dot_product_attention
from common.flops import measured_matmul_peak

HEADS, HEAD_DIM, BATCH = 8, 64, 1
LOCAL_BLOCK = 256  # Liu et al.
SPARSE_L, SPARSE_C = 128, 8  # l ~ sqrt(n), c in {8, 16, 32} (Child et al. section 4.3)
COMPRESS_KERNEL, COMPRESS_STRIDE = 3, 3
LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 2048)
ROUNDS = {1024: 3, 2048: 3, 4096: 2, 8192: 2, 16384: 2}  # timing rounds (best of)
WARMUP_UP_TO = 2048  # one untimed call first at these lengths (at larger n a call is seconds)
MASKED_TIMED_UP_TO = 4096  # masked dense costs what dense costs: beyond this, compile only
SPARSE = ("local", "compressed", "strided", "fixed")
FIT_FRACTION = 0.7  # run a variant only if its buffers need less than this share of free RAM


def _dense(q, k, v, mask=None):
    if mask is None:
        return dot_product_attention(q, k, v, is_causal=True)
    return dot_product_attention(q, k, v, mask=mask[None, None])


def _compress(k, v, w):
    k_c = sa.compress_kv(k, w["k"], stride=COMPRESS_STRIDE)
    v_c = sa.compress_kv(v, w["v"], stride=COMPRESS_STRIDE)
    return k_c, v_c


def variants(n: int, weights) -> dict:
    """name -> ``f(q, k, v)``; masks are computed inside ``f`` (from iotas, under jit)."""
    local = dict(block=LOCAL_BLOCK)
    strided = dict(stride=SPARSE_L, mode="merged")
    fixed = dict(block=SPARSE_L, c=SPARSE_C, mode="merged")

    def masked_compressed(q, k, v):
        k_c, v_c = _compress(k, v, weights)
        return _dense(q, k_c, v_c, sa.compressed_mask(n, stride=COMPRESS_STRIDE))

    return {
        "dense": _dense,
        "masked local": lambda q, k, v: _dense(q, k, v, sa.local_mask(n, **local)),
        "masked compressed": masked_compressed,
        "masked strided": lambda q, k, v: _dense(q, k, v, sa.strided_mask(n, **strided)),
        "masked fixed": lambda q, k, v: _dense(q, k, v, sa.fixed_mask(n, **fixed)),
        "local": functools.partial(sa.local_attention, **local),
        "compressed": lambda q, k, v: sa.compressed_attention(
            q, *_compress(k, v, weights), stride=COMPRESS_STRIDE
        ),
        "strided": functools.partial(sa.strided_attention, **strided),
        "fixed": functools.partial(sa.fixed_attention, **fixed),
    }


def _forward_backward(fn):
    def step(q, k, v, cotangent):
        _, vjp = jax.vjp(fn, q, k, v)
        return vjp(cotangent)

    return step


def _free_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def measure(lengths, rounds=None, warmup=True):
    """Rows ``{n, name, temp, flops, time, skipped}`` for every length and variant."""
    rng = np.random.default_rng(0)
    feat = HEADS * HEAD_DIM
    weights = {
        name: jnp.asarray(rng.standard_normal((COMPRESS_KERNEL, feat, feat)) / math.sqrt(feat))
        for name in ("k", "v")
    }
    rows = []
    for n in lengths:
        shape = (BATCH, n, HEADS, HEAD_DIM)
        args = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4)]
        timed = []
        for name, fn in variants(n, weights).items():
            exe = jax.jit(_forward_backward(fn)).lower(*args).compile()
            mem = exe.memory_analysis()
            cost = exe.cost_analysis()
            cost = cost[0] if isinstance(cost, list | tuple) else cost
            row = dict(n=n, name=name, temp=mem.temp_size_in_bytes, flops=cost["flops"])
            row.update(times=[], time=None, skipped=None)
            if mem.temp_size_in_bytes + mem.output_size_in_bytes > FIT_FRACTION * _free_bytes():
                row["skipped"] = "no fit in RAM"
            elif name.startswith("masked") and n > MASKED_TIMED_UP_TO:
                row["skipped"] = "not timed"
            else:
                timed.append((exe, row))
            rows.append(row)
        if warmup and n <= WARMUP_UP_TO:
            for exe, _ in timed:
                jax.block_until_ready(exe(*args))
        quota = rounds or ROUNDS.get(n, 2)
        # Alternate: one call of each per round. The sparse variants take a round more (they
        # cost seconds where dense costs tens of seconds), for a steadier local_growth.
        extra = lambda row: int(rounds is None and row["name"] in SPARSE)
        for i in range(quota + 1):
            for exe, row in timed:
                if i < quota + extra(row):
                    start = time.perf_counter()
                    jax.block_until_ready(exe(*args))
                    row["times"].append(time.perf_counter() - start)
        for row in rows:
            if row["n"] == n:
                row["time"] = min(row["times"]) if row["times"] else None
                _print_row(row, rows)
    return rows


def _get(rows, n, name):
    return next((r for r in rows if r["n"] == n and r["name"] == name), None)


def _print_row(row, rows):
    dense = _get(rows, row["n"], "dense")
    t = f"{row['skipped']:>17s}" if row["time"] is None else f"{row['time'] * 1e3:17.1f}"
    speed = mfu = "-"
    if row["time"] is not None:
        mfu = f"{100 * row['flops'] / row['time'] / measured_matmul_peak():.0f}%"
        if dense["time"] is not None:
            speed = f"{dense['time'] / row['time']:.2f}x"
    print(
        f"{row['n']:6d}  {row['name']:18s}{t}  {row['temp'] / 2**20:10.1f}  "
        f"{row['flops'] / 1e9:9.1f}  {speed:>8s}  {dense['flops'] / row['flops']:7.2f}x  {mfu:>5s}",
        flush=True,
    )


def result_line(rows, lengths) -> str:
    mid = max(n for n in lengths if n <= 8192)  # 8k in the full run
    top = max(lengths)
    tag = lambda n: f"{n // 1024}k"

    def speed(name, n):
        d, r = _get(rows, n, "dense"), _get(rows, n, name)
        return float("nan") if d["time"] is None or r["time"] is None else d["time"] / r["time"]

    def flop_ratio(name, n):
        return _get(rows, n, "dense")["flops"] / _get(rows, n, name)["flops"]

    below = max(n for n in lengths if n < top)
    local = [_get(rows, n, "local")["time"] for n in (below, top)]
    growth = (local[1] / local[0]) ** (1 / math.log2(top / below))  # per doubling
    mem = _get(rows, top, "dense")["temp"] / _get(rows, top, "fixed")["temp"]
    return (
        f"RESULT fixed_speedup_{tag(mid)}={speed('fixed', mid):.2f} "
        f"fixed_flop_ratio_{tag(mid)}={flop_ratio('fixed', mid):.2f} "
        f"strided_speedup_{tag(mid)}={speed('strided', mid):.2f} "
        f"strided_flop_ratio_{tag(mid)}={flop_ratio('strided', mid):.2f} "
        f"local_growth={growth:.2f} fixed_mem_ratio_{tag(top)}={mem:.2f}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="n in {1024, 2048} only")
    parser.add_argument("--lengths", type=int, nargs="*", help="override the lengths")
    parser.add_argument("--rounds", type=int, help="timing rounds at every length")
    args = parser.parse_args(argv)
    lengths = tuple(args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS))
    print(
        f"batch {BATCH}, {HEADS} heads x {HEAD_DIM}, float32, {jax.devices()[0].platform}; "
        f"forward+backward; local block {LOCAL_BLOCK}; strided/fixed l={SPARSE_L}, "
        f"c={SPARSE_C}, merged; compressed kernel {COMPRESS_KERNEL} stride {COMPRESS_STRIDE}; "
        f"measured float32 matmul peak {measured_matmul_peak() / 1e9:.0f} GFLOP/s"
    )
    print(
        f"{'n':>6s}  {'variant':18s}{'time ms (best)':>17s}  {'temp MiB':>10s}  "
        f"{'GFLOP':>9s}  {'speedup':>8s}  {'FLOPs÷':>8s}  {'MFU':>5s}"
    )
    rows = measure(lengths, args.rounds or (2 if args.quick else None), warmup=not args.quick)
    print(
        "speedup = dense time / variant time; FLOPs÷ = dense FLOPs / variant FLOPs; "
        "MFU = FLOPs / time / measured matmul peak; "
        f"masked dense is timed up to n = {MASKED_TIMED_UP_TO} only (it costs what dense "
        "costs); 'no fit in RAM': compiled for its memory and FLOPs, never run"
    )
    print(result_line(rows, lengths))


if __name__ == "__main__":
    main()

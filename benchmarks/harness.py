"""What every side-by-side benchmark shares: the malloc settings, CPU time, alternating rounds.

Imports nothing heavy, so a benchmark can call ``reexec_with_malloc_env`` before jax or
torch are imported.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable

# The malloc settings every benchmark runs both sides under: see common/malloc.py.
from common.malloc import MALLOC_ENV, reexec_with_malloc_env  # noqa: F401


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def page_faults() -> int:
    """Minor + major page faults of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt


def warm_up(
    sides: dict[str, Callable[[int], float]], max_rounds: int, steps: int, quiet: int = 1000
) -> int:
    """Untimed calls of ``steps`` steps (as the timed rounds make them), sides alternating,
    until a round in which no side page-faults more than ``quiet`` times per step (at most
    ``max_rounds`` rounds); returns the rounds taken.

    With the malloc settings a warm step takes no page faults, but the sides share one heap:
    a step right after the other side's first steps often finds its freed memory reused and
    takes fresh pages (hundreds of thousands of faults, seconds of kernel time) until the
    heap's layout settles, which can take a few rounds. Back-to-back steps overlap (the next
    one is dispatched while the last runs) and need more memory than single ones, so the
    warm-up calls take as many steps as the timed ones (single-step warm-ups left the first
    timed rounds faulting; ``benchmarks/LOG.md``). The timed
    rounds should measure the settled steps; each still reports its faults.
    """
    for r in range(1, max_rounds + 1):
        worst = 0
        for f in sides.values():
            before = page_faults()
            f(steps)
            worst = max(worst, (page_faults() - before) // steps)
        print(f"  warm-up round {r}: most page faults per step {worst}", flush=True)
        if worst <= quiet:
            return r
    return max_rounds


def alternate(
    sides: dict[str, Callable[[int], float]],
    rounds: int,
    steps: int,
    between: Callable[[], None] | None = None,
    label: str = "round",
):
    """Rounds of ``steps`` calls per side, sides alternating who goes first.

    Returns ``{side: [wall s/call per round]}, {side: [CPU s/call per round]}``. Each round's
    line also shows the page faults per call: with the malloc settings a warm step takes
    none, and a round that does (memory given back and touched again) pays for them in
    kernel time, which the CPU seconds include.
    """
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    faults: dict[str, int] = {}
    names = list(sides)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            f, c, t = page_faults(), cpu_seconds(), time.perf_counter()
            sides[name](steps)
            wall[name].append((time.perf_counter() - t) / steps)
            cpu[name].append((cpu_seconds() - c) / steps)
            faults[name] = (page_faults() - f) // steps
        if between is not None:
            between()
        print(
            f"  {label} {r}: "
            + "  ".join(
                f"{n} {wall[n][-1]:.3f}s (cpu {cpu[n][-1]:.2f}s, {faults[n]} faults)" for n in names
            )
            + f"  load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    return wall, cpu

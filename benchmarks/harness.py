"""What every side-by-side benchmark shares: the malloc settings, CPU time, alternating rounds.

Imports nothing heavy, so a benchmark can call ``reexec_with_malloc_env`` before jax or
torch are imported.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable

# Large temporaries (a GPT's [tokens, 50257] logits and their gradient, ~0.8 GB each) are
# freshly mmapped and page-faulted on every step by glibc's default malloc: ~790k minor faults
# and ~1.6 CPU-s of kernel time per GPT train step here (torch: ~940k, ~2 s). Keeping freed
# memory in one arena removes that for both sides. glibc reads these variables at start-up
# only, so a benchmark re-executes itself once with them set (``--system-malloc`` skips it).
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
}


def reexec_with_malloc_env(module: str) -> None:
    """Re-run ``python -m <module> <args>`` with ``MALLOC_ENV`` unless it is already set."""
    if "--system-malloc" in sys.argv:
        return
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.environ.update(MALLOC_ENV)
        os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def alternate(
    sides: dict[str, Callable[[int], float]],
    rounds: int,
    steps: int,
    between: Callable[[], None] | None = None,
    label: str = "round",
):
    """Rounds of ``steps`` calls per side, sides alternating who goes first.

    Returns ``{side: [wall s/call per round]}, {side: [CPU s/call per round]}``.
    """
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            c, t = cpu_seconds(), time.perf_counter()
            sides[name](steps)
            wall[name].append((time.perf_counter() - t) / steps)
            cpu[name].append((cpu_seconds() - c) / steps)
        if between is not None:
            between()
        print(
            f"  {label} {r}: "
            + "  ".join(f"{n} {wall[n][-1]:.3f}s (cpu {cpu[n][-1]:.2f}s)" for n in names)
            + f"  load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    return wall, cpu

"""glibc malloc settings for training and benchmark processes, set by re-executing once.

Large temporaries (a GPT's ``[tokens, 50257]`` logits and their gradient; a vision model's
activations) are freshly ``mmap``-ed and page-faulted on every step by glibc's default
malloc, which costs kernel time on every step (``benchmarks/LOG.md``, "malloc"). Keeping
freed memory in one arena's heap removes that (all three variables are needed; any one alone
leaves the faults). glibc reads them at
start-up only, so a launcher re-executes the process once with them set.

Imports nothing heavy: call it before jax or torch are imported. Opt out with
``LANDMARKS_SYSTEM_MALLOC=1`` in the environment (or a benchmark's ``--system-malloc``).
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
}
OPT_OUT = "LANDMARKS_SYSTEM_MALLOC"


def wanted() -> bool:
    """Whether this process should run with ``MALLOC_ENV`` (not opted out)."""
    return os.environ.get(OPT_OUT, "") in ("", "0") and "--system-malloc" not in sys.argv


def reexec_with_malloc_env(module: str | None = None) -> None:
    """Re-run ``python -m <module> <args>`` with ``MALLOC_ENV`` unless it is set already.

    ``module`` defaults to the module ``python -m`` is running (``__main__``'s spec); a
    process started some other way (a script path, an interactive session) is left alone.
    """
    if not wanted() or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    if module is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is None or not spec.name:
            return
        module = spec.name
    os.environ.update(MALLOC_ENV)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])

"""The end of every experiment: ``results.json`` in the workdir and one ``RESULT`` line.

::

    from common import results

    summary = {"bits_per_char": bpc, "params": n_params, **result.summary()}
    results.write(workdir, summary, headline=("bits_per_char",))

``results.json`` is what ``docs/results.md`` is generated from, so every number an experiment
reports goes into it. Only process 0 writes, atomically (a temporary file renamed over the
old one), so a kill never leaves half a file. The printed line ``RESULT k1=v1 k2=v2`` holds
the ``headline`` keys, the figures a reader or a script greps for.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

FILENAME = "results.json"


def _plain(value: Any) -> Any:
    """JSON-able form: numpy scalars and arrays become Python numbers and lists; a
    non-finite float becomes None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return _plain(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e6 else f"{value:.4g}"
    return str(value).replace(" ", "_")


def write(
    workdir: str,
    summary: Mapping[str, Any],
    headline: Sequence[str] = (),
    filename: str = FILENAME,
) -> dict[str, Any]:
    """Write ``summary`` to ``workdir/filename`` (process 0, atomically) and print
    ``RESULT k=v ...`` for the ``headline`` keys; returns the JSON-able summary.

    A headline key missing from ``summary`` raises ``KeyError`` before anything is written.
    """
    missing = [k for k in headline if k not in summary]
    if missing:
        raise KeyError(f"headline keys {missing} are not in the results {sorted(summary)}")
    plain = _plain(dict(summary))
    if jax.process_index() != 0:
        return plain
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, filename)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(plain, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if headline:
        print("RESULT " + " ".join(f"{k}={_fmt(plain[k])}" for k in headline), flush=True)
    return plain

"""Run logs: TensorBoard events, a JSONL file and a progress bar (or plain lines).

Only process 0 writes. ``metrics.jsonl`` in the workdir has one JSON object per logged step
(``{"step": 100, "split": "train", "loss": ..., ...}``), easy to read back with pandas.

A resumed run starts again from its restored checkpoint, so the writer first drops the
records past that step (written after the checkpoint by the interrupted process, and about
to be written again) and any torn last line: the file always reads as one run, one record
per step and split.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.3e}"


def truncate_records(path: str, last_step: int) -> int:
    """Drops the records of ``path`` (a ``metrics.jsonl``) past ``last_step`` and lines that
    do not parse (a write cut by a kill); returns how many were dropped. The file is
    replaced atomically, so a kill here leaves the old or the new file, never a mix."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if step <= last_step and line.endswith("\n"):
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


class MetricWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and ``workdir/tb`` and shows progress.

    ``start_step``: the step training starts from (the restored checkpoint's, 0 for a fresh
    run); records of ``metrics.jsonl`` past it are dropped before writing.
    """

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        *,
        start_step: int = 0,
        progress_bar: bool | None = None,
    ):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        truncate_records(path, start_step)
        self._jsonl = open(path, "a")  # noqa: SIM115
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        if progress_bar is None:
            progress_bar = sys.stderr.isatty()
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)

    def write(self, step: int, scalars: dict[str, Any], split: str = "train") -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        record = {"step": step, "split": split, "time": time.time(), **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            if math.isfinite(v):
                self._tb.add_scalar(f"{split}/{k}", v, step)
        self._tb.flush()
        shown = {k: v for k, v in scalars.items() if k in _SHOWN}
        text = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        if self._bar is not None and split == "train":
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            print(f"[{split}] step {step}/{self.total_steps} {text}", flush=True)

    def text(self, step: int, tag: str, value: str) -> None:
        if self.active:
            self._tb.add_text(tag, value, step)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._tb.close()


_SHOWN = (
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "images_per_s",
    "mfu",
    "bits_per_char",
    "accuracy",
)

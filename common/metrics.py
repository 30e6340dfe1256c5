"""Run logs: TensorBoard events, a JSONL file and a progress bar (or plain lines).

Only process 0 writes. ``metrics.jsonl`` in the workdir has one JSON object per logged step
(``{"step": 100, "split": "train", "loss": ..., ...}``), easy to read back with pandas.
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


class MetricWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and ``workdir/tb`` and shows progress."""

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
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
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

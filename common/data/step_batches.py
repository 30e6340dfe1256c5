"""The one shape of every training input pipeline here: its whole state is a step counter.

A subclass defines ``batch_at(step)`` as a pure function of its data, its ``seed`` and the
step (each process taking only its own rows of the global batch), and names in
``STATE_KEYS`` the fields a resumed run must share with the saved one. Saving the position
is then saving ``step``, and a resumed run reads exactly the batches an uninterrupted one
would (``common.training.DataIterator``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class StepBatches:
    """Iterator over ``batch_at(0), batch_at(1), ...`` with ``get_state`` / ``set_state``."""

    STATE_KEYS: tuple[str, ...] = ("seed", "batch_size")
    step: int = 0

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, **{key: getattr(self, key) for key in self.STATE_KEYS}}

    def set_state(self, state: dict[str, Any]) -> None:
        for key in self.STATE_KEYS:
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"saved data state has {key}={state.get(key)!r}, this pipeline has "
                    f"{getattr(self, key)!r}"
                )
        self.step = int(state["step"])

"""Every preset of every model family with its exact parameter count.

    python -m experiments.zoo            # <preset><TAB><parameter count>, one line each
    python -m experiments.zoo gpt2       # only presets whose name contains "gpt2"

Counts come from ``jax.eval_shape`` of each model's ``init``: shapes only, no memory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from nlp import gpt


def _count(init: Callable[[], object]) -> int:
    shapes = jax.eval_shape(init)
    return sum(int(x.size) for x in jax.tree.leaves(shapes["params"]))


def _gpt() -> Iterator[tuple[str, Callable[[], object]]]:
    for name in gpt.PRESETS:
        model = gpt.from_preset(name)
        yield name, lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


# One entry per family; later families add theirs here.
FAMILIES: tuple[Callable[[], Iterator[tuple[str, Callable[[], object]]]], ...] = (_gpt,)


def presets() -> Iterator[tuple[str, int]]:
    for family in FAMILIES:
        for name, init in family():
            yield name, _count(init)


def main(argv: list[str]) -> None:
    pattern = argv[1] if len(argv) > 1 else ""
    for name, count in presets():
        if pattern in name:
            print(f"{name}\t{count}", flush=True)


if __name__ == "__main__":
    main(sys.argv)

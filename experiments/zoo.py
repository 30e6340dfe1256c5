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

from nlp import bert, gpt, transformer
from vision import swin, vit


def _count(init: Callable[[], object]) -> int:
    shapes = jax.eval_shape(init)
    return sum(int(x.size) for x in jax.tree.leaves(shapes["params"]))


def _gpt() -> Iterator[tuple[str, Callable[[], object]]]:
    for name in gpt.PRESETS:
        model = gpt.from_preset(name)
        yield name, lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


def _transformer() -> Iterator[tuple[str, Callable[[], object]]]:
    tokens = jnp.zeros((1, 1), jnp.int32)
    for name in transformer.PRESETS:
        model = transformer.from_preset(name)
        yield name, lambda m=model: m.init(jax.random.key(0), tokens, tokens)


def _bert() -> Iterator[tuple[str, Callable[[], object]]]:
    """BERT presets with the pre-training heads (the parameters of HF BertForPreTraining)."""
    for name in bert.PRESETS:
        model = bert.from_preset(name)
        yield name, lambda m=model: m.init(jax.random.key(0), *bert.example_inputs())


def _images(module) -> Iterator[tuple[str, Callable[[], object]]]:
    """ViT / Swin presets at their own resolution, with the 1000-class ImageNet head."""
    for name in module.PRESETS:
        model = module.from_preset(name)
        shape = module.example_images(model).shape
        yield name, lambda m=model, s=shape: m.init(jax.random.key(0), jnp.zeros(s, jnp.float32))


# One entry per family; later families add theirs here.
FAMILIES: tuple[Callable[[], Iterator[tuple[str, Callable[[], object]]]], ...] = (
    _gpt,
    _transformer,
    _bert,
    lambda: _images(vit),
    lambda: _images(swin),
)


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

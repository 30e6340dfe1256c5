"""Checks of model fields and inputs, shared by every family, so that a bad config fails at
construction with one ``ValueError`` that names every problem (not the first only, and not a
shape error deep inside XLA).

A module's ``__post_init__`` gathers problems with the helpers below, each returning a list
of messages of the form ``"field=value <what is wrong>"``, and hands them to ``check``::

    def __post_init__(self):
        p = validation.positive_ints(self, "num_layers", "num_heads", "d_model")
        p += validation.fractions(self, "dropout")
        p += validation.one_of(self, "attention_impl", IMPLEMENTATIONS)
        validation.check(self, p)
        super().__post_init__()
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any


def is_positive_int(value: Any) -> bool:
    """An integer (Python or numpy, not ``bool``) above zero."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def positive_ints(obj: Any, *names: str) -> list[str]:
    """One message per field of ``obj`` that is not a positive integer."""
    out = []
    for name in names:
        value = getattr(obj, name)
        if not is_positive_int(value):
            out.append(f"{name}={value!r} must be a positive int")
    return out


def optional_positive_ints(obj: Any, *names: str) -> list[str]:
    """Like ``positive_ints`` for fields where ``None`` means "not used"."""
    return [
        f"{name}={getattr(obj, name)!r} must be a positive int or None"
        for name in names
        if getattr(obj, name) is not None and not is_positive_int(getattr(obj, name))
    ]


def non_negative_ints(obj: Any, *names: str) -> list[str]:
    """One message per field that is not an integer ``>= 0`` (counts where 0 means "none")."""
    out = []
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0):
            out.append(f"{name}={value!r} must be >= 0")
    return out


def fractions(obj: Any, *names: str) -> list[str]:
    """One message per field outside ``[0, 1)`` (dropout rates, drop-path rates)."""
    out = []
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, numbers.Real) and 0.0 <= value < 1.0):
            out.append(f"{name}={value!r} must be in [0, 1)")
    return out


def one_of(obj: Any, name: str, choices: Iterable[Any]) -> list[str]:
    """A message if field ``name`` is not among ``choices`` (listed in the message)."""
    value = getattr(obj, name)
    choices = tuple(choices)
    return [] if value in choices else [f"{name}={value!r} is not one of {choices}"]


def divides(obj: Any, heads: str, width: str) -> list[str]:
    """A message if field ``heads`` does not divide field ``width`` (both checked positive
    elsewhere; nothing is said here when either is not a positive int)."""
    h, w = getattr(obj, heads), getattr(obj, width)
    if is_positive_int(h) and is_positive_int(w) and w % h:
        return [f"{heads}={h} does not divide {width}={w}"]
    return []


def check(obj: Any, problems: Sequence[str], what: str | None = None) -> None:
    """Raise one ``ValueError`` listing every problem; ``what`` defaults to the class name."""
    if problems:
        name = what or type(obj).__name__
        raise ValueError(f"invalid {name} config: " + "; ".join(problems))


def check_images(
    shape: Sequence[int], num_channels: int, patch_size: int | None = None
) -> tuple[int, int]:
    """``(height, width)`` of a channels-last image batch of ``shape``; a ``ValueError``
    naming the problem for the wrong rank, channel count, an empty image or (with
    ``patch_size``) a side that is not a positive multiple of the patch."""
    if len(shape) != 4:
        raise ValueError(f"images must be [batch, height, width, channels], got shape {shape}")
    _, h, w, c = shape
    if c != num_channels:
        raise ValueError(
            f"images have {c} channels, the model expects num_channels={num_channels} "
            f"(images are channels-last: [batch, height, width, channels])"
        )
    if h <= 0 or w <= 0:
        raise ValueError(f"images must have a positive size, got {h}x{w}")
    if patch_size is not None:
        for side, n in (("height", h), ("width", w)):
            if n < patch_size or n % patch_size:
                raise ValueError(
                    f"image {side} {n} is not a positive multiple of patch_size={patch_size}"
                )
    return h, w

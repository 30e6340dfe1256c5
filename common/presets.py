"""Building a model from a family's preset table (one table per family, named after papers)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def build(cls: type[T], presets: dict[str, dict[str, Any]], name: str, **overrides: Any) -> T:
    """``cls(**presets[name], **overrides)``; an unknown preset or field is a ValueError."""
    family = cls.__name__
    if name not in presets:
        raise ValueError(f"unknown {family} preset {name!r}; choose one of {sorted(presets)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {family} fields {sorted(unknown)}")
    return cls(**{**presets[name], **overrides})

"""Building a model from a family's preset table (one table per family, named after papers)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from common import config as config_lib

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


def from_config(from_preset: Callable[..., T], model: Mapping[str, Any], **fields: Any) -> T:
    """The model of an experiment's ``model`` config section: ``from_preset(model["preset"],
    ...)`` with the section's other fields as overrides, its ``dtype`` named by a string
    (``common.config.dtype``), and ``fields`` the experiment derives (vocabulary size,
    sequence length) added."""
    m = dict(model)
    if "preset" not in m:
        raise ValueError(f"the model config names no preset; it has {sorted(m)}")
    preset = m.pop("preset")
    if "dtype" in m:
        m["dtype"] = config_lib.dtype(m["dtype"])
    return from_preset(preset, **m, **fields)

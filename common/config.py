"""The config sections every experiment shares, built once with the project's defaults.

An experiment's ``get_config`` states only what differs from these, each with a one-line
reason, and keeps its own sections (``data``, ``model``, ``eval``, ...) as plain dicts::

    from common import config as config_lib

    def get_config(variant=None):
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.data = dict(...)
        c.model = dict(..., dtype="float32")
        c.optim = config_lib.optim(lr=3e-3, warmup_steps=50)  # small model: a higher peak
        c.train = config_lib.train(steps=1300, batch_size=16)
        c.mesh = config_lib.mesh()
        ...

and in ``build_model``: ``dtype=config_lib.dtype(config.model.dtype)``.

Derived fields are resolved in one place, ``resolve_optim``, which ``common.training.train``
calls: ``optim.total_steps <= 0`` means "the schedule spans ``train.steps``". The user's
config is never mutated, so no experiment needs a ``config.unlocked()`` block.

An override whose key the section does not have raises ``KeyError`` naming it (a typo never
becomes a silently ignored field); command-line overrides are checked by ``experiments.launch``
against these same sections.
"""

from __future__ import annotations

import difflib
from typing import Any

import jax.numpy as jnp
import ml_collections

from common import optim as optim_lib
from common import sharding as sharding_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _section(name: str, defaults: dict[str, Any], overrides: dict[str, Any]):
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, defaults, n=1)
            hints.append(f"{name}.{key}" + (f" (did you mean {name}.{close[0]}?)" if close else ""))
        raise KeyError(
            f"unknown config field(s) {', '.join(hints)}; {name} has: {', '.join(sorted(defaults))}"
        )
    return ml_collections.ConfigDict({**defaults, **overrides})


def optim(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``optim`` section (fields: see ``common.optim``): AdamW, warmup + cosine decay.

    ``total_steps=-1`` (the default) means ``train.steps``; see ``resolve_optim``.
    """
    return _section("optim", {**optim_lib.default_config().to_dict(), "total_steps": -1}, overrides)


def train(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``train`` section read by ``common.training.train``.

    ``steps``: optimizer steps in all; ``batch_size``: the global batch (all processes);
    ``accum_steps``: micro-batches per step; ``log_every`` / ``eval_every`` /
    ``checkpoint_every``: in steps (the last step always does all three);
    ``keep_checkpoints``: newest steps kept; ``async_checkpoint``: save in the background;
    ``report_mfu``: measure the matmul peak once and log ``mfu``.
    """
    defaults = dict(
        steps=1000,
        batch_size=32,
        accum_steps=1,
        log_every=25,
        eval_every=250,
        checkpoint_every=250,
        keep_checkpoints=3,
        async_checkpoint=True,
        report_mfu=True,
    )
    return _section("train", defaults, overrides)


def mesh(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``mesh`` section: ``data`` x ``fsdp`` devices (-1: all the other axis leaves) and
    the logical-axis ``rules`` of ``common.sharding``."""
    defaults = dict(data=-1, fsdp=1, rules=[list(r) for r in sharding_lib.DEFAULT_RULES])
    return _section("mesh", defaults, overrides)


def dtype(name: str, field: str = "model.dtype") -> Any:
    """The jnp dtype named ``name``; ``ValueError`` naming ``field`` for an unknown name."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_optim(config: Any) -> ml_collections.ConfigDict:
    """A copy of ``config.optim`` with derived fields filled in (``total_steps <= 0`` ->
    ``config.train.steps``); ``config`` itself is left as it is."""
    resolved = ml_collections.ConfigDict(config.optim.to_dict())
    if resolved.get("total_steps", -1) <= 0:
        resolved.total_steps = int(config.train.steps)
    return resolved

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

A config is checked before any data loads or anything compiles: ``experiments.launch``
collects ``validate(config)`` (the shared sections, wherever they sit), the experiment's own
``validate_config(config)`` hook when its module defines one, and ``workdir_problems``, one
message per bad field, and stops with all of them (``ConfigError``, no traceback). A problem
found later, once a tokenizer or a workdir's contents are known, is raised as ``ConfigError``
too.

An override whose key the section does not have raises ``KeyError`` naming it (a typo never
becomes a silently ignored field); command-line overrides are checked by ``experiments.launch``
against these same sections.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Callable, Sequence
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


# ----------------------------------------------------------------------------- validation


class ConfigError(ValueError):
    """A config (or workdir) the run cannot use. ``problems``: one message per bad field, each
    starting with the field's dotted name. ``experiments.launch`` prints them without a
    traceback and exits with status 2."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def _is_section(x: Any) -> bool:
    return isinstance(x, ml_collections.ConfigDict | dict)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


class _Problems(list):
    """Collects ``"<field>=<value> <rule>"`` messages."""

    def int_at_least(self, name: str, value: Any, low: int) -> bool:
        if _is_int(value) and value >= low:
            return True
        rule = "a positive integer" if low == 1 else f"an integer >= {low}"
        self.append(f"{name}={value!r} must be {rule}")
        return False

    def number_in(self, name: str, value: Any, low: float, high: float | None, rule: str) -> bool:
        """``low <= value`` and, with ``high``, ``value < high``."""
        if _is_number(value) and value >= low and (high is None or value < high):
            return True
        self.append(f"{name}={value!r} must be {rule}")
        return False


_TRAIN_COUNTS = ("steps", "batch_size", "accum_steps", "log_every", "eval_every")
_TRAIN_COUNTS += ("checkpoint_every", "keep_checkpoints")


def _check_train(p: _Problems, prefix: str, tc: Any, devices: Callable[[], int]) -> None:
    ok = {k: p.int_at_least(f"{prefix}train.{k}", tc[k], 1) for k in _TRAIN_COUNTS if k in tc}
    if "batch_size" in tc and ok.get("batch_size") and ok.get("accum_steps", True):
        bs, accum, n = tc.batch_size, tc.get("accum_steps", 1), devices()
        unit = n * accum
        if bs % unit:
            lower = bs // unit * unit
            near = f"{lower} or {lower + unit}" if lower else f"{unit}"
            p.append(
                f"{prefix}train.batch_size={bs} must be a multiple of {unit}: {n} data-parallel "
                f"devices (mesh.data x mesh.fsdp) x {prefix}train.accum_steps={accum} "
                f"(e.g. {near})"
            )


def _check_optim(p: _Problems, prefix: str, oc: Any, steps: Any) -> None:
    name = lambda k: f"{prefix}optim.{k}"
    if "schedule" in oc and oc.schedule not in optim_lib.SCHEDULES:
        p.append(f"{name('schedule')}={oc.schedule!r} is not one of {optim_lib.SCHEDULES}")
    if "lr" in oc:
        p.number_in(name("lr"), oc.lr, 0, None, ">= 0")
    for k, rule in (("eps", ">= 0"), ("weight_decay", ">= 0"), ("grad_clip", ">= 0 (0: off)")):
        if k in oc:
            p.number_in(name(k), oc[k], 0, None, rule)
    for k, rule in (("b1", "in [0, 1)"), ("b2", "in [0, 1)"), ("ema_decay", "in [0, 1) (0: off)")):
        if k in oc:
            p.number_in(name(k), oc[k], 0, 1, rule)
    if "min_lr_ratio" in oc:
        p.number_in(name("min_lr_ratio"), oc.min_lr_ratio, 0, 1 + 1e-12, "in [0, 1]")
    warmup = oc.get("warmup_steps", 0)
    if not p.int_at_least(name("warmup_steps"), warmup, 0):
        return
    total = oc.get("total_steps", -1)
    if not _is_int(total):
        p.append(f"{name('total_steps')}={total!r} must be an integer (<= 0: train.steps)")
        return
    if total <= 0:
        if not (_is_int(steps) and steps > 0):
            return  # reported under train.steps
        total, source = steps, f"{prefix}train.steps"
    else:
        source = name("total_steps")
    if warmup > total:
        p.append(
            f"{name('warmup_steps')}={warmup} is longer than the schedule's {total} steps "
            f"({source})"
        )


def _check_mesh(p: _Problems, mc: Any, devices: Callable[[], int]) -> None:
    axes = {}
    for k in ("data", "fsdp"):
        v = mc.get(k, -1 if k == "data" else 1)
        if _is_int(v) and (v == -1 or v >= 1):
            axes[k] = v
        else:
            p.append(f"mesh.{k}={v!r} must be -1 (the devices the other axis leaves) or >= 1")
    if len(axes) == 2:
        data, fsdp, n = axes["data"], axes["fsdp"], devices()
        if data == fsdp == -1:
            p.append("mesh.data=-1 and mesh.fsdp=-1: at most one of them may be -1")
        else:  # as common.sharding.make_mesh resolves -1
            d = (n // fsdp if n % fsdp == 0 else 0) if data == -1 else data
            f = (n // data if n % data == 0 else 0) if fsdp == -1 else fsdp
            if d * f != n:
                p.append(f"mesh.data={data} x mesh.fsdp={fsdp} does not cover the {n} devices")
    for i, rule in enumerate(mc.get("rules", ())):
        targets = rule[1] if isinstance(rule, list | tuple) and len(rule) == 2 else None
        targets = [targets] if targets is None or isinstance(targets, str) else targets
        if (
            not isinstance(rule, list | tuple)
            or len(rule) != 2
            or not isinstance(rule[0], str)
            or any(t is not None and t not in sharding_lib.MESH_AXES for t in targets)
        ):
            p.append(
                f"mesh.rules[{i}]={rule!r} must be [logical axis, mesh axis or axes or None] "
                f"with mesh axes from {sharding_lib.MESH_AXES}"
            )


def _context_length(config: Any) -> tuple[str, int] | None:
    """(field, value) of the sequence length the model sees, where the config names one."""
    for section, key in (("data", "seq_len"), ("data", "max_len"), ("model", "max_len")):
        value = config.get(section, {}).get(key) if _is_section(config.get(section)) else None
        if _is_int(value) and value > 0:
            return f"{section}.{key}", value
    return None


def _check_eval(p: _Problems, config: Any, devices: Callable[[], int]) -> None:
    ec = config.eval
    if "batch_size" in ec and p.int_at_least("eval.batch_size", ec.batch_size, 1):
        n = devices()
        if ec.batch_size % n:
            p.append(
                f"eval.batch_size={ec.batch_size} must be a multiple of the {n} devices "
                "(evaluation batches are split over the whole mesh)"
            )
    if "stride" in ec and p.int_at_least("eval.stride", ec.stride, 0):
        context = _context_length(config)
        if context is not None and ec.stride > context[1]:
            p.append(
                f"eval.stride={ec.stride} must be at most the context, {context[0]}={context[1]} "
                "(0: half of it)"
            )


def _check_dtypes(p: _Problems, section: Any, prefix: str) -> None:
    for key, value in section.items():
        name = f"{prefix}{key}"
        if _is_section(value):
            _check_dtypes(p, value, f"{name}.")
        elif (key == "dtype" or key.endswith("_dtype")) and isinstance(value, str):
            if value not in DTYPES:
                p.append(f"{name}={value!r} is not one of {sorted(DTYPES)}")


def validate(config: Any, *, devices: int | None = None) -> list[str]:
    """The problems of ``config``'s shared sections: one message per bad field, each starting
    with the field's dotted name; empty when there are none. Nothing is loaded or compiled.

    Checked where present: ``train`` and ``optim`` at the top level and in every phase (a
    sub-section with its own ``train``, e.g. ``pretrain.train``): positive step counts and
    batch size, the batch a multiple of the data-parallel devices (the mesh covers them all)
    times ``accum_steps``, optimizer fields in range, warmup within the schedule; ``mesh``
    (axes covering the devices, rules naming mesh axes); ``eval.batch_size`` (a multiple of
    the devices), ``eval.stride`` (0 or up to the context, ``data.seq_len`` /
    ``data.max_len`` / ``model.max_len``); every ``dtype`` / ``*_dtype`` field;
    ``cpu_devices``. An experiment checks its own fields in its module's
    ``validate_config(config) -> list[str]`` (see ``experiments.launch``).

    ``devices``: the global device count (default ``jax.device_count()``, which starts jax's
    backends: call after ``common.sharding.use_cpu_devices``).
    """
    import jax

    p = _Problems()
    count: list[int] = []

    def n_devices() -> int:
        if not count:
            count.append(devices if devices is not None else jax.device_count())
        return count[0]

    if "cpu_devices" in config:
        p.int_at_least("cpu_devices", config.cpu_devices, -1)
    phases = [("", config)] + [
        (f"{k}.", v) for k, v in config.items() if _is_section(v) and _is_section(v.get("train"))
    ]
    for prefix, phase in phases:
        if _is_section(phase.get("train")):
            _check_train(p, prefix, phase.train, n_devices)
        if _is_section(phase.get("optim")):
            steps = phase.train.get("steps") if _is_section(phase.get("train")) else None
            _check_optim(p, prefix, phase.optim, steps)
    if _is_section(config.get("mesh")):
        _check_mesh(p, config.mesh, n_devices)
    if _is_section(config.get("eval")):
        _check_eval(p, config, n_devices)
    _check_dtypes(p, config, "")
    return list(p)


def workdir_problems(workdir: str) -> list[str]:
    """Why ``workdir`` cannot hold the run's files (empty when it can): it is a file, a parent
    is a file, or it (or, when it does not exist yet, the nearest existing parent it would be
    made in) is not writable. An existing workdir is probed by creating and removing a file."""
    if not workdir:
        return ["--workdir is empty"]
    if "://" in workdir:  # a remote location: only writing will tell
        return []
    path = os.path.abspath(workdir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            return [f"--workdir={workdir} is a file, not a directory"]
        try:
            fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=path)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            return [f"--workdir={workdir} is not writable ({e.strerror or e})"]
        return []
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return [f"--workdir={workdir} cannot be created: {parent} is a file"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"--workdir={workdir} cannot be created: {parent} is not writable"]
    return []

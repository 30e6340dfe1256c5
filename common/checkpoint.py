"""One orbax ``CheckpointManager`` per run: atomic, keep-N, async, auto-resume, verified.

A checkpoint step holds four items:
  * ``state``: the train state (params, optimizer state, step), restored onto whatever
    shardings the caller's abstract state carries, so a run may resume on a different device
    count;
  * ``data``: the input pipeline's position (a small JSON dict), so a resumed run reads
    exactly the batches an uninterrupted run would;
  * ``meta``: the config the run was started with, so a workdir is never resumed under a
    different model or data config;
  * ``checksums``: a 64-bit checksum of every state array (``state_checksums``) and a SHA-256
    of the ``data`` and ``meta`` JSON, compared with the restored values.

Orbax writes each step into a temporary directory and renames it when complete, so a kill
mid-save leaves the previous steps whole. The checksums are computed from the arrays being
saved, on their devices, before the save starts, and are written as one more item of the
same step, so they are committed (renamed into place) together with the data: no step can
hold data without its checksums, or checksums of half-written files. They checksum the
arrays' values, not the files, so a restore onto another device count or sharding verifies
the same way, and what is checked is exactly what is loaded. A step that is present but
unreadable (a corrupted, truncated or missing file) or whose restored values do not match
their checksums is skipped with one warning naming the step and the reason, falling back to
the newest good one, and is then moved aside to ``<step>.unreadable`` (kept for inspection,
out of orbax's way: orbax silently skips saving a step number that already exists). Orbax's
own log records during these restore attempts are held back (one damaged file otherwise
logs a traceback per array). A step without checksums (written before they existed) is
restored unverified, with a warning. A checkpoint whose state tree differs from the run's
(an optimizer with or without clipping or a parameter EMA, say) is refused as a config
mismatch, not as damage. A save that fails (a full disk, say) raises ``CheckpointSaveError``
naming the step, the reason and the last complete step, which it leaves in place.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

# Orbax's default "replica-parallel" save splits every replicated array across its replicas,
# which compiles one slicing program per device and array shape before the first save (slow
# for a many-leaf state over many devices). It pays only when several hosts share large
# replicated arrays; here each shard is written once, from its first replica. (Orbax's
# type-handler registry is global, so this holds process-wide.)
_absl_log = logging.getLogger("absl")
_level = _absl_log.level
_absl_log.setLevel(logging.ERROR)  # orbax warns about the override it was asked for
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)
_absl_log.setLevel(_level)

CHECKSUM_VERSION = 1


# Meta keys naming a location, left out of the comparison: a moved dataset is the same data.
LOCATION_KEYS = frozenset({"data_dir"})


class ConfigMismatchError(ValueError):
    """The workdir holds checkpoints of a run with a different config."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); older steps are intact."""


class _Damaged(Exception):
    """A step's files read back, but not as what was saved (or not at all)."""


def _diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            if k in LOCATION_KEYS:  # where the data lives is not what the run is
                continue
            key = f"{prefix}.{k}" if prefix else k
            if k not in saved or k not in current:
                out.append(f"{key}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}")
            else:
                out.extend(_diff(saved[k], current[k], key))
        return out
    if isinstance(saved, list | tuple) and isinstance(current, list | tuple):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{prefix}: {saved!r} -> {current!r}"]


def _key_name(k: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_paths(tree: Any) -> set[tuple[str, ...]]:
    """The leaves' key paths as plain strings (attribute, dict key and index alike)."""
    return {tuple(map(_key_name, p)) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------- checksums


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as a flat uint32 vector (one word per element, two for 64-bit)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], -1)
    size = x.dtype.itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # [..., 2] -> flat
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {2: jnp.uint16, 1: jnp.uint8}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _mix32(h: jax.Array) -> jax.Array:
    """A bijection of uint32 (an odd multiply, then an xor-shift) that spreads low bits up."""
    h = h * jnp.uint32(0x85EBCA6B)
    return h ^ (h >> 15)


def _array_checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums over the array's words ``w_i``: ``sum (2i+1) w_i`` and
    ``sum mix(w_i xor i * golden)`` (mod 2**32). Integer sums are exact in any order, so the
    result does not depend on the sharding; a change of any one word always changes both
    (odd multipliers, a bijective mix), several random changes cancel with odds ~2**-64."""
    w = _words(jnp.asarray(x))  # [n] uint32
    i = jax.lax.iota(jnp.uint32, w.shape[0])  # [n]
    linear = jnp.sum(w * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    mixed = jnp.sum(_mix32(w ^ (i * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    return jnp.stack([linear, mixed])  # [2]


@functools.cache
def _checksum_fn(out_sharding: jax.sharding.Sharding | None):
    # One program per leaf shape, dtype and sharding (a dozen for a transformer): compiling
    # one program over all leaves at once took longer than the checksums themselves.
    return jax.jit(_array_checksum, out_shardings=out_sharding)


def state_checksums(state: Any) -> dict[str, str]:
    """``{"params/h_0/attn/qkv/kernel": "<16 hex digits>", ...}`` for every array of ``state``.

    Computed where the arrays live (memory-bound reductions, dispatched together); only 8
    bytes per leaf come back to the host.
    """
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    sums = []
    for _, leaf in flat:
        sharding = getattr(leaf, "sharding", None)
        out_sharding = None  # a NamedSharding's result replicated, so every process reads it
        if isinstance(sharding, jax.sharding.NamedSharding):
            out_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        sums.append(_checksum_fn(out_sharding)(leaf))
    return {
        "/".join(map(_key_name, path)): "".join(f"{int(v):08x}" for v in np.asarray(s))
        for (path, _), s in zip(flat, jax.device_get(sums), strict=True)
    }


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- logging


class _Hold(logging.Filter):
    """Drops log records (counting them) while orbax is tried on possibly damaged steps."""

    def __init__(self):
        super().__init__()
        self.held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.held += 1
        return False


class _OneLine(logging.Filter):
    """Cuts orbax's log records to one line without traceback: a failed background save
    otherwise logs four tracebacks (~330 lines) before ``CheckpointSaveError`` says why."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname and (record.exc_info or record.levelno >= logging.ERROR):
            text = record.getMessage().splitlines()
            text = text[0] if text else ""
            record.msg = text[:300] + ("..." if len(text) > 300 else "")
            record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
        return True


@contextlib.contextmanager
def _hold_library_logs():
    hold = _Hold()
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "tensorstore")]
    for lg in loggers:
        lg.addFilter(hold)
    try:
        yield hold
    finally:
        for lg in loggers:
            lg.removeFilter(hold)


def _first_line(e: BaseException, limit: int) -> str:
    text = str(e).split("See full TensorStore details")[0].strip()
    text = text.splitlines()[0] if text else ""
    if len(text) > limit:
        text = text[:limit] + "..."
    if isinstance(e, _Damaged):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _reason(e: BaseException, limit: int = 300) -> str:
    """One line for an exception: the first line of its message and of its root cause, cut
    short (TensorStore errors append a 50-line spec of the array they failed on, and the
    file and byte range at fault are in the cause)."""
    root, seen = e, {id(e)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(root))
    if root is e:
        return _first_line(e, limit)
    return f"{_first_line(e, limit)} (caused by {_first_line(root, limit)})"


class Checkpointer:
    """Save and restore ``(state, data_state)`` in ``directory``.

    ``meta`` is a JSON-able dict describing what must not change across a resume (the model
    and data config); restoring from a checkpoint whose meta differs raises
    ``ConfigMismatchError`` naming the differing keys.
    """

    def __init__(
        self, directory: str, *, meta: dict[str, Any], max_to_keep: int = 3, async_save: bool = True
    ):
        self.directory = os.path.abspath(directory)
        # As it will read back from JSON (tuples become lists); fails now if not JSON-able.
        self.meta = json.loads(json.dumps(meta))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={  # named up front so item_metadata can read a step before any save
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
                "checksums": ocp.JsonCheckpointHandler(),
            },
        )
        self._pending: int | None = None  # the step an async save may still be writing
        self._one_line = _OneLine()
        logging.getLogger("absl").addFilter(self._one_line)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _complete_steps(self) -> list[int]:
        """Steps whose directories orbax finished (renamed from their temporary names)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

    def _save_failed(self, step: int | None, e: BaseException) -> CheckpointSaveError:
        chain, x = [], e
        while x is not None and x not in chain:
            chain.append(x)
            x = x.__cause__ or x.__context__
        if any(
            getattr(x, "errno", None) == errno.ENOSPC or "No space left on device" in str(x)
            for x in chain
        ):
            reason = "the disk is full: No space left on device"
        else:
            reason = _reason(e)
        try:
            free = f" ({shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free now)"
        except OSError:
            free = ""
        done = [s for s in self._complete_steps() if s != step]
        kept = (
            f"the last complete checkpoint, step {done[-1]}, is intact"
            if done
            else "no earlier checkpoint exists"
        )
        return CheckpointSaveError(
            f"saving checkpoint {'' if step is None else f'step {step} '}in {self.directory} "
            f"failed{free}: {reason}. Training stops here; {kept}. Free space (or fix the "
            "cause) and rerun the same command to resume from it."
        )

    def save(self, step: int, state: Any, data_state: dict[str, Any], *, force: bool = False):
        checksums = {
            "version": CHECKSUM_VERSION,
            "state": state_checksums(state),
            "data": _json_digest(data_state),
            "meta": _json_digest(self.meta),
        }
        self.wait()  # a failed earlier save is reported for its own step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave(self.meta),
                    checksums=ocp.args.JsonSave(checksums),
                ),
                force=force,
            )
        except Exception as e:
            raise self._save_failed(step, e) from e
        self._pending = step

    def check_meta(self, step: int, digest: str | None = None) -> None:
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        if digest is not None and _json_digest(saved.meta) != digest:
            raise _Damaged("the meta item does not match its checksum")
        diffs = _diff(saved.meta, self.meta)
        if diffs:
            raise ConfigMismatchError(
                f"{self.directory} holds checkpoints of a run with another config "
                f"(step {step}); differing keys: "
                + "; ".join(diffs)
                + ". Use a fresh --workdir, or the same config."
            )

    def check_structure(self, step: int, abstract_state: Any) -> None:
        """Raises ``ConfigMismatchError`` if ``step`` holds a state tree of another shape."""
        state_dir = os.path.join(self.directory, str(step), "state")
        if not os.path.isfile(os.path.join(state_dir, "_METADATA")):
            raise _Damaged(f"{state_dir}/_METADATA (the state's tree structure) is missing")
        saved = _leaf_paths(self.manager.item_metadata(step)["state"])
        current = _leaf_paths(abstract_state)
        if not saved and current:
            raise _Damaged(f"{state_dir}/_METADATA lists no arrays")
        if saved != current:
            only_saved, only_current = sorted(saved - current), sorted(current - saved)
            raise ConfigMismatchError(
                f"{self.directory} step {step} holds a train state of another structure "
                f"(only in the checkpoint: {only_saved[:4]}; only in this run: "
                f"{only_current[:4]}), e.g. an optimizer with or without gradient clipping "
                "or a parameter EMA. Use a fresh --workdir, or the same config."
            )

    def _read_checksums(self, step: int) -> dict[str, Any] | None:
        if not os.path.isdir(os.path.join(self.directory, str(step), "checksums")):
            return None
        saved = self.manager.restore(
            step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore())
        ).checksums
        if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
            raise _Damaged("the checksums item is malformed")
        return saved

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        checksums = self._read_checksums(step)
        self.check_meta(step, checksums and checksums.get("meta"))
        self.check_structure(step, abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        if checksums is None:
            log.warning(
                "checkpoint step %d in %s has no checksums (written by an older version): "
                "restored unverified",
                step,
                self.directory,
            )
        else:
            got, want = state_checksums(restored.state), checksums["state"]
            bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            if bad:
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                raise _Damaged(f"checksum mismatch in {', '.join(bad[:3])}{more}")
            if _json_digest(restored.data) != checksums.get("data"):
                raise _Damaged("the data item does not match its checksum")
        return restored.state, dict(restored.data)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """Newest good ``(step, state, data_state)``, or None when there is none.

        ``abstract_state``: a tree of ``jax.ShapeDtypeStruct`` with shardings (or concrete
        arrays) giving the target structure and placement. Damaged steps newer than the
        one restored are moved aside to ``<step>.unreadable``.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        errors = []
        for step in steps:
            try:
                with _hold_library_logs() as held:
                    state, data = self._restore_step(step, abstract_state)
            except ConfigMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any damaged step is skipped, loudly
                errors.append(f"step {step}: {_reason(e)}")
                log.warning(
                    "checkpoint step %d in %s is unreadable (%s); trying the next older%s",
                    step,
                    self.directory,
                    _reason(e),
                    f" ({held.held} log records of orbax held back)" if held.held else "",
                )
                continue
            self._set_aside(steps[: len(errors)])
            return step, state, data
        raise RuntimeError(
            f"no checkpoint in {self.directory} is readable (steps {steps}): {errors[0]}. "
            "Move the directory away to start afresh."
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable step directories to ``<step>.unreadable``, out of orbax's way."""
        for step in steps:
            path = os.path.join(self.directory, str(step))
            aside = f"{path}.unreadable"
            n = 1
            while os.path.exists(aside):
                aside, n = f"{path}.unreadable{n}", n + 1
            os.rename(path, aside)
            log.warning("moved unreadable checkpoint step %d to %s", step, aside)
        if steps:
            self.manager.reload()

    def wait(self) -> None:
        """Blocks until the last save is on disk; ``CheckpointSaveError`` if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(self._pending, e) from e
        finally:
            self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
            logging.getLogger("absl").removeFilter(self._one_line)

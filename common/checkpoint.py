"""One orbax ``CheckpointManager`` per run: atomic, keep-N, async, auto-resume.

A checkpoint step holds three items:
  * ``state``: the train state (params, optimizer state, step), restored onto whatever
    shardings the caller's abstract state carries, so a run may resume on a different device
    count;
  * ``data``: the input pipeline's position (a small JSON dict), so a resumed run reads
    exactly the batches an uninterrupted run would;
  * ``meta``: the config the run was started with, so a workdir is never resumed under a
    different model or data config.

Orbax writes each step into a temporary directory and renames it when complete, so a kill
mid-save leaves the previous steps whole. A step that is present but unreadable (a
corrupted or truncated file) is skipped with a warning, falling back to the newest readable
one, and is then moved aside to ``<step>.unreadable`` (kept for inspection, out of orbax's
way: orbax silently skips saving a step number that already exists). Garbage is never
loaded silently. A checkpoint whose state tree differs from the run's (an optimizer with or
without clipping or a parameter EMA, say) is refused as a config mismatch, not as damage.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
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


# Meta keys naming a location, left out of the comparison: a moved dataset is the same data.
LOCATION_KEYS = frozenset({"data_dir"})


class ConfigMismatchError(ValueError):
    """The workdir holds checkpoints of a run with a different config."""


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


def _leaf_paths(tree: Any) -> set[tuple[str, ...]]:
    """The leaves' key paths as plain strings (attribute, dict key and index alike)."""

    def name(k):
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return {tuple(map(name, p)) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


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
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any], *, force: bool = False):
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(self.meta),
            ),
            force=force,
        )

    def check_meta(self, step: int) -> None:
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
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
        saved = _leaf_paths(self.manager.item_metadata(step)["state"])
        current = _leaf_paths(abstract_state)
        if saved != current:
            only_saved, only_current = sorted(saved - current), sorted(current - saved)
            raise ConfigMismatchError(
                f"{self.directory} step {step} holds a train state of another structure "
                f"(only in the checkpoint: {only_saved[:4]}; only in this run: "
                f"{only_current[:4]}), e.g. an optimizer with or without gradient clipping "
                "or a parameter EMA. Use a fresh --workdir, or the same config."
            )

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """Newest readable ``(step, state, data_state)``, or None when there is none.

        ``abstract_state``: a tree of ``jax.ShapeDtypeStruct`` with shardings (or concrete
        arrays) giving the target structure and placement. Unreadable steps newer than the
        one restored are moved aside to ``<step>.unreadable``.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        errors = []
        for step in steps:
            try:
                self.check_meta(step)
                self.check_structure(step, abstract_state)
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                    ),
                )
            except ConfigMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable step is skipped, loudly
                errors.append(f"step {step}: {type(e).__name__}: {e}")
                log.warning(
                    "checkpoint step %d in %s is unreadable (%s: %s); trying the next older",
                    step,
                    self.directory,
                    type(e).__name__,
                    e,
                )
                continue
            self._set_aside(steps[: len(errors)])
            return step, restored.state, dict(restored.data)
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

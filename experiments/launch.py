"""Command-line entry shared by every experiment script.

``python -m experiments.<name> --workdir DIR [--config=experiments/<name>.py:VARIANT]
[--config.section.field=value ...] [--debug]``: the config comes from the experiment's
``get_config(variant)``, command-line overrides are type-checked against it, unknown keys
fail, and the config is locked before training starts. The process first re-executes
itself once with the malloc settings of ``common.malloc`` (page faults of large
temporaries were up to a third of a training step's CPU time; ``LANDMARKS_SYSTEM_MALLOC=1``
keeps glibc's defaults). A config with a top-level ``cpu_devices`` field gets that many
one-thread CPU devices (``common.sharding.use_cpu_devices``) before jax starts.

Before ``main`` runs (so before any data loads or anything compiles) the config is checked:
``common.config.validate`` for the shared sections, the experiment module's own
``validate_config(config) -> list[str]`` when it defines one, and
``common.config.workdir_problems``. Every problem is printed, one line per bad field, and
the process exits with status 2, without a traceback; so do an unknown or ill-typed
``--config.*`` flag and the user's mistakes that ``main`` finds later (``ConfigError``,
e.g. a prompt longer than the context once the tokenizer exists, and a workdir holding
another run, ``common.checkpoint.ConfigMismatchError``). ``--debug`` (or
``LANDMARKS_DEBUG=1``) lets them raise with their traceback instead.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import ml_collections

DEBUG_ENV = "LANDMARKS_DEBUG"
USAGE_ERROR = 2  # exit status for a config or workdir the run cannot use


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` on the command line or ``LANDMARKS_DEBUG`` set (not to 0)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    return any(
        a in ("--debug", "-debug") or a.lower() in ("--debug=true", "--debug=1") for a in argv
    )


def fail(program: str, problems: Sequence[str]) -> NoReturn:
    """Print ``problems`` (one per line) to stderr and exit with ``USAGE_ERROR``."""
    n = len(problems)
    head = f"{program}: {'a problem' if n == 1 else f'{n} problems'}; stopped before training"
    lines = [head + ":", *(f"  {p}" for p in problems)]
    lines.append(f"(--debug or {DEBUG_ENV}=1 shows a traceback)")
    sys.stdout.flush()
    print("\n".join(lines), file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def _config_arg(argv: Sequence[str], default: str) -> str:
    """The ``--config`` flag's value in ``argv`` (``path[:variant]``), else ``default``."""
    for i, a in enumerate(argv):
        for prefix in ("--config=", "-config="):
            if a.startswith(prefix):
                return a[len(prefix) :]
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return default


def override_problems(config: Any, argv: Sequence[str]) -> list[str]:
    """One message per ``--config.a.b[=v]`` flag in ``argv`` naming a field ``config`` does
    not have, with the closest existing name."""
    problems = []
    for arg in argv:
        name = arg.lstrip("-")
        if not (arg.startswith("-") and name.startswith("config.")):
            continue
        path = name[len("config.") :].split("=", 1)[0]
        node, done = config, []
        for part in path.split("."):
            if isinstance(node, ml_collections.ConfigDict | dict) and part in node:
                node = node[part]
                done.append(part)
                continue
            where = ".".join(done)
            field = f"{where}.{part}" if where else part
            if isinstance(node, ml_collections.ConfigDict | dict):
                keys = sorted(node.keys())
                close = difflib.get_close_matches(part, keys, n=1)
                if close:
                    hint = f"did you mean {where + '.' if where else ''}{close[0]}?"
                else:
                    hint = f"{where or 'the config'} has: {', '.join(keys)}"
                problems.append(f"--config.{path}: unknown field {field} ({hint})")
            else:
                problems.append(f"--config.{path}: {where}={node!r} is not a section")
            break
    return problems


def _message(e: BaseException) -> str:
    """An exception's own message, without the chain it was raised in."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return text or type(e).__name__


def run(config_file: str, main: Callable[[ml_collections.ConfigDict, str], Any]) -> None:
    """Parse ``--workdir`` and ``--config*`` flags, check the config and workdir, and call
    ``main(config, workdir)``."""
    from common.malloc import reexec_with_malloc_env

    reexec_with_malloc_env()
    from absl import app, flags
    from ml_collections import config_flags
    from ml_collections.config_flags import config_flags as config_flags_impl

    program = getattr(sys.modules.get(main.__module__), "__spec__", None)
    program = program.name if program is not None else os.path.basename(config_file)
    debug = debug_requested(sys.argv)
    default_config = os.path.abspath(config_file)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_bool(
        "debug", False, f"Raise the user's mistakes with a traceback ({DEBUG_ENV}=1)."
    )

    def flag_error(e: Exception, argv: Sequence[str]) -> NoReturn:
        """A bad flag is the user's mistake: its message, no traceback (unless debugging)."""
        if debug:
            raise e
        problems = []
        if not isinstance(e, flags.Error):  # config_flags' KeyError on an unknown field
            try:
                parsed = config_flags_impl.ConfigFileFlagParser("config").parse(
                    _config_arg(argv, default_config)
                )
                problems = override_problems(parsed, argv)
            except Exception:  # noqa: BLE001 - the config itself failed: its message below
                pass
        fail(program, problems or [_message(e)])

    try:  # the default config (no --config flag) is loaded, and overridden, right here
        config_flags.DEFINE_config_file(
            "config", default_config, "Experiment config file[:variant].", lock_config=True
        )
    except Exception as e:  # noqa: BLE001
        flag_error(e, sys.argv)

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # noqa: BLE001
            flag_error(e, argv)

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        from common.sharding import maybe_initialize_distributed, use_cpu_devices

        config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
        cpu = config.get("cpu_devices")
        if isinstance(cpu, int) and cpu >= -1:  # otherwise reported by validate below
            use_cpu_devices(cpu)
        maybe_initialize_distributed()
        for name in ("absl", "jax"):
            logging.getLogger(name).setLevel(logging.WARNING)

        from common import config as config_lib
        from common.checkpoint import ConfigMismatchError

        hook = getattr(sys.modules.get(main.__module__), "validate_config", None)
        problems = config_lib.validate(config)
        problems += list(hook(config)) if hook is not None else []
        problems += config_lib.workdir_problems(workdir)
        if problems:
            if debug:
                raise config_lib.ConfigError(problems)
            fail(program, problems)
        try:
            main(config, workdir)
        except config_lib.ConfigError as e:
            if debug:
                raise
            fail(program, e.problems)
        except ConfigMismatchError as e:
            if debug:
                raise
            fail(program, [_message(e)])

    app.run(_main, argv=sys.argv, flags_parser=parse)

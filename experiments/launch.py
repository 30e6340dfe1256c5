"""Command-line entry shared by every experiment script.

``python -m experiments.<name> --workdir DIR [--config=experiments/<name>.py:VARIANT]
[--config.section.field=value ...]``: the config comes from the experiment's
``get_config(variant)``, command-line overrides are type-checked against it, unknown keys
fail, and the config is locked before training starts. The process first re-executes
itself once with the malloc settings of ``common.malloc`` (page faults of large
temporaries were up to a third of a training step's CPU time; ``LANDMARKS_SYSTEM_MALLOC=1``
keeps glibc's defaults). A config with a top-level ``cpu_devices`` field gets that many
one-thread CPU devices (``common.sharding.use_cpu_devices``) before jax starts.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import ml_collections


def run(config_file: str, main: Callable[[ml_collections.ConfigDict, str], Any]) -> None:
    """Parse ``--workdir`` and ``--config*`` flags and call ``main(config, workdir)``."""
    from common.malloc import reexec_with_malloc_env

    reexec_with_malloc_env()
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
    flags.mark_flag_as_required("workdir")
    config_flags.DEFINE_config_file(
        "config",
        os.path.abspath(config_file),
        "Experiment config file[:variant].",
        lock_config=True,
    )

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        from common.sharding import maybe_initialize_distributed, use_cpu_devices

        config = flags.FLAGS.config
        if "cpu_devices" in config:
            use_cpu_devices(config.cpu_devices)
        maybe_initialize_distributed()
        for name in ("absl", "jax"):
            logging.getLogger(name).setLevel(logging.WARNING)
        main(config, flags.FLAGS.workdir)

    app.run(_main, argv=sys.argv)

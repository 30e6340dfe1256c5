"""The training parameters of a workdir's tokenizer, kept beside it in ``<file>.params.json``.

A tokenizer trained once and kept in the workdir (``common.data.bpe.load_or_train_bpe``,
``common.data.wordpiece.load_or_train_wordpiece``) is part of the run's identity: a rerun on
the same workdir asking for another vocabulary (a run killed before its first checkpoint,
restarted with another ``data.vocab_size``) must not silently read the old one back. The
parameters it was trained with are written next to it, and a later load that asks for other
ones is refused with a ``common.config.ConfigError`` naming each differing field. A tokenizer
written before these records were kept is compared by its vocabulary size alone (it may be
smaller than asked for only when the training text ran out of pairs to merge).
"""

from __future__ import annotations

import json
import os
from typing import Any


def record_path(path: str) -> str:
    """Where the parameters of the tokenizer file ``path`` are kept."""
    return f"{path}.params.json"


def write(path: str, params: dict[str, Any]) -> None:
    """Store ``params`` beside the tokenizer file ``path`` (atomically)."""
    rec = record_path(path)
    with open(f"{rec}.tmp", "w") as f:
        json.dump(params, f, sort_keys=True)
    os.replace(f"{rec}.tmp", rec)


def check(path: str, params: dict[str, Any], vocab_size: int, fields: dict[str, str]) -> None:
    """Raise ``ConfigError`` if the tokenizer at ``path`` (of ``vocab_size`` ids) was trained
    with other ``params`` than asked for now. ``fields``: the config field of each parameter
    (``{"vocab_size": "data.vocab_size"}``), named in the messages."""
    from common.config import ConfigError

    rec = record_path(path)
    if os.path.exists(rec):
        with open(rec) as f:
            saved = json.load(f)
        differ = [k for k in params if saved.get(k) != params[k]]
        was = {k: saved.get(k, "<not recorded>") for k in differ}
    elif "vocab_size" in params and vocab_size != params["vocab_size"]:
        differ, was = ["vocab_size"], {"vocab_size": vocab_size}
    else:
        differ, was = [], {}
    if differ:
        problems = [
            f"{fields.get(k, k)}={params[k]!r}: {path} was trained with {k}={was[k]!r}"
            for k in differ
        ]
        problems.append(
            f"{path}: this workdir belongs to a run with another tokenizer; use the same "
            "settings, a fresh --workdir, or delete the file (and the workdir's checkpoints, "
            "trained on its ids) to train a new one"
        )
        raise ConfigError(problems)

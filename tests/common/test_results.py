"""results.json: written whole (no temporary left), JSON-able from numpy values, with the
RESULT line holding the headline keys."""

import json

import numpy as np
import pytest

from common import results


def test_writes_json_and_prints_headline(tmp_path, capsys):
    summary = {"acc": np.float32(0.5), "n": np.int64(3), "name": "x y", "bad": float("nan")}
    out = results.write(str(tmp_path / "w"), summary, headline=("acc", "n"))
    assert capsys.readouterr().out == "RESULT acc=0.5000 n=3\n"
    on_disk = json.loads((tmp_path / "w" / "results.json").read_text())
    assert on_disk == out == {"acc": 0.5, "n": 3, "name": "x y", "bad": None}
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["results.json"]


def test_rewrite_replaces_the_old_file(tmp_path):
    results.write(str(tmp_path), {"a": 1, "b": 2})
    results.write(str(tmp_path), {"a": 3})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 3}


def test_missing_headline_key_fails_before_writing(tmp_path):
    with pytest.raises(KeyError, match="bleu"):
        results.write(str(tmp_path), {"a": 1}, headline=("bleu",))
    assert not (tmp_path / "results.json").exists()

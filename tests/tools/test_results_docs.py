"""``tools.results``: run records in, result tables out; every number shown comes from a
record, and the committed docs/results.md and README table are what the records generate."""

import json
import os

import pytest

from tools import results


def _write(runs, experiment, rid, values, **fields):
    rec = {
        "experiment": experiment,
        "id": rid,
        "variant": "default",
        "commit": "abc1234",
        "date": rid[:10],
        "machine": "test CPU",
        "source": "test",
        "results": values,
        **fields,
    }
    os.makedirs(runs / experiment, exist_ok=True)
    (runs / experiment / f"{rid}.json").write_text(json.dumps(rec))


@pytest.fixture
def docs(tmp_path, monkeypatch):
    """A temporary tree: runs/, tried/, results.md and a README with the table markers."""
    runs, tried = tmp_path / "runs", tmp_path / "tried"
    tried.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{results.README_BEGIN}\nold\n{results.README_END}\n\nend\n")
    monkeypatch.setattr(results, "RUNS_DIR", str(runs))
    monkeypatch.setattr(results, "TRIED_DIR", str(tried))
    monkeypatch.setattr(results, "RESULTS_MD", str(tmp_path / "results.md"))
    monkeypatch.setattr(results, "README", str(readme))
    return tmp_path


def test_build_shows_recorded_values_and_only_those(docs):
    runs = docs / "runs"
    _write(runs, "gpt_shakespeare", "2026-01-02-new", {"bits_per_char": 2.38514}, headline=True)
    _write(runs, "gpt_shakespeare", "2026-01-01-old", {"bits_per_char": 2.4, "other": 9.87})
    _write(runs, "enwik_sparse", "2026-01-01-a", {"bits_per_byte": 3.59}, headline=True, label="f")
    (docs / "tried" / "gpt_shakespeare.md").write_text("Tried: more steps.\n")
    assert results.build(runs_dir=str(runs), tried_dir=str(docs / "tried")) == 0
    md = (docs / "results.md").read_text()
    gpt = md[md.index("## gpt_shakespeare") : md.index("## enwik_sparse")]
    # Newest first; 4 decimals at most; 2.4 shown with the 4 digits bits/char always has.
    assert gpt.index("2.3851") < gpt.index("2.4000")
    assert "9.87" not in md  # a value outside the experiment's columns is not shown
    assert gpt.rstrip().endswith("Tried: more steps.")
    assert "translate_bible" not in md  # no record, no section
    readme = (docs / "README.md").read_text()
    assert "old" not in readme and readme.endswith("end\n")
    assert "test bits/char **2.3851**" in readme  # only the headline record is quoted
    assert "test bits/byte **3.590**" in readme  # transcribed 3.590 keeps its printed digits
    assert "| `python -m experiments.translate_bible` | - |" in readme
    assert results.build(check=True, runs_dir=str(runs), tried_dir=str(docs / "tried")) == 0
    _write(runs, "gpt_shakespeare", "2026-01-03-newer", {"bits_per_char": 2.3}, headline=True)
    assert results.build(check=True, runs_dir=str(runs), tried_dir=str(docs / "tried")) == 1
    assert "2.3000" not in (docs / "results.md").read_text()  # --check writes nothing


def test_record_copies_results_config_and_provenance(docs):
    workdir = docs / "wd"
    (workdir / "checkpoints" / "20" / "meta").mkdir(parents=True)
    (workdir / "checkpoints" / "100" / "meta").mkdir(parents=True)
    (workdir / "checkpoints" / "20" / "meta" / "metadata").write_text('{"model": {"d": 1}}')
    (workdir / "checkpoints" / "100" / "meta" / "metadata").write_text('{"model": {"d": 2}}')
    (workdir / "results.json").write_text(json.dumps({"bits_per_char": 2.5, "wall_s": 600.0}))
    runs = results.RUNS_DIR
    _write(
        docs / "runs", "gpt_shakespeare", "2026-01-01-old", {"bits_per_char": 2.4}, headline=True
    )
    path = results.record(
        str(workdir), "gpt_shakespeare", command="make train", headline=True, runs_dir=runs
    )
    rec = json.loads(open(path).read())
    assert rec["results"] == {"bits_per_char": 2.5, "wall_s": 600.0}
    assert rec["config"] == {"model": {"d": 2}}  # the latest checkpoint's (step 100, not 20)
    assert rec["wall_min"] == 10.0 and rec["command"] == "make train"
    assert rec["commit"].split("-")[0] == results._git("rev-parse", "--short", "HEAD")
    assert rec["machine"] and rec["id"] == os.path.basename(path)[:-5]
    old = json.loads((docs / "runs" / "gpt_shakespeare" / "2026-01-01-old.json").read_text())
    assert old["headline"] is False  # the new headline run replaces the old one
    again = results.record(str(workdir), "gpt_shakespeare", runs_dir=results.RUNS_DIR)
    assert again != path  # a second record of the same day and commit gets its own id


def test_bad_input_is_named(docs):
    with pytest.raises(FileNotFoundError, match="results.json"):
        results.record(str(docs), "gpt_shakespeare", runs_dir=results.RUNS_DIR)
    with pytest.raises(ValueError, match="unknown experiment"):
        results.record(str(docs), "nope", runs_dir=results.RUNS_DIR)
    os.makedirs(docs / "runs" / "gpt_shakespeare")
    (docs / "runs" / "gpt_shakespeare" / "x.json").write_text('{"experiment": "gpt_shakespeare"}')
    with pytest.raises(ValueError, match="lacks"):
        results.load_records(results.RUNS_DIR)


def test_fmt():
    assert results.fmt(0.5998765) == "0.5999"
    assert results.fmt(0.6, 3, 4) == "0.600"
    assert results.fmt(0.9213, 3, 4) == "0.9213"
    assert results.fmt(868.4, 0, 0) == "868"
    assert results.fmt(7350) == "7,350"
    assert results.fmt(None) == "-"


def test_committed_results_are_up_to_date():
    """docs/results.md and README's table are what `python -m tools.results` makes of the
    committed records (rebuild after adding a record or editing docs/tried/)."""
    assert results.build(check=True) == 0

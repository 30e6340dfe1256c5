"""metrics.jsonl after a resume: the records the interrupted process wrote past the restored
checkpoint (and a line cut by a kill) are dropped, so the file reads as one run."""

import json

from common.metrics import MetricWriter


def read(path):
    return [json.loads(line) for line in open(path)]


def test_resume_drops_records_past_the_restored_step(tmp_path):
    writer = MetricWriter(str(tmp_path), 60, progress_bar=False)
    for step in range(10, 60, 10):
        writer.write(step, {"loss": 1.0 / step})
    writer.write(40, {"loss": 0.5}, split="eval")
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 60, "split": "tr')  # killed mid-write

    # Killed after step 50's record, resumed from the checkpoint of step 30.
    writer = MetricWriter(str(tmp_path), 60, start_step=30, progress_bar=False)
    for step in range(40, 70, 10):
        writer.write(step, {"loss": 2.0 / step})
    writer.close()
    records = read(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(s, "train") for s in range(10, 70, 10)]
    assert [r["loss"] for r in records] == [1.0 / s for s in (10, 20, 30)] + [
        2.0 / s for s in (40, 50, 60)
    ]


def test_fresh_start_in_an_old_workdir_keeps_nothing(tmp_path):
    """A rerun with no checkpoint to resume from (killed before its first) starts at 0."""
    writer = MetricWriter(str(tmp_path), 20, progress_bar=False)
    writer.write(10, {"loss": 1.0})
    writer.close()
    writer = MetricWriter(str(tmp_path), 20, start_step=0, progress_bar=False)
    writer.write(10, {"loss": 3.0})
    writer.close()
    assert [r["loss"] for r in read(tmp_path / "metrics.jsonl")] == [3.0]


def test_resume_at_the_last_record_changes_nothing(tmp_path):
    writer = MetricWriter(str(tmp_path), 20, progress_bar=False)
    writer.write(10, {"loss": 1.0})
    writer.write(20, {"loss": 0.5})
    writer.close()
    before = (tmp_path / "metrics.jsonl").read_bytes()
    MetricWriter(str(tmp_path), 20, start_step=20, progress_bar=False).close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before

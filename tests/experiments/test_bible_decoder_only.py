"""Decoder-only translation (T-D / T-DMCA) on the Bible: length-bucketed batches score only
the Spanish part and are a pure function of the step; end to end on the real corpus it
trains, decodes greedily and reports sacreBLEU with its signature."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import bible_decoder_only as bd

DELIM = 99
PAIRS = [([5] * n, [7] * m) for n, m in [(3, 4), (10, 20), (40, 50), (2, 1), (30, 31), (60, 90)]]


def test_batches_score_exactly_the_spanish_part_and_depend_only_on_the_step():
    data = bd.PairBatches(PAIRS, [16, 64, 128], 256, DELIM, seed=3, multiple=2)
    again = bd.PairBatches(PAIRS, [16, 64, 128], 256, DELIM, seed=3, multiple=2)
    seen = set()
    for step in range(20):
        batch = data.batch_at(step)
        rows, length = batch["inputs"].shape
        seen.add(length)
        assert rows % 2 == 0 and rows * length <= 256
        for k, v in again.batch_at(step).items():
            np.testing.assert_array_equal(v, batch[k])
        for r in range(rows):
            scored = batch["targets"][r][batch["weights"][r] > 0]
            # Spanish tokens (7) then eos (0); never an English token (5) or the delimiter.
            assert scored[-1] == bd.EOS and set(scored[:-1].tolist()) <= {7}
            delim = int(np.flatnonzero(batch["inputs"][r] == DELIM)[0])
            assert (batch["weights"][r][:delim] == 0).all() and batch["weights"][r][delim] == 1
    assert seen == {16, 64, 128}
    data.set_state({"step": 7, "seed": 3})
    np.testing.assert_array_equal(next(data)["inputs"], again.batch_at(7)["inputs"])


def test_unknown_layer_letter_fails_before_training(tmp_path):
    config = bd.get_config("smoke")
    config.model.layer_pattern = "LMQ"
    with pytest.raises(ValueError, match=r"layer_pattern='LMQ' has unknown letter\(s\) \['Q'\]"):
        bd.build_model(config, 100)


@pytest.mark.slow
def test_smoke_run_reports_bleu_with_signature(tmp_path, tfds_dir):
    config = bd.get_config("smoke")
    config.data.data_dir = tfds_dir
    config.train.steps = 10
    config.eval.max_test_examples = 4
    config.eval.batch_size = 4
    summary = bd.main(config, str(tmp_path))
    assert summary["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert 0.0 <= summary["bleu"] <= 100.0 and summary["test_verses"] == 4
    assert summary["steps"] == 10 and np.isfinite(summary["test_nll_per_token"])
    lines = (tmp_path / "translations_test.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        "Ruth 1:1",
        "Ruth 1:2",
        "Ruth 1:3",
        "Ruth 1:4",
    ]
    assert json.loads((tmp_path / "results.json").read_text())["bleu"] == summary["bleu"]

"""The enwik8-style experiment end to end on the real Wikipedia bytes: a short run learns
(held-out bits per byte far below the best context-free model), and bad configs fail
before anything compiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.data import wikipedia
from experiments import enwik_sparse

SHORT = {
    "data.seq_len": 64,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.d_model": 64,
    "model.d_ff": 256,
    "model.stride": 8,
    "model.c": 2,
    "optim.lr": 3e-3,
    "optim.warmup_steps": 20,
    "train.steps": 400,
    "train.batch_size": 16,
    "train.log_every": 50,
    "train.eval_every": 1000,
    "train.checkpoint_every": 1000,
    "eval.max_bytes": 2_000,
    "eval.test_max_bytes": 20_000,
}


def make_config(tfds_dir, **overrides):
    config = enwik_sparse.get_config()
    for key, value in {**SHORT, "data.data_dir": tfds_dir, **overrides}.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def unigram_bits_per_byte(train: np.ndarray, test: np.ndarray) -> float:
    """The best context-free model: add-one byte frequencies of the training articles."""
    p = (np.bincount(train, minlength=256) + 1) / (len(train) + 256)
    return float(-np.log2(p[test[1:]]).mean())


@pytest.mark.slow
def test_short_run_learns_on_real_bytes(tmp_path, tfds_dir):
    summary = enwik_sparse.main(make_config(tfds_dir), str(tmp_path))
    train = wikipedia.load_bytes("train", tfds_dir)
    test = wikipedia.load_bytes("test", tfds_dir)[: 20_000 + 1]
    unigram = unigram_bits_per_byte(train, test)
    # Measured: 3.75 bits/byte after 400 steps (fixed, merged) against the unigram's 5.29
    # (after 150 steps the model is still on the unigram plateau, ~4.8-5.0).
    assert summary["bits_per_byte"] < unigram - 1.0, (summary, unigram)
    assert summary["bits_per_byte"] < 4.2
    assert summary["test_bytes_scored"] == 20_000
    assert summary["ms_per_step"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["bits_per_byte"] == pytest.approx(summary["bits_per_byte"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model.c": 16}, r"c=16 must be at most the block l = stride=8"),
        ({"model.stride": 128}, r"stride=128 does not fit the sequence \(max_len=64\)"),
        ({"model.attention": "local"}, r"attention='local'"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, tfds_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        enwik_sparse.main(make_config(tfds_dir, **overrides), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()

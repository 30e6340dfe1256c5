"""Labelled fine-tuning batches: balanced over classes, a pure function of (seed, step),
resumable; evaluation visits every example once with zero-weight padding."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.classification import LabelledBatches, eval_batches


def _arrays():
    labels = np.array([0] * 80 + [1] * 15 + [2] * 5, np.int32)  # 16:3:1 imbalance
    return {"tokens": np.arange(100 * 4).reshape(100, 4), "labels": labels}


def test_balanced_draws_each_class_equally():
    data = LabelledBatches(_arrays(), 64, seed=1)
    labels = np.concatenate([next(data)["labels"] for _ in range(100)])
    shares = np.bincount(labels, minlength=3) / len(labels)
    se = np.sqrt(1 / 3 * 2 / 3 / len(labels))
    assert np.all(np.abs(shares - 1 / 3) < 4 * se), shares
    unbalanced = LabelledBatches(_arrays(), 64, seed=1, balanced=False)
    labels = np.concatenate([unbalanced.batch_at(s)["labels"] for s in range(100)])
    assert abs(np.mean(labels == 0) - 0.8) < 4 * np.sqrt(0.16 / len(labels))


def test_rows_stay_together_and_resume_is_exact():
    arrays = _arrays()
    a = LabelledBatches(arrays, 8, seed=2)
    batches = [next(a) for _ in range(3)]
    for batch in batches:  # each row's fields come from one example
        np.testing.assert_array_equal(batch["tokens"], arrays["tokens"][batch["tokens"][:, 0] // 4])
        np.testing.assert_array_equal(batch["labels"], arrays["labels"][batch["tokens"][:, 0] // 4])
    b = LabelledBatches(arrays, 8, seed=2)
    b.set_state(a.get_state())
    np.testing.assert_array_equal(next(b)["tokens"], a.batch_at(3)["tokens"])
    half = LabelledBatches(arrays, 8, seed=2, process_rows=slice(4, 8))
    np.testing.assert_array_equal(half.batch_at(1)["tokens"], batches[1]["tokens"][4:])
    with pytest.raises(ValueError, match="seed=2"):
        LabelledBatches(arrays, 8, seed=3).set_state(a.get_state())


def test_uniform_draws_with_a_transform_follow_the_definition():
    # balanced=False: row r of batch s is example rng([seed, s]).integers(n, size=batch)[r],
    # whatever the classes; transforms apply to their array only, after the draw.
    images = np.arange(6 * 2 * 2, dtype=np.uint8).reshape(6, 2, 2, 1)
    labels = np.array([0, 0, 0, 0, 0, 1], np.int32)
    to_float = lambda x: x.astype(np.float32) / 2
    data = LabelledBatches(
        {"images": images, "labels": labels},
        5,
        seed=3,
        balanced=False,
        process_rows=slice(1, 4),
        transforms={"images": to_float},
    )
    for step in range(4):
        idx = np.random.default_rng([3, step]).integers(6, size=5)[1:4]
        batch = next(data)
        np.testing.assert_array_equal(batch["images"], to_float(images[idx]))
        assert batch["images"].dtype == np.float32
        np.testing.assert_array_equal(batch["labels"], labels[idx])
    with pytest.raises(ValueError, match="transforms for \\['pixels'\\]"):
        LabelledBatches({"images": images, "labels": labels}, 4, transforms={"pixels": to_float})


def test_eval_batches_cover_every_example_once():
    arrays = _arrays()
    batches = list(eval_batches(arrays, 32))
    assert len(batches) == 4 and all(len(b["labels"]) == 32 for b in batches)
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.sum() == 100 and (weights[100:] == 0).all()
    tokens = np.concatenate([b["tokens"] for b in batches])[:100]
    np.testing.assert_array_equal(tokens, arrays["tokens"])


def test_bad_examples_are_named():
    with pytest.raises(ValueError, match="'labels'"):
        LabelledBatches({"tokens": np.zeros((3, 2))}, 4)
    with pytest.raises(ValueError, match="differ in length"):
        LabelledBatches({"tokens": np.zeros((3, 2)), "labels": np.zeros(2)}, 4)

"""LM batching: every held-out token scored exactly once; training windows are a pure
function of (seed, step) and split across processes without overlap."""

import numpy as np
import pytest

from common.data.packing import PackedWindows, eval_windows


@pytest.mark.parametrize(
    "n,seq_len,stride", [(100, 16, 16), (100, 16, 4), (17, 16, 8), (5, 16, 16), (257, 32, 31)]
)
def test_eval_windows_score_each_target_once(n, seq_len, stride):
    tokens = np.arange(n)
    scored = []
    for batch in eval_windows(tokens, seq_len, batch_size=3, stride=stride):
        # targets are the next tokens of inputs
        valid = batch["weights"] > 0
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        scored.extend(batch["targets"][valid].tolist())
    assert sorted(scored) == list(range(1, n))


def test_sliding_eval_gives_context():
    seq_len, stride = 16, 4
    for batch in eval_windows(np.arange(200), seq_len, 4, stride=stride):
        for row_in, row_w in zip(batch["inputs"], batch["weights"], strict=True):
            if row_in[0] > 0:  # not the first window
                assert (row_w[: seq_len - stride] == 0).all()


def test_packed_windows_resume_and_process_split():
    tokens = np.arange(1000)
    a = PackedWindows(tokens, 16, 8, seed=3)
    batches = [next(a) for _ in range(7)]
    b = PackedWindows(tokens, 16, 8, seed=3)
    b.set_state(a.get_state() | {"step": 4})
    np.testing.assert_array_equal(next(b)["inputs"], batches[4]["inputs"])
    halves = [
        PackedWindows(tokens, 16, 8, seed=3, process_rows=slice(i * 4, i * 4 + 4)) for i in range(2)
    ]
    joined = np.concatenate([next(h)["inputs"] for h in halves])
    np.testing.assert_array_equal(joined, batches[0]["inputs"])
    np.testing.assert_array_equal(batches[0]["targets"][:, :-1], batches[0]["inputs"][:, 1:])
    with pytest.raises(ValueError, match="seq_len"):
        PackedWindows(tokens, 32, 8, seed=3).set_state(a.get_state())
    with pytest.raises(ValueError, match="too short"):
        PackedWindows(np.arange(10), 16, 8)

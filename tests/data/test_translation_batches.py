"""Encoder-decoder batches of token pairs: the layout of one batch written out by hand,
length filtering, and evaluation batches that visit every pair once, shortest first."""

import numpy as np

from common.data import translation as tr

S = tr.SPECIAL


def test_make_batch_layout_by_hand():
    b = tr.make_batch([[5, 6]], [[7, 8, 9]], length=5, rows=2)
    np.testing.assert_array_equal(b["src"], [[5, 6, S, S, S], [S] * 5])
    np.testing.assert_array_equal(b["src_mask"], [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["tgt_in"], [[S, 7, 8, 9, S], [S] * 5])
    np.testing.assert_array_equal(b["tgt_out"], [[7, 8, 9, S, S], [S] * 5])
    np.testing.assert_array_equal(b["tgt_weights"], [[1, 1, 1, 1, 0], [0] * 5])


def test_fitting_and_length_sorted():
    src, tgt = [[1] * 3, [1] * 9, [1]], [[2] * 4, [2], [2] * 5]
    assert tr.fitting(src, tgt, max_len=6) == [0, 2]  # pair 1: 9 + EOS > 6
    assert list(tr.length_sorted([3, 1, 2, 1], rows=3)) == [[1, 3, 2], [0]]


def test_eval_batches_visit_every_pair_once_padded_to_its_bucket():
    rng = np.random.default_rng(0)
    src = [list(rng.integers(1, 50, rng.integers(1, 30))) for _ in range(21)]
    tgt = [list(rng.integers(1, 50, rng.integers(1, 30))) for _ in range(21)]
    seen = []
    for idx, batch in tr.eval_batches(src, tgt, [8, 16, 32], rows=4):
        longest = max(max(len(src[i]), len(tgt[i])) for i in idx) + 1
        assert batch["src"].shape == (4, tr.bucket_of(longest, [8, 16, 32]))
        for row, i in enumerate(idx):
            assert batch["src"][row, : len(src[i])].tolist() == src[i]
            assert batch["tgt_weights"][row].sum() == len(tgt[i]) + 1
        assert batch["tgt_weights"][len(idx) :].sum() == 0  # padding rows score nothing
        seen += idx
    assert sorted(seen) == list(range(21))
    lengths = [max(len(src[i]), len(tgt[i])) for i in seen]
    assert lengths == sorted(lengths)

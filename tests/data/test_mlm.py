"""BERT pre-training data: the masking statistics (15% chosen; 80% [MASK], 10% random,
10% unchanged), the 50/50 next-sentence split with true continuations, special tokens
never chosen, determinism per (seed, step) and resume."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.mlm import PretrainingPairs, mask_tokens

PAD, UNK, CLS, SEP, MASK = range(5)
SPECIALS = (PAD, UNK, CLS, SEP, MASK)


def _corpus(seed=0, n_docs=12, units=(20, 60), length=(2, 14)):
    """Documents whose every unit is one distinct token id repeated (5 + unit number), so
    a sequence tells which units (and so which documents) it was built from."""
    rng = np.random.default_rng(seed)
    docs, owner, uid = [], {}, 5
    for d in range(n_docs):
        doc = []
        for _ in range(rng.integers(*units)):
            doc.append([uid] * int(rng.integers(*length)))
            owner[uid] = d
            uid += 1
        docs.append(doc)
    return docs, owner, uid


def _pipeline(docs, vocab, **kw):
    args = dict(
        max_len=64,
        batch_size=32,
        max_predictions=12,
        vocab_size=vocab,
        cls_id=CLS,
        sep_id=SEP,
        pad_id=PAD,
        mask_id=MASK,
        special_ids=SPECIALS,
        seed=3,
    )
    return PretrainingPairs(docs, **{**args, **kw})


def _within(observed, expected, n, sigmas=4.0):
    """Binomial proportion check: |observed - expected| within `sigmas` standard errors."""
    se = np.sqrt(expected * (1 - expected) / n)
    return abs(observed - expected) <= sigmas * se


def test_mask_tokens_80_10_10_on_a_large_sample():
    rng = np.random.default_rng(0)
    vocab = 1000
    random_ids = np.arange(5, vocab)
    chosen = as_mask = as_same = as_other = maskable_total = 0
    for _ in range(3000):
        tokens = rng.integers(5, vocab, size=128)
        maskable = rng.random(128) < 0.9
        out, pos, tgt = mask_tokens(
            tokens, maskable, rng, mask_id=MASK, random_ids=random_ids, max_predictions=128
        )
        assert maskable[pos].all() and (np.diff(pos) > 0).all()
        np.testing.assert_array_equal(tgt, tokens[pos])
        untouched = np.setdiff1d(np.arange(128), pos)
        np.testing.assert_array_equal(out[untouched], tokens[untouched])
        assert len(pos) == max(1, round(0.15 * maskable.sum()))
        maskable_total += maskable.sum()
        chosen += len(pos)
        as_mask += (out[pos] == MASK).sum()
        as_same += (out[pos] == tokens[pos]).sum()
        as_other += ((out[pos] != MASK) & (out[pos] != tokens[pos])).sum()
        assert np.isin(out[pos][out[pos] != MASK], random_ids).all()
    assert abs(chosen / maskable_total - 0.15) < 0.002  # rounding per sequence only
    assert _within(as_mask / chosen, 0.8, chosen)
    # A random draw equals the original token with probability 1/995.
    p_same = 0.1 + 0.1 / len(random_ids)
    assert _within(as_same / chosen, p_same, chosen)
    assert _within(as_other / chosen, 0.1 - 0.1 / len(random_ids), chosen)


def test_pairs_nsp_is_50_50_and_next_means_next():
    docs, owner, vocab = _corpus()
    data = _pipeline(docs, vocab)
    n_next = total = 0
    for step in range(100):
        batch = data.batch_at(step)
        for i in range(len(batch["tokens"])):
            tokens = batch["tokens"][i].copy()
            k = int(batch["mlm_weights"][i].sum())
            pos = batch["mlm_positions"][i, :k]
            tokens[pos] = batch["mlm_targets"][i, :k]  # the unmasked sequence
            n = int(batch["valid"][i].sum())
            seps = np.flatnonzero(tokens[:n] == SEP)
            assert tokens[0] == CLS and len(seps) == 2 and seps[1] == n - 1
            assert (tokens[n:] == PAD).all() and (batch["segments"][i, n:] == 0).all()
            seg = batch["segments"][i]
            assert (seg[: seps[0] + 1] == 0).all() and (seg[seps[0] + 1 : n] == 1).all()
            a, b = tokens[1 : seps[0]], tokens[seps[0] + 1 : n - 1]
            assert len(a) and len(b)
            is_next = batch["nsp_labels"][i] == 0
            if is_next:  # B starts with the unit right after A's last
                assert owner[b[0]] == owner[a[-1]] and b[0] == a[-1] + 1
            else:
                assert owner[b[0]] != owner[a[0]]
            n_next += is_next
            total += 1
    assert _within(n_next / total, 0.5, total)


def test_special_tokens_and_padding_are_never_chosen():
    docs, _, vocab = _corpus(seed=1)
    batch = _pipeline(docs, vocab).batch_at(0)
    for i in range(len(batch["tokens"])):
        k = int(batch["mlm_weights"][i].sum())
        assert 1 <= k <= 12 and (batch["mlm_weights"][i, k:] == 0).all()
        pos = batch["mlm_positions"][i, :k]
        assert not np.isin(batch["mlm_targets"][i, :k], SPECIALS).any()
        assert batch["valid"][i, pos].all()
        n = int(batch["valid"][i].sum())
        assert batch["tokens"][i, 0] == CLS and batch["tokens"][i, n - 1] == SEP


def test_deterministic_per_step_and_resumable():
    docs, _, vocab = _corpus(seed=2)
    a, b = _pipeline(docs, vocab), _pipeline(docs, vocab)
    first = [next(a) for _ in range(3)]
    b.set_state(a.get_state())
    fourth = next(b)
    for key, value in a.batch_at(3).items():
        np.testing.assert_array_equal(fourth[key], value)
    for key, value in b.batch_at(0).items():
        np.testing.assert_array_equal(first[0][key], value)
    other = _pipeline(docs, vocab, seed=4).batch_at(0)
    assert not np.array_equal(other["tokens"], first[0]["tokens"])
    with pytest.raises(ValueError, match="seed=3"):
        _pipeline(docs, vocab, seed=4).set_state(a.get_state())


def test_bad_corpus_is_named():
    with pytest.raises(ValueError, match="at least two non-empty documents"):
        _pipeline([[[5, 6], [7]]], 10)
    with pytest.raises(ValueError, match="max_len=4"):
        _pipeline([[[5], [6]], [[7]]], 10, max_len=4)

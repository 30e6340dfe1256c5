"""Decoder-only long-sequence LM (Liu et al. 2018, T-D / T-DMCA): causality of every layer
pattern, the loss mask covers exactly the output part of ``input <delim> output``, greedy
decoding equals argmax over the full forward pass, and config errors name the field."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlp import long_lm
from nlp.sparse_transformer import lm_loss_fn

N = 40
DELIM, EOS, PAD = 1, 2, 0


def _tokens(n=N, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 64, (2, n)), jnp.int32)


@functools.cache
def _model_and_params(pattern):
    model = long_lm.from_preset("t-dmca-tiny", layer_pattern=pattern)
    return model, jax.jit(model.init)(jax.random.key(0), _tokens())


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["LMLML", "DDDDD", "MM"])
def test_causality(pattern):
    """Changing token t changes no logit before t, and does change logits from t on."""
    model, params = _model_and_params(pattern)
    forward = jax.jit(model.apply)
    tokens = _tokens()
    for t in (5, 21, 23):  # inside block 0; block 2 of 8 (a compressed slot's last token, and not)
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % 64)
        a, b = forward(params, tokens), forward(params, changed)
        np.testing.assert_array_equal(a[:, :t], b[:, :t])
        assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-4


@pytest.mark.slow
def test_local_layers_see_only_their_block():
    """With only L layers (blocks of 8), a token changes nothing outside its own block."""
    model, params = _model_and_params("LL")
    tokens = _tokens()
    changed = tokens.at[:, 17].set((tokens[:, 17] + 1) % 64)
    a, b = jax.jit(model.apply)(params, tokens), jax.jit(model.apply)(params, changed)
    diff = np.abs(np.asarray(a - b)).max(axis=(0, 2))  # [len]
    assert (diff[:17] == 0).all() and (diff[24:] == 0).all()
    assert (diff[17:24] > 1e-4).all()


PAIRS = [([10, 11, 12, 13], [20, 21]), ([30], [40, 41, 42, 43, 44]), ([5, 6, 7], [])]


def test_make_batch_weights_exactly_the_output_part():
    batch = long_lm.make_batch(PAIRS, delim_id=DELIM, eos_id=EOS, pad_id=PAD, seq_len=12)
    for r, (src, tgt) in enumerate(PAIRS):
        seq = src + [DELIM] + tgt + [EOS]
        n = len(seq) - 1
        np.testing.assert_array_equal(batch["inputs"][r, :n], seq[:-1])
        np.testing.assert_array_equal(batch["targets"][r, :n], seq[1:])
        w = batch["weights"][r]
        # Scored targets are exactly the output tokens and the closing eos, nothing else.
        np.testing.assert_array_equal(batch["targets"][r][w > 0], tgt + [EOS])
        want = np.zeros(12, np.float32)
        want[len(src) : n] = 1  # input positions delim .. last target token
        np.testing.assert_array_equal(w, want)
        assert batch["inputs"][r, len(src)] == DELIM


def test_make_batch_truncates_the_source_first():
    seq, delim = long_lm.make_sequence(
        list(range(3, 30)), [40, 41, 42], delim_id=DELIM, eos_id=EOS, seq_len=10
    )
    assert seq == list(range(3, 9)) + [DELIM, 40, 41, 42, EOS] and delim == 6
    seq, delim = long_lm.make_sequence([3, 4], list(range(10, 40)), delim_id=1, eos_id=2, seq_len=6)
    assert seq == [1, 10, 11, 12, 13, 14, 2] and delim == 0


def test_loss_ignores_the_input_part():
    """The LM loss changes when an output target changes, never when a source one does."""
    model, params = _model_and_params("LMLML")
    batch = long_lm.make_batch(PAIRS, delim_id=DELIM, eos_id=EOS, pad_id=PAD, seq_len=N)
    loss_fn = jax.jit(lm_loss_fn(model))
    rng = jax.random.key(0)
    base = float(loss_fn(params["params"], batch, rng)[0])
    logits = jax.jit(model.apply)(params, batch["inputs"])
    logp = jax.nn.log_softmax(logits)
    picked = np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    w = batch["weights"]
    np.testing.assert_allclose(base, -(picked * w).sum() / w.sum(), rtol=1e-5)
    src_target = dict(batch, targets=batch["targets"].copy())
    src_target["targets"][0, 1] = 50  # a source token's target (weight 0)
    assert float(loss_fn(params["params"], src_target, rng)[0]) == base
    out_target = dict(batch, targets=batch["targets"].copy())
    out_target["targets"][0, 5] = 50  # an output token's target (weight 1)
    assert float(loss_fn(params["params"], out_target, rng)[0]) != base


@pytest.mark.slow
def test_greedy_decode_equals_argmax_of_the_full_forward():
    model, params = _model_and_params("LMLML")
    prompts = [[5, 6, 7, DELIM], [9, DELIM]]
    got = long_lm.greedy_decode(
        model, params, prompts, eos_id=EOS, pad_id=PAD, max_new_tokens=6, seq_len=N
    )
    forward = jax.jit(model.apply)
    for prompt, new in zip(prompts, got, strict=True):
        seq = np.full((1, N), PAD, np.int32)
        seq[0, : len(prompt)] = prompt
        want = []
        for t in range(len(prompt), len(prompt) + 6):
            nxt = int(np.argmax(forward(params, seq)[0, t - 1]))
            if nxt == EOS:
                break
            seq[0, t] = nxt
            want.append(nxt)
        assert new == want


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(layer_pattern="LMXL"), r"layer_pattern='LMXL' has unknown letter\(s\) \['X'\]"),
        (dict(layer_pattern=""), r"layer_pattern='' must be a non-empty string"),
        (dict(local_block=65), r"local_block=65 does not fit the sequence \(max_len=64\)"),
        (dict(compress_stride=99), r"compress_stride=99 does not fit the sequence"),
        (dict(num_heads=3), r"num_heads=3 does not divide d_model=32"),
        (dict(remat_policy="all"), r"remat_policy='all'"),
        (dict(num_heads=0), r"num_heads=0 must be a positive int"),
        (dict(activation="swish"), r"activation='swish' is not one of"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        long_lm.from_preset("t-dmca-tiny", **overrides)


def test_sequence_longer_than_max_len_fails_before_compiling():
    model = long_lm.from_preset("t-dmca-tiny")
    with pytest.raises(ValueError, match=r"sequence length 65 is longer than max_len=64"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 65), jnp.int32))

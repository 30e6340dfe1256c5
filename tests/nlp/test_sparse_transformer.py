"""Sparse Transformer (Child et al. 2019): causality of every attention kind and integration
mode, recomputation (remat) equal to no recomputation, factorized positions equal to their
sum definition, the scaled residual init, bf16 compute, and config errors that name the
field before anything compiles."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.losses import cross_entropy
from nlp import sparse_transformer as st

N = 40  # not a multiple of the stride 8: exercises the padding of the sparse kernels
KINDS = [
    ("dense", "interleaved"),
    ("strided", "interleaved"),
    ("strided", "merged"),
    ("strided", "multihead"),
    ("fixed", "interleaved"),
    ("fixed", "merged"),
    ("fixed", "multihead"),
]


def _tokens(n=N, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (2, n)), jnp.int32)


@functools.cache
def _model_and_params(kind, mode, **overrides):
    model = st.from_preset("sparse-transformer-tiny", attention=kind, mode=mode, **overrides)
    params = jax.jit(model.init)(jax.random.key(0), _tokens())
    return model, params


@pytest.mark.slow
@pytest.mark.parametrize("kind,mode", KINDS)
def test_causality(kind, mode):
    """Changing token t changes no logit before t, and does change logits from t on."""
    model, params = _model_and_params(kind, mode)
    forward = jax.jit(model.apply)
    tokens = _tokens()
    for t in (5, 21):  # inside the first block, and past a block boundary
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % 256)
        a, b = forward(params, tokens), forward(params, changed)
        np.testing.assert_array_equal(a[:, :t], b[:, :t])
        assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-4


def test_short_sequence_is_padded_to_one_stride():
    """A sequence shorter than the stride runs, and equals the prefix of a longer one."""
    model, params = _model_and_params("fixed", "merged")
    tokens = _tokens()
    forward = jax.jit(model.apply)
    np.testing.assert_allclose(
        forward(params, tokens[:, :5]), forward(params, tokens)[:, :5], atol=1e-5
    )


def _loss_and_grads(model, params, tokens):
    def loss(p):
        logits = model.apply(p, tokens[:, :-1])
        total, count = cross_entropy(logits, tokens[:, 1:])
        return total / count

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_gives_the_same_loss_and_grads(policy):
    base, params = _model_and_params("fixed", "interleaved")
    remat = st.from_preset(
        "sparse-transformer-tiny", attention="fixed", mode="interleaved", remat_policy=policy
    )
    tokens = _tokens(N + 1, seed=1)
    # The recomputation is really there: the grad's jaxpr holds a checkpoint (remat) call.
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: remat.apply(p, tokens).sum()))(params))
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    assert "checkpoint" not in str(
        jax.make_jaxpr(jax.grad(lambda p: base.apply(p, tokens).sum()))(params)
    )
    loss, grads = _loss_and_grads(base, params, tokens)
    loss_r, grads_r = _loss_and_grads(remat, params, tokens)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    flat, flat_r = jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_r)
    assert len(flat) == len(flat_r)
    for (path, g), g_r in zip(flat, flat_r, strict=True):
        np.testing.assert_allclose(g_r, g, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def _reference_positions(tables, shape, n):
    """The definition: position i = sum over axes of W_axis[digit_axis(i)] (mixed radix)."""
    out = np.zeros((n, tables[0].shape[1]), np.float32)
    for i in range(n):
        rest = i
        digits = []
        for size in reversed(shape):
            digits.append(rest % size)
            rest //= size
        for table, digit in zip(tables, reversed(digits), strict=True):
            out[i] += table[digit]
    return out


def test_text_positions_are_block_plus_inner():
    model = st.from_preset("sparse-transformer-tiny", max_len=44, stride=8)
    assert model.position_shape() == (6, 8)  # ceil(44 / 8) blocks of 8
    pos = st.FactorizedPositional(model.position_shape(), 16)
    variables = pos.init(jax.random.key(1), jnp.arange(44))
    out = pos.apply(variables, jnp.arange(44))
    tables = [np.asarray(variables["params"][f"embedding_{a}"].value) for a in range(2)]
    assert [t.shape for t in tables] == [(6, 16), (8, 16)]
    want = np.stack([tables[0][i // 8] + tables[1][i % 8] for i in range(44)])
    np.testing.assert_allclose(out, want, rtol=1e-6)
    np.testing.assert_allclose(out, _reference_positions(tables, (6, 8), 44), rtol=1e-6)


def test_image_positions_are_row_plus_column_plus_channel():
    model = st.from_preset(
        "sparse-transformer-tiny", positions="image", image_shape=(4, 5, 3), max_len=60
    )
    assert model.position_shape() == (4, 5, 3)
    pos = st.FactorizedPositional(model.position_shape(), 8)
    variables = pos.init(jax.random.key(2), jnp.arange(60))
    out = np.asarray(pos.apply(variables, jnp.arange(60)))
    rows, cols, chans = (np.asarray(variables["params"][f"embedding_{a}"].value) for a in range(3))
    for r in range(4):
        for c in range(5):
            for ch in range(3):
                i = (r * 5 + c) * 3 + ch  # raster order, channels innermost
                np.testing.assert_allclose(out[i], rows[r] + cols[c] + chans[ch], rtol=1e-6)


def test_residual_projections_are_scaled():
    model = st.from_preset("sparse-transformer-tiny", num_layers=4, d_model=64, d_ff=256)
    variables = jax.jit(model.init)(jax.random.key(0), _tokens())["params"]
    want = 0.02 / math.sqrt(2 * 4)
    outs = np.concatenate(
        [
            np.ravel(variables[f"h_{i}"][part][name]["kernel"].value)
            for i in range(4)
            for part, name in (("attention", "out"), ("mlp", "proj"))
        ]
    )
    qkv = np.concatenate(
        [np.ravel(variables[f"h_{i}"]["attention"]["qkv"]["kernel"].value) for i in range(4)]
    )
    assert abs(outs.std() / want - 1) < 0.05, outs.std()
    assert abs(qkv.std() / 0.02 - 1) < 0.05, qkv.std()


def test_bfloat16_compute_keeps_float32_params():
    model, params = _model_and_params("strided", "merged")
    bf16 = st.from_preset(
        "sparse-transformer-tiny", attention="strided", mode="merged", dtype=jnp.bfloat16
    )
    tokens = _tokens()
    shapes = jax.eval_shape(bf16.init, jax.random.key(0), tokens)
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    hidden = jax.make_jaxpr(lambda p: bf16.apply(p, tokens))(params)
    assert "bf16" in str(hidden)  # the matmuls really run in bfloat16
    out, ref = jax.jit(bf16.apply)(params, tokens), jax.jit(model.apply)(params, tokens)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.1)
    assert float(jnp.abs(out - ref).max()) > 0  # and differ from float32 by rounding


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(stride=128), r"stride=128 does not fit the sequence \(max_len=64\)"),
        (dict(c=9), r"c=9 must be at most the block l = stride=8"),
        (dict(num_heads=3, d_model=30, mode="multihead"), r"num_heads=3 is odd"),
        (dict(num_heads=5), r"num_heads=5 does not divide d_model=32"),
        (dict(attention="sparse"), r"attention='sparse'"),
        (dict(mode="mixed"), r"mode='mixed'"),
        (dict(remat_policy="some"), r"remat_policy='some'"),
        (dict(attention_impl="triton"), r"attention_impl='triton'"),
        (dict(head_offsets=(0, 1)), r"head_offsets=\(0, 1\) needs 4 ints"),
        (dict(position_block=65), r"position_block=65"),
        (dict(positions="image", image_shape=(4, 4, 3)), r"image_shape=\(4, 4, 3\) holds 48"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        st.from_preset("sparse-transformer-tiny", **overrides)


def test_sequence_longer_than_the_positional_table_fails_before_compiling():
    model = st.from_preset("sparse-transformer-tiny")
    with pytest.raises(ValueError, match=r"length 65 is longer than the positional table"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 65), jnp.int32))


def test_enwik8_preset_matches_the_paper():
    model = st.from_preset("sparse-transformer-enwik8")
    assert (model.num_layers, model.d_model, model.num_heads, model.stride) == (30, 512, 8, 128)
    assert (model.attention, model.mode, model.c, model.max_len) == ("fixed", "merged", 32, 12288)


@pytest.mark.parametrize("kind,mode", [("fixed", "interleaved"), ("strided", "multihead")])
def test_splash_kernel_gives_the_xla_logits(kind, mode):
    """The Pallas block-sparse kernel (interpret mode on CPU) computes the same model."""
    model, params = _model_and_params(kind, mode)
    splash = model.clone(attention_impl="splash")
    tokens = _tokens()
    np.testing.assert_allclose(
        splash.apply(params, tokens), model.apply(params, tokens), atol=1e-4, rtol=1e-4
    )

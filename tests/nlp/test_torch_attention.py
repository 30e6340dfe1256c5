"""``nlp.torch_attention`` equals ``torch.nn`` (eval mode, float32, to 1e-5) with converted
weights: ``MultiheadAttention`` (packed and kdim != vdim != embed_dim, bool and float masks,
averaged and per-head weights, bias_kv / zero_attn, unbatched), ``TransformerEncoderLayer``
and ``TransformerDecoderLayer`` (post-LN and norm_first, relu and gelu), ``Transformer``; and
bad configs, inputs and state dicts raise clear errors.

Every torch parameter is re-drawn with a larger spread than torch's init (LayerNorm scales
around 1, biases nonzero), so a transposed kernel, a swapped q|k|v part or a missing bias
shows up far above the tolerance.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nlp import torch_attention as ta  # noqa: E402

TOL = 1e-5
pytestmark = [
    # Mixing bool and float masks is deprecated in torch, but still defined: tested on purpose.
    pytest.mark.filterwarnings("ignore:Support for mismatched"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
]


def _randomize(module, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return module.eval()


def _t(x):
    return torch.from_numpy(np.array(x))


def _close(ours, ref, what):
    ref = ref.detach().numpy()
    diff = float(np.max(np.abs(np.asarray(ours) - ref)))
    assert diff <= TOL, f"{what}: max |ours - torch| = {diff:.3g} > {TOL}"
    return diff


def _rng(seed):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- attention

MHA_CASES = {
    # name: (torch kwargs, q/k/v lengths, batch_first, masks, need/average weights)
    "packed_self": dict(kw={}, L=7, S=7, self_attn=True, masks="none", avg=True),
    "kdim_vdim_bool_masks": dict(
        kw=dict(kdim=24, vdim=20, batch_first=True), L=5, S=9, masks="bool", avg=False
    ),
    "packed_cross_float_masks": dict(kw={}, L=6, S=8, masks="float3d", avg=True),
    "mixed_masks_bias_kv_zero_attn": dict(
        kw=dict(bias=False, add_bias_kv=True, add_zero_attn=True, kdim=16, vdim=16),
        L=4,
        S=6,
        masks="mixed",
        avg=False,
    ),
}


def _mha_masks(kind, n, h, L, S, rng):
    if kind == "none":
        return {}
    pad = np.zeros((n, S), bool)
    pad[0, -2:] = True  # the first row's last two keys are padding
    if kind == "bool":
        blocked = rng.random((L, S)) < 0.3
        blocked[:, 0] = False  # every query keeps a key
        return dict(key_padding_mask=pad, attn_mask=blocked)
    if kind == "float3d":
        return dict(
            key_padding_mask=np.where(pad, -1e4, 0.0).astype(np.float32),
            attn_mask=rng.normal(size=(n * h, L, S)).astype(np.float32),
        )
    # mixed: bool key padding + float 2-D additive mask
    return dict(key_padding_mask=pad, attn_mask=rng.normal(size=(L, S)).astype(np.float32))


@pytest.mark.parametrize("case", sorted(MHA_CASES))
def test_multihead_attention_matches_torch(case):
    c = MHA_CASES[case]
    E, h, n = 32, 4, 3
    kw = dict(c["kw"])
    ref = _randomize(torch.nn.MultiheadAttention(E, h, **kw), seed=1)
    ours = ta.TorchMultiheadAttention(E, h, **kw)
    params = ta.params_from_torch_mha(ref.state_dict(), ours)

    rng = _rng(2)
    bf = kw.get("batch_first", False)
    shape = lambda length, width: (n, length, width) if bf else (length, n, width)
    query = rng.normal(size=shape(c["L"], E)).astype(np.float32)
    if c.get("self_attn"):
        key = value = query
    else:
        key = rng.normal(size=shape(c["S"], kw.get("kdim", E))).astype(np.float32)
        value = rng.normal(size=shape(c["S"], kw.get("vdim", E))).astype(np.float32)
    masks = _mha_masks(c["masks"], n, h, c["L"], c["S"], rng)

    with torch.no_grad():
        t_out, t_w = ref(
            _t(query),
            _t(key),
            _t(value),
            need_weights=True,
            average_attn_weights=c["avg"],
            **{name: _t(m) for name, m in masks.items()},
        )
    q = jnp.asarray(query)
    k, v = (q, q) if c.get("self_attn") else (jnp.asarray(key), jnp.asarray(value))
    out, w = ours.apply(params, q, k, v, need_weights=True, average_attn_weights=c["avg"], **masks)
    _close(out, t_out, f"{case} output")
    _close(w, t_w, f"{case} weights")
    # need_weights=False takes torch's other path (scaled_dot_product_attention).
    t_masks = {name: _t(m) for name, m in masks.items()}
    with torch.no_grad():
        t_out2, _ = ref(_t(query), _t(key), _t(value), need_weights=False, **t_masks)
    out2, none = ours.apply(params, q, k, v, need_weights=False, **masks)
    assert none is None
    _close(out2, t_out2, f"{case} output without weights")


def test_multihead_attention_unbatched_and_causal():
    E, h, L = 16, 2, 5
    ref = _randomize(torch.nn.MultiheadAttention(E, h), seed=3)
    ours = ta.TorchMultiheadAttention(E, h)
    params = ta.params_from_torch_mha(ref.state_dict(), ours)
    x = _rng(4).normal(size=(L, E)).astype(np.float32)  # unbatched [L, E]
    causal = ta.square_subsequent_mask(L)
    with torch.no_grad():
        t_out, t_w = ref(_t(x), _t(x), _t(x), attn_mask=_t(causal), is_causal=True)
    xj = jnp.asarray(x)
    out, w = ours.apply(params, xj, xj, xj, attn_mask=causal, is_causal=True)
    assert out.shape == (L, E) and w.shape == (L, L)
    _close(out, t_out, "unbatched output")
    _close(w, t_w, "unbatched weights")
    # is_causal without a mask builds the causal mask (torch raises here instead).
    out_c, _ = ours.apply(params, xj, is_causal=True)
    np.testing.assert_allclose(out_c, out, atol=TOL)


def test_more_heads_add_no_parameters():
    def count(h):
        m = ta.TorchMultiheadAttention(32, h)
        shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 1, 32)))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

    torch_count = sum(p.numel() for p in torch.nn.MultiheadAttention(32, 4).parameters())
    assert count(1) == count(4) == count(8) == torch_count == 4 * (32 * 32 + 32)


# --------------------------------------------------------------------------- layers

LAYER_CASES = [(nf, act) for nf in (False, True) for act in ("relu", "gelu")]
D, H, FF = 32, 4, 48


@pytest.mark.parametrize("norm_first,act", LAYER_CASES)
def test_encoder_layer_matches_torch(norm_first, act):
    kw = dict(dim_feedforward=FF, activation=act, norm_first=norm_first, batch_first=True)
    ref = _randomize(torch.nn.TransformerEncoderLayer(D, H, **kw), seed=5)
    ours = ta.TorchTransformerEncoderLayer(D, H, **kw)
    params = ta.params_from_torch_encoder_layer(ref.state_dict(), ours)
    rng = _rng(6)
    src = rng.normal(size=(2, 9, D)).astype(np.float32)
    pad = np.zeros((2, 9), bool)
    pad[1, -3:] = True
    # Same mask types: torch's eval fast path returns NaN for a float src_mask mixed with a
    # bool key padding mask (a deprecated combination).
    mask = rng.random((9, 9)) < 0.3
    np.fill_diagonal(mask, False)
    with torch.no_grad():
        t_out = ref(_t(src), src_mask=_t(mask), src_key_padding_mask=_t(pad))
    out = ours.apply(params, jnp.asarray(src), mask, pad)
    _close(out, t_out, f"encoder layer norm_first={norm_first} {act}")


@pytest.mark.parametrize("norm_first,act", LAYER_CASES)
def test_decoder_layer_matches_torch(norm_first, act):
    kw = dict(dim_feedforward=FF, activation=act, norm_first=norm_first)  # sequence-first
    ref = _randomize(torch.nn.TransformerDecoderLayer(D, H, **kw), seed=7)
    ours = ta.TorchTransformerDecoderLayer(D, H, **kw)
    params = ta.params_from_torch_decoder_layer(ref.state_dict(), ours)
    rng = _rng(8)
    tgt = rng.normal(size=(6, 2, D)).astype(np.float32)  # [T, N, D]
    memory = rng.normal(size=(8, 2, D)).astype(np.float32)
    mem_pad = np.zeros((2, 8), bool)
    mem_pad[0, -2:] = True
    causal = np.asarray(ta.square_subsequent_mask(6))
    with torch.no_grad():
        t_out = ref(
            _t(tgt),
            _t(memory),
            tgt_mask=_t(causal),
            memory_key_padding_mask=_t(mem_pad),
            tgt_is_causal=True,
        )
    out = ours.apply(
        params,
        jnp.asarray(tgt),
        jnp.asarray(memory),
        tgt_mask=causal,
        memory_key_padding_mask=mem_pad,
        tgt_is_causal=True,
    )
    _close(out, t_out, f"decoder layer norm_first={norm_first} {act}")


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_matches_torch(norm_first):
    kw = dict(
        d_model=D,
        nhead=H,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=FF,
        norm_first=norm_first,
        batch_first=True,
    )
    ref = _randomize(torch.nn.Transformer(**kw), seed=9)
    ours = ta.TorchTransformer(**kw)
    params = ta.params_from_torch_transformer(ref.state_dict(), ours)
    rng = _rng(10)
    src = rng.normal(size=(2, 7, D)).astype(np.float32)
    tgt = rng.normal(size=(2, 5, D)).astype(np.float32)
    src_pad = np.zeros((2, 7), bool)
    src_pad[1, -2:] = True
    tgt_mask = np.asarray(ta.square_subsequent_mask(5))
    masks = dict(tgt_mask=tgt_mask, src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad)
    with torch.no_grad():
        t_out = ref(_t(src), _t(tgt), **{k: _t(v) for k, v in masks.items()})
    out = ours.apply(params, jnp.asarray(src), jnp.asarray(tgt), **masks)
    _close(out, t_out, f"Transformer norm_first={norm_first}")


def test_encoder_and_decoder_stacks_match_torch():
    kw = dict(dim_feedforward=FF, activation="gelu")
    enc_ref = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(D, H, **kw), 2, norm=torch.nn.LayerNorm(D)
    )
    dec_ref = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(D, H, **kw), 2)
    enc_ref, dec_ref = _randomize(enc_ref, seed=12), _randomize(dec_ref, seed=13)
    enc = ta.TorchTransformerEncoder(D, H, num_layers=2, norm=True, **kw)
    dec = ta.TorchTransformerDecoder(D, H, num_layers=2, **kw)
    enc_params = ta.params_from_torch_encoder(enc_ref.state_dict(), enc)
    dec_params = ta.params_from_torch_decoder(dec_ref.state_dict(), dec)
    rng = _rng(14)
    src = rng.normal(size=(7, 2, D)).astype(np.float32)  # sequence-first
    tgt = rng.normal(size=(5, 2, D)).astype(np.float32)
    causal = np.asarray(ta.square_subsequent_mask(5))
    with torch.no_grad():
        t_mem = enc_ref(_t(src))
        t_out = dec_ref(_t(tgt), t_mem, tgt_mask=_t(causal))
    mem = enc.apply(enc_params, jnp.asarray(src))
    _close(mem, t_mem, "TransformerEncoder")
    _close(dec.apply(dec_params, jnp.asarray(tgt), mem, causal), t_out, "TransformerDecoder")


# --------------------------------------------------------------------------- bad input


def test_conversion_names_kdim_vdim_mismatches():
    ref = torch.nn.MultiheadAttention(32, 4, kdim=24, vdim=20)
    with pytest.raises(ValueError, match="separate q/k/v projections"):
        ta.params_from_torch_mha(ref.state_dict(), ta.TorchMultiheadAttention(32, 4))
    with pytest.raises(ValueError, match="kdim=16"):
        ta.params_from_torch_mha(
            ref.state_dict(), ta.TorchMultiheadAttention(32, 4, kdim=16, vdim=20)
        )
    packed = torch.nn.MultiheadAttention(32, 4)
    with pytest.raises(ValueError, match="packed in_proj_weight"):
        ta.params_from_torch_mha(
            packed.state_dict(), ta.TorchMultiheadAttention(32, 4, kdim=24, vdim=20)
        )
    with pytest.raises(ValueError, match="bias=False"):
        ta.params_from_torch_mha(
            torch.nn.MultiheadAttention(32, 4, bias=False).state_dict(),
            ta.TorchMultiheadAttention(32, 4),
        )
    with pytest.raises(ValueError, match="does not use"):  # bias_k / bias_v left over
        ta.params_from_torch_mha(
            torch.nn.MultiheadAttention(32, 4, add_bias_kv=True).state_dict(),
            ta.TorchMultiheadAttention(32, 4),
        )
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64)
    with pytest.raises(ValueError, match="linear1.weight has shape"):
        ta.params_from_torch_encoder_layer(
            layer.state_dict(), ta.TorchTransformerEncoderLayer(32, 4, dim_feedforward=48)
        )


def test_conversion_with_a_wrong_prefix_names_the_missing_weight():
    """No projection weights under the prefix: the error names the missing weight, not a
    bias=False build (which only a present weight without in_proj_bias indicates)."""
    layer_sd = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64).state_dict()
    for module, weight in (
        (ta.TorchMultiheadAttention(32, 4), "in_proj_weight"),
        (ta.TorchMultiheadAttention(32, 4, kdim=24, vdim=20), "q_proj_weight"),
    ):
        for prefix in ("", "self_atn."):  # the whole layer's dict; a misspelt prefix
            with pytest.raises(ValueError, match=f"missing .*{weight}") as err:
                ta.params_from_torch_mha(layer_sd, module, prefix=prefix)
            assert "bias=False" not in str(err.value)


def test_bias_kv_init_matches_torch_xavier_normal():
    """torch's xavier_normal_ on bias_k / bias_v [1, 1, E] has fan_in = fan_out = E, so
    std sqrt(1 / E) (not sqrt(2 / (E + 1)), what treating them as [E_in=1, E_out] gives)."""
    E = 1024
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, 1, add_bias_kv=True)
    want = float(torch.cat([ref.bias_k.flatten(), ref.bias_v.flatten()]).detach().std())
    m = ta.TorchMultiheadAttention(E, 1, add_bias_kv=True, batch_first=True)
    p = nn.unbox(jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 1, E))))["params"]
    got = np.concatenate([np.ravel(p["bias_k"]), np.ravel(p["bias_v"])])
    assert abs(want / (1 / E) ** 0.5 - 1) < 0.1  # torch's own draw: std sqrt(1 / E)
    assert abs(float(got.std()) / want - 1) < 0.1, (float(got.std()), want)
    assert np.abs(got).max() > 2.5 * want  # an untruncated normal, as torch draws


def test_bad_inputs_raise_clear_errors():
    m = ta.TorchMultiheadAttention(32, 4, kdim=24, vdim=20, batch_first=True)
    q, k, v = jnp.zeros((2, 5, 32)), jnp.zeros((2, 6, 24)), jnp.zeros((2, 6, 20))
    params = m.init(jax.random.key(0), q, k, v)
    with pytest.raises(ValueError, match="key has width 20, but the module has kdim=24"):
        m.apply(params, q, v, v)
    with pytest.raises(ValueError, match="same batch size and length"):
        m.apply(params, q, k, v[:, :4])
    with pytest.raises(ValueError, match=r"2-D attn_mask has shape \(6, 5\), expected \(5, 6\)"):
        m.apply(params, q, k, v, attn_mask=jnp.zeros((6, 5), bool))
    with pytest.raises(ValueError, match=r"3-D attn_mask .* expected \(8, 5, 6\)"):
        m.apply(params, q, k, v, attn_mask=jnp.zeros((2, 5, 6), bool))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(6,\), expected \(2, 6\)"):
        m.apply(params, q, k, v, key_padding_mask=jnp.zeros((6,), bool))
    with pytest.raises(ValueError, match="only bool and floating types of attn_mask"):
        m.apply(params, q, k, v, attn_mask=jnp.zeros((5, 6), jnp.int32))
    with pytest.raises(ValueError, match="num_heads=5 does not divide embed_dim=32"):
        ta.TorchMultiheadAttention(32, 5)
    with pytest.raises(ValueError, match="activation='tanh'"):
        ta.TorchTransformerEncoderLayer(32, 4, activation="tanh")
    with pytest.raises(ValueError, match="num_encoder_layers=0"):
        ta.TorchTransformer(d_model=32, nhead=4, num_encoder_layers=0)
    t = ta.TorchTransformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1)
    with pytest.raises(ValueError, match="feature number of src and tgt"):
        t.init(jax.random.key(0), jnp.zeros((3, 2, 32)), jnp.zeros((3, 2, 16)))
    with pytest.raises(ValueError, match="batch number of src and tgt"):
        t.init(jax.random.key(0), jnp.zeros((3, 2, 32)), jnp.zeros((3, 1, 32)))


def test_dropout_and_dtype_are_honoured():
    E, h = 32, 4
    x = jnp.asarray(_rng(11).normal(size=(2, 6, E)).astype(np.float32))
    m = ta.TorchMultiheadAttention(E, h, dropout=0.5, batch_first=True)
    params = m.init(jax.random.key(0), x)
    plain = ta.TorchMultiheadAttention(E, h, batch_first=True).apply(params, x)
    np.testing.assert_array_equal(m.apply(params, x)[0], plain[0])  # eval: no dropout
    out, w = m.apply(
        params,
        x,
        average_attn_weights=False,
        deterministic=False,
        rngs={"dropout": jax.random.key(1)},
    )
    assert float(jnp.abs(out - plain[0]).max()) > 1e-3
    assert 0.3 < float((w == 0).mean()) < 0.7  # returned weights are post-dropout, as torch's
    bf16 = ta.TorchTransformerEncoderLayer(E, h, dim_feedforward=48, dtype=jnp.bfloat16)
    f32 = ta.TorchTransformerEncoderLayer(E, h, dim_feedforward=48)
    params = f32.init(jax.random.key(2), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    low, high = bf16.apply(params, x), f32.apply(params, x)
    assert low.dtype == jnp.bfloat16
    assert float(jnp.abs(low.astype(jnp.float32) - high).max()) < 0.1

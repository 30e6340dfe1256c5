"""GPT invariants: KV-cache decoding equals the full forward pass, causality, banded layers,
sampling filters, and clear errors on bad configs and prompts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import masks
from nlp import gpt
from nlp.decoding import generate, sample_logits

TINY = ["gpt-tiny", "gpt3-tiny", "gpt1-tiny"]


def _init(name, **kw):
    model = gpt.from_preset(name, **kw)
    tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, model.vocab_size)
    params = nn.unbox(model.init(jax.random.key(0), tokens))
    return model, params, tokens


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_kv_cache_decoding_equals_full_forward(name):
    model, params, tokens = _init(name)
    full = model.apply(params, tokens)  # [2, 48, vocab]
    step = jax.jit(lambda t, c, i: model.apply(params, t, cache=c, cache_index=i))
    cache = model.init_cache(2, tokens.shape[1])
    logits, cache = model.apply(params, tokens[:, :5], cache=cache, cache_index=0)
    steps = [logits]
    for t in range(5, tokens.shape[1]):  # one token at a time through the cache
        logits, cache = step(tokens[:, t : t + 1], cache, t)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_greedy_generate_equals_argmax_of_full_forward(name):
    model, params, tokens = _init(name)
    out = generate(model, params, tokens[:, :6], max_new_tokens=24, temperature=0.0)
    forward = jax.jit(lambda t: model.apply(params, t))
    seq = np.zeros((2, 30), np.int32)  # fixed shape: one compile; causality ignores the tail
    seq[:, :6] = tokens[:, :6]
    for t in range(6, 30):
        seq[:, t] = np.argmax(forward(seq)[:, t - 1], axis=-1)
    np.testing.assert_array_equal(out, seq)


@pytest.mark.parametrize("name", TINY)
def test_causality(name):
    """Changing token t changes no output before t (and does change outputs from t on)."""
    model, params, tokens = _init(name)
    t = 20
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % model.vocab_size)
    a, b = model.apply(params, tokens), model.apply(params, changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-4


@pytest.mark.slow
def test_banded_layer_sees_only_its_window():
    """A GPT-3 banded block: output i ignores tokens at or before i - window."""
    window = 8
    block = gpt.Block(
        num_heads=4,
        d_ff=64,
        pre_norm=True,
        local_window=window,
        dropout=0.0,
        attn_dropout=0.0,
        layer_norm_eps=1e-5,
        activation="gelu_tanh",
        out_init_std=0.02,
        deterministic=True,
    )
    x = jax.random.normal(jax.random.key(0), (1, 32, 16))
    pos = jnp.arange(32)
    params = block.init(jax.random.key(1), x, pos)
    y = block.apply(params, x, pos)[0]
    y2 = block.apply(params, x.at[:, 10].set(jax.random.normal(jax.random.key(2), (16,))), pos)[0]
    moved = np.abs(np.asarray(y2 - y)).max(axis=-1)[0]  # [32]
    assert (moved[:10] == 0).all()
    assert (moved[10 : 10 + window] > 0).all()  # positions 10 .. 17 see token 10
    assert (moved[10 + window :] == 0).all()  # 18 and later do not


def test_band_mask_matches_definition():
    q, k, w = np.arange(12), np.arange(12), 4
    mask = np.asarray(masks.band_mask(q, k, w))[0, 0]
    expected = np.array([[i - w < j <= i for j in k] for i in q])
    np.testing.assert_array_equal(mask, expected)


def test_alternating_layers():
    model = gpt.from_preset("gpt3-small")
    assert [model.layer_window(i) for i in range(4)] == [None, 256, None, 256]
    assert gpt.from_preset("gpt2-small").layer_window(1) is None


def test_residual_projection_init_is_scaled():
    model, params, _ = _init("gpt-tiny")
    std = float(jnp.std(params["params"]["h_0"]["attn"]["out"]["kernel"]))
    assert abs(std - 0.02 / np.sqrt(2 * model.num_layers)) < 0.004
    std_fc = float(jnp.std(params["params"]["h_0"]["mlp"]["fc"]["kernel"]))
    assert abs(std_fc - 0.02) < 0.004


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
    model, params, tokens = _init("gpt-tiny", dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = model.apply(params, tokens)
    assert logits.dtype == jnp.float32
    ref = gpt.from_preset("gpt-tiny").apply(params, tokens)
    assert float(jnp.abs(logits - ref).max()) < 0.1  # bf16 rounding, same function


@pytest.mark.slow
def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)

    def draw(**kw):
        one = lambda k: sample_logits(logits, k, **kw)[0]
        return set(np.asarray(jax.jit(jax.vmap(one))(keys)).tolist())

    assert draw(top_k=2) <= {0, 1}
    assert draw(top_p=0.7) <= {0, 1}  # 0.5 + 0.3 covers 0.7
    assert draw(top_p=0.4) == {0}
    assert draw(temperature=0.0) == {0}
    assert len(draw(temperature=1.0)) >= 3


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="num_heads=5 does not divide d_model=32"):
        gpt.from_preset("gpt-tiny", num_heads=5)
    with pytest.raises(ValueError, match="attention='sparse'"):
        gpt.from_preset("gpt-tiny", attention="sparse")
    with pytest.raises(ValueError, match="unknown GPT fields"):
        gpt.from_preset("gpt-tiny", n_layers=3)
    with pytest.raises(ValueError, match="unknown GPT preset"):
        gpt.from_preset("gpt5")
    with pytest.raises(ValueError, match="num_heads=0 must be a positive int"):  # not ZeroDivision
        gpt.from_preset("gpt-tiny", num_heads=0)
    with pytest.raises(ValueError, match="activation='swish' is not one of"):  # not at init
        gpt.from_preset("gpt-tiny", activation="swish")


def test_prompt_longer_than_context_is_rejected():
    model, params, _ = _init("gpt-tiny")
    prompt = jnp.zeros((1, 60), jnp.int32)
    with pytest.raises(ValueError, match="exceeds the model's context max_len=64"):
        generate(model, params, prompt, max_new_tokens=10)
    with pytest.raises(ValueError, match="exceeds the context max_len=64"):
        model.apply(params, jnp.zeros((1, 65), jnp.int32))


def test_generate_pads_after_eos():
    model, params, tokens = _init("gpt-tiny")
    out = np.asarray(
        generate(
            model,
            params,
            tokens[:, :4],
            max_new_tokens=30,
            rng=jax.random.key(3),
            eos_id=5,
            temperature=2.0,
        )
    )
    for row in out:
        gen = row[4:]
        hits = np.flatnonzero(gen == 5)
        if len(hits):
            assert (gen[hits[0] :] == 5).all()

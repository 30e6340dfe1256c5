"""The attention core: every implementation against the einsum definition, and the choice
``implementation=None`` makes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import attention as attn


def _qkv(dtype=jnp.float32, b=2, n=24, h=3, d=16):
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal((b, n, h, d)), dtype) for _ in "qkv"]


@pytest.mark.parametrize("implementation", [None, "xla", "einsum"])
@pytest.mark.parametrize("masking", ["causal", "padding", "none"])
def test_implementations_equal_definition(implementation, masking):
    q, k, v = _qkv()
    n = q.shape[1]
    mask, is_causal = None, masking == "causal"
    if masking == "padding":  # row b keeps its first n - 5 b keys: [b, 1, 1, k]
        keep = n - 5 * jnp.arange(q.shape[0])
        mask = (jnp.arange(n)[None, :] < keep[:, None])[:, None, None, :]
    allowed = np.ones((1, 1, n, n), bool)
    if is_causal:
        allowed &= np.tril(np.ones((n, n), bool))
    if mask is not None:
        allowed = allowed & np.asarray(mask)
    out = attn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=implementation
    )
    np.testing.assert_allclose(np.asarray(out), _definition(q, k, v, allowed), atol=2e-5, rtol=1e-5)


def _definition(q, k, v, allowed, bias=None):
    """softmax(q k^T / sqrt(d) + bias, keys not ``allowed`` left out) v, in numpy (float64)."""
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + np.asarray(bias, np.float64)
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, vn)


def _band(n, window):
    """GPT-3's band, from its definition: query i sees keys j with i - window < j <= i."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    return ((j <= i) & (j > i - window))[None, None]


@pytest.mark.parametrize("implementation", [None, "xla", "einsum"])
@pytest.mark.parametrize("window", [1, 5, 8, 24, 40])
def test_local_window_equals_definition(implementation, window):
    q, k, v = _qkv()
    out = attn.dot_product_attention(q, k, v, local_window=window, implementation=implementation)
    expected = _definition(q, k, v, _band(q.shape[1], window))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("cudnn_refuses", [False, True])
def test_local_window_on_gpu_is_cudnn_sliding_window(monkeypatch, cudnn_refuses):
    """Where ``auto_implementation`` picks cuDNN, a band is one fused call with jax's window
    ``(window - 1, 0)``: run here by XLA with the same arguments, it equals the definition.
    If cuDNN refuses it, the blockwise band runs instead."""
    q, k, v = _qkv()
    monkeypatch.setattr(attn, "auto_implementation", lambda *a, **kw: "cudnn")
    real = jax.nn.dot_product_attention
    calls = []

    def fake(*args, implementation=None, **kw):
        calls.append((implementation, kw.get("local_window_size"), kw.get("is_causal")))
        if cudnn_refuses:
            raise NotImplementedError("no sliding window in this cuDNN")
        return real(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    out = attn.dot_product_attention(q, k, v, local_window=5)
    assert calls == [("cudnn", (4, 0), True)]
    expected = _definition(q, k, v, _band(q.shape[1], 5))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-5)


def test_local_window_bad_input_is_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="local_window must be >= 1"):
        attn.dot_product_attention(q, k, v, local_window=0)
    with pytest.raises(ValueError, match="without an explicit mask"):
        attn.dot_product_attention(q, k, v, local_window=4, mask=jnp.ones((1, 1, 24, 24), bool))
    with pytest.raises(ValueError, match="q_len == kv_len"):
        attn.dot_product_attention(q[:, :8], k, v, local_window=4)


def test_auto_implementation_picks_cudnn_only_where_it_applies():
    q, k, _ = _qkv(jnp.bfloat16)
    pick = lambda q, k, backend="gpu", **kw: attn.auto_implementation(q, k, backend=backend, **kw)
    assert pick(q, k) == "cudnn"  # GPU, bf16, no explicit mask: the fused kernel
    assert pick(q.astype(jnp.float16), k.astype(jnp.float16)) == "cudnn"
    assert pick(q, k, backend="cpu") == "xla"
    assert pick(q, k, backend="tpu") == "xla"
    assert pick(q.astype(jnp.float32), k.astype(jnp.float32)) == "xla"  # cuDNN: half only
    assert pick(q, k.astype(jnp.float16)) == "xla"  # mixed dtypes
    assert pick(q, k, mask=jnp.ones((2, 1, 1, 24), bool)) == "xla"  # would be materialised
    assert pick(q, k, bias=jnp.zeros((1, 3, 24, 24), jnp.bfloat16)) == "xla"
    q12, k12, _ = _qkv(jnp.bfloat16, d=12)
    assert pick(q12, k12) == "xla"  # head size not a multiple of 8
    assert attn.auto_implementation(q, k) == ("cudnn" if jax.default_backend() == "gpu" else "xla")


def test_auto_falls_back_to_xla_when_cudnn_refuses(monkeypatch):
    """On a GPU whose cuDNN refuses the call at trace time, ``None`` still runs (XLA)."""
    q, k, v = _qkv(jnp.bfloat16)
    monkeypatch.setattr(attn, "auto_implementation", lambda *a, **kw: "cudnn")
    real = jax.nn.dot_product_attention
    calls = []

    def fake(*args, implementation=None, **kw):
        calls.append(implementation)
        if implementation == "cudnn":
            raise RuntimeError("cuDNN is not detected.")
        return real(*args, implementation=implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    out = attn.dot_product_attention(q, k, v, is_causal=True)
    assert calls == ["cudnn", "xla"]
    ref = attn.dot_product_attention(q, k, v, is_causal=True, implementation="einsum")
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2
    )


def test_unknown_implementation_is_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="flash"):
        attn.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("n", [64, 70, 131])
@pytest.mark.parametrize("masking", ["none", "padding", "per_query", "bias"])
def test_causal_chunks_equal_definition(n, masking):
    """Causal self-attention in query chunks (what ``implementation=None`` runs on the XLA
    path from 64 tokens on) equals the causal definition, with every kind of extra mask."""
    q, k, v = _qkv(n=n, d=8)
    b, h = q.shape[0], q.shape[2]
    rng = np.random.default_rng(1)
    mask = bias = None
    allowed = np.tril(np.ones((n, n), bool))[None, None]
    if masking == "padding":  # [b, 1, 1, k]: row b keeps its first n - 9 b keys
        mask = jnp.asarray(np.arange(n)[None, :] < (n - 9 * np.arange(b))[:, None])[:, None, None]
    elif masking == "per_query":  # [b, 1, q, k], every query keeps itself
        mask = jnp.asarray((rng.random((b, 1, n, n)) < 0.7) | np.eye(n, dtype=bool))
    elif masking == "bias":  # [1, h, q, k]
        bias = jnp.asarray(rng.standard_normal((1, h, n, n)), jnp.float32)
    if mask is not None:
        allowed = allowed & np.asarray(mask)
    chunked = attn.causal_chunked_attention(q, k, v, mask=mask, bias=bias)
    routed = attn.dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=True)
    expected = _definition(q, k, v, allowed, bias)
    for out in (chunked, routed):
        np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_causal_chunks_gradients_equal_xla():
    q, k, v = _qkv(n=96, d=8)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)

    ours = grads(attn.causal_chunked_attention)
    ref = grads(
        lambda q, k, v: attn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    )
    for a, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_causal_chunks_skip_the_keys_they_cannot_see(monkeypatch):
    """n = 256 runs as 4 query chunks of 64 against 64, 128, 192 and 256 keys; short
    sequences, explicit implementations and cross-attention keep the single call."""
    calls = []
    real = attn.einsum_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attn, "einsum_attention", spy)
    q, k, v = _qkv(b=1, n=256, h=1, d=8)
    attn.dot_product_attention(q, k, v, is_causal=True)
    assert calls == [(64, 64), (64, 128), (64, 192), (64, 256)]
    calls.clear()
    q, k, v = _qkv(n=40)
    attn.dot_product_attention(q, k, v, is_causal=True)  # under 2 chunks of 32: one call
    q, k, v = _qkv(n=64)
    attn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    attn.dot_product_attention(q, k[:, :32], v[:, :32], is_causal=False)
    assert calls == []
    attn.dot_product_attention(q, k, v, is_causal=True, implementation="einsum")
    assert calls == [(64, 64)]


def test_causal_chunks_dropout_draws_per_chunk():
    """With dropout, chunk ``i`` is ``einsum_attention`` of its queries with the key
    ``fold_in(rng, i)``: the documented definition."""
    q, k, v = _qkv(n=64, d=8)
    rng = jax.random.key(3)
    out = attn.causal_chunked_attention(q, k, v, dropout_rate=0.3, dropout_rng=rng)
    for i, (s, e) in enumerate([(0, 32), (32, 64)]):
        causal = jnp.arange(e)[None, :] <= jnp.arange(s, e)[:, None]
        ref = attn.einsum_attention(
            q[:, s:e],
            k[:, :e],
            v[:, :e],
            mask=causal[None, None],
            dropout_rate=0.3,
            dropout_rng=jax.random.fold_in(rng, i),
        )
        np.testing.assert_allclose(np.asarray(out[:, s:e]), np.asarray(ref), atol=1e-6)
    assert not np.allclose(np.asarray(out), np.asarray(attn.causal_chunked_attention(q, k, v)))


def test_causal_chunks_bad_input_is_named():
    q, k, v = _qkv(n=64)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        attn.causal_chunked_attention(q, k[:, :32], v[:, :32])
    with pytest.raises(ValueError, match="chunks >= 1"):
        attn.causal_chunked_attention(q, k, v, chunks=0)

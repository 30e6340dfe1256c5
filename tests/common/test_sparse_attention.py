"""Sparse attention variants against masked dense references built from their definitions.

Each variant's output and its gradients w.r.t. q, k, v must equal ``einsum_attention`` with
the pattern's ``[n, n]`` mask (float32, 1e-5), for several n, l, c, including n not a
multiple of l. The masks themselves are checked against a brute-force enumeration of the
definitions in Child et al. 2019 (sections 4.3 and 5) and Liu et al. 2018.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import masks
from common import sparse_attention as sa
from common.attention import einsum_attention

BATCH, HEADS, HEAD_DIM = 2, 4, 8


def _normal(seed, *shape):
    # numpy, not jax.random: every new shape would cost a threefry compilation (seconds).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _qkv(n, seed=0, heads=HEADS, dv=HEAD_DIM):
    q = _normal(3 * seed, BATCH, n, heads, HEAD_DIM)
    k = _normal(3 * seed + 1, BATCH, n, heads, HEAD_DIM)
    v = _normal(3 * seed + 2, BATCH, n, heads, dv)
    return q, k, v


def _masked_reference(q, k, v, mask):
    """Masked dense attention; ``mask`` is ``[q, k]`` or ``[heads, q, k]``. A query with no
    key outputs zeros (the sparse variants' convention)."""
    mask = mask if mask.ndim == 3 else mask[None]  # [h|1, q, k]
    out = einsum_attention(q, k, v, mask=mask[None])  # [b, q, h, dv]
    has_key = jnp.swapaxes(mask.any(-1), 0, 1)  # [q, h|1]
    return jnp.where(has_key[None, :, :, None], out, 0.0)


def _value_and_grads(fn, q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent)


@jax.jit
def _reference_value_and_grads(q, k, v, cotangent, mask):
    """The masked dense reference; ``mask`` is a traced ``[heads, n, n]`` argument, so one
    compilation serves every pattern of the same length."""
    return _value_and_grads(lambda q, k, v: _masked_reference(q, k, v, mask), q, k, v, cotangent)


def _assert_matches(fn, n, *, mask=None, reference=None, dv=HEAD_DIM, seed=0):
    """``fn(q, k, v)`` against the masked dense reference (``mask``, ``[n, n]`` or
    ``[heads, n, n]``) or a custom ``reference(q, k, v)``: outputs and q/k/v gradients."""
    q, k, v = _qkv(n, seed, dv=dv)
    cotangent = _normal(1000 + seed, *v.shape)
    out, grads = jax.jit(functools.partial(_value_and_grads, fn))(q, k, v, cotangent)
    if reference is None:
        mask = jnp.broadcast_to(mask, (HEADS, n, n))
        ref_out, ref_grads = _reference_value_and_grads(q, k, v, cotangent, mask)
    else:
        ref_out, ref_grads = jax.jit(functools.partial(_value_and_grads, reference))(
            q, k, v, cotangent
        )
    assert out.shape == ref_out.shape == v.shape
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, g, ref_g in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref_g, atol=1e-5, rtol=1e-5, err_msg=f"d/d{name}")


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "n, block, look_back", [(16, 4, True), (23, 5, True), (23, 5, False), (7, 16, True)]
)
def test_local_matches_masked_dense(n, block, look_back):
    fn = functools.partial(sa.local_attention, block=block, look_back=look_back)
    _assert_matches(fn, n, mask=sa.local_mask(n, block=block, look_back=look_back))


@pytest.mark.parametrize("n, window", [(16, 4), (23, 5), (23, 1), (9, 32)])
def test_banded_matches_masked_dense(n, window):
    mask = sa.banded_mask(n, window=window)
    pos = jnp.arange(n)
    np.testing.assert_array_equal(mask, masks.band_mask(pos, pos, window)[0, 0])
    _assert_matches(functools.partial(sa.banded_attention, window=window), n, mask=mask)


@pytest.mark.parametrize("mode", sa.MODES)
@pytest.mark.parametrize("n, stride", [(16, 4), (23, 5)])
def test_strided_matches_masked_dense(n, stride, mode):
    mask = sa.strided_mask(n, stride=stride, mode=mode, heads=HEADS)
    fn = functools.partial(sa.strided_attention, stride=stride, mode=mode)
    _assert_matches(fn, n, mask=mask)


@pytest.mark.parametrize("mode", sa.MODES)
@pytest.mark.parametrize("n, block, c", [(16, 4, 1), (23, 5, 2), (23, 5, 5)])
def test_fixed_matches_masked_dense(n, block, c, mode):
    mask = sa.fixed_mask(n, block=block, c=c, mode=mode, heads=HEADS)
    fn = functools.partial(sa.fixed_attention, block=block, c=c, mode=mode)
    _assert_matches(fn, n, mask=mask)


@pytest.mark.parametrize("mode", ["B", "merged", "multihead"])
def test_fixed_head_offsets_match_masked_dense(mode):
    n, block, c = 23, 6, 2
    offsets = [0, 4, 1, 2][: HEADS // 2 if mode == "multihead" else HEADS]
    mask = sa.fixed_mask(n, block=block, c=c, mode=mode, heads=HEADS, head_offsets=offsets)
    assert mask.shape == (HEADS, n, n)
    fn = functools.partial(sa.fixed_attention, block=block, c=c, mode=mode, head_offsets=offsets)
    _assert_matches(fn, n, mask=mask)


def _reference_compress(x, kernel, bias, stride):
    """Slot s = bias + sum_t x[s * stride - width + 1 + t] @ kernel[t] (tokens < 0 are 0)."""
    b, n, h, d = x.shape
    width = kernel.shape[0]
    slots = -(-n // stride)
    tokens = np.arange(slots)[:, None] * stride - width + 1 + np.arange(width)  # [slots, width]
    flat = jnp.concatenate([jnp.zeros((b, width, h * d)), x.reshape(b, n, h * d)], axis=1)
    taps = flat[:, tokens + width]  # [b, slots, width, h * d]; index < width reads a zero
    return (jnp.einsum("bswi,wio->bso", taps, kernel) + bias).reshape(b, slots, h, d)


@pytest.mark.parametrize(
    "n, stride, width, chunk, dv", [(23, 3, 3, 256, 8), (16, 2, 4, 3, 8), (10, 3, 3, 2, 6)]
)
def test_memory_compressed_matches_masked_dense(n, stride, width, chunk, dv):
    feat_k, feat_v = HEADS * HEAD_DIM, HEADS * dv
    w_k = _normal(7, width, feat_k, feat_k) / np.sqrt(width * feat_k)
    w_v = _normal(8, width, feat_v, feat_v) / np.sqrt(width * feat_v)
    b_k, b_v = 0.1 * _normal(9, feat_k), 0.1 * _normal(10, feat_v)
    fn = functools.partial(
        sa.memory_compressed_attention,
        compress_k=w_k,
        compress_v=w_v,
        bias_k=b_k,
        bias_v=b_v,
        stride=stride,
        chunk=chunk,
    )
    mask = sa.compressed_mask(n, stride=stride)

    def reference(q, k, v):
        k_c = _reference_compress(k, w_k, b_k, stride)
        v_c = _reference_compress(v, w_v, b_v, stride)
        return _masked_reference(q, k_c, v_c, mask)

    _assert_matches(fn, n, reference=reference, dv=dv)


def test_memory_compressed_kv_module():
    q, k, v = _qkv(11)
    module = sa.MemoryCompressedKV(kernel_size=3, stride=3)
    params = jax.jit(module.init)(jax.random.key(0), k, v)["params"]
    feat = HEADS * HEAD_DIM
    assert params["k_kernel"].shape == params["v_kernel"].shape == (3, feat, feat)
    assert params["k_bias"].shape == (feat,) and params["k_bias"].dtype == jnp.float32
    k_c, v_c = jax.jit(module.apply)({"params": params}, k, v)
    assert k_c.shape == v_c.shape == (BATCH, 4, HEADS, HEAD_DIM)
    np.testing.assert_allclose(
        k_c, _reference_compress(k, params["k_kernel"], params["k_bias"], 3), atol=1e-5
    )
    out = jax.jit(sa.compressed_attention)(q, k_c, v_c)
    pure = jax.jit(sa.memory_compressed_attention)(
        q,
        k,
        v,
        compress_k=params["k_kernel"],
        compress_v=params["v_kernel"],
        bias_k=params["k_bias"],
        bias_v=params["v_bias"],
    )
    np.testing.assert_allclose(out, pure, atol=1e-6)

    half = module.clone(dtype=jnp.bfloat16)
    half_params = jax.eval_shape(half.init, jax.random.key(0), k, v)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(half_params))
    k_c16, _ = jax.eval_shape(half.apply, {"params": half_params}, k, v)
    assert k_c16.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- causality


def _variants(n):
    feat = HEADS * HEAD_DIM
    w = _normal(3, 3, feat, feat) / np.sqrt(3 * feat)
    yield "local", functools.partial(sa.local_attention, block=5)
    yield "banded", functools.partial(sa.banded_attention, window=5)
    yield (
        "compressed",
        functools.partial(sa.memory_compressed_attention, compress_k=w, compress_v=w, chunk=2),
    )
    for mode in sa.MODES:
        yield f"strided-{mode}", functools.partial(sa.strided_attention, stride=5, mode=mode)
        yield f"fixed-{mode}", functools.partial(sa.fixed_attention, block=5, c=2, mode=mode)


@pytest.mark.parametrize("name", [name for name, _ in _variants(23)])
def test_causal(name):
    """Changing k and v at position t changes no output before t (and some after it; not
    always: nothing sees ``t = 0`` in fixed head B)."""
    n = 23
    fn = jax.jit(dict(_variants(n))[name])
    q, k, v = _qkv(n)
    base = fn(q, k, v)
    noise_k, noise_v = _qkv(n, seed=5)[1:]
    changed = []
    for t in (0, 4, 8, 13, 19):
        k2, v2 = k.at[:, t].add(noise_k[:, t]), v.at[:, t].add(noise_v[:, t])
        out = fn(q, k2, v2)
        np.testing.assert_array_equal(out[:, :t], base[:, :t], err_msg=f"{name}, t={t}")
        changed.append(not np.allclose(out[:, t:], base[:, t:]))
    assert sum(changed) >= 3, f"{name}: the perturbations changed nothing ({changed})"


@pytest.mark.parametrize("name", ["local", "banded", "compressed"])
def test_dropout_is_unbiased_and_causal(name):
    n = 9
    fn = dict(_variants(n))[name]
    q, k, v = _qkv(n)

    @jax.jit
    def run(q, k, v):
        drop = lambda k, v, key: fn(q, k, v, dropout_rate=0.25, dropout_rng=key)
        # One dropout draw, vmapped over 500 keys and over (k, v) with and without a change
        # at position 6. "rbg" keys: a threefry draw takes seconds to compile on CPU.
        ks, vs = jnp.stack([k, k.at[:, 6].add(1.0)]), jnp.stack([v, v.at[:, 6].add(1.0)])
        keys = jax.random.split(jax.random.key(0, impl="rbg"), 500)
        samples = jax.vmap(jax.vmap(drop, in_axes=(0, 0, None)), in_axes=(None, None, 0))(
            ks, vs, keys
        )  # [500, 2, b, n, h, d]
        return fn(q, k, v), samples

    exact, samples = run(q, k, v)
    assert not np.allclose(samples[0, 0], exact)
    np.testing.assert_allclose(samples[:, 0].mean(0), exact, atol=0.15)
    np.testing.assert_array_equal(samples[:, 1, :, :6], samples[:, 0, :, :6])


# ----------------------------------------------------------------------------- masks


def _brute(n, allowed):
    """``[n, n]`` bool from a predicate on (i, j), enumerated pair by pair."""
    return np.array([[bool(j <= i and allowed(i, j)) for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("n, l", [(13, 4), (16, 4), (16, 5)])
def test_strided_modes_cover_the_papers_positions(n, l):
    a = _brute(n, lambda i, j: i - l < j)  # the previous l positions
    b = _brute(n, lambda i, j: (i - j) % l == 0)  # every l-th position back
    np.testing.assert_array_equal(sa.strided_mask(n, stride=l, mode="A"), a)
    np.testing.assert_array_equal(sa.strided_mask(n, stride=l, mode="B"), b)
    merged = sa.strided_mask(n, stride=l, mode="merged")
    np.testing.assert_array_equal(merged, a | b)
    multi = sa.strided_mask(n, stride=l, mode="multihead", heads=6)
    np.testing.assert_array_equal(multi, np.stack([a] * 3 + [b] * 3))
    # Child et al. 4.3: every j <= i is reachable in two steps, in either interleaved order.
    causal = np.tril(np.ones((n, n), bool))
    for first, second in ((a, b), (b, a), (merged, merged)):
        np.testing.assert_array_equal((second.astype(int) @ first.astype(int)) > 0, causal)


@pytest.mark.parametrize("n, l, c", [(13, 4, 1), (16, 4, 2), (17, 5, 5)])
def test_fixed_modes_cover_the_papers_positions(n, l, c):
    a = _brute(n, lambda i, j: j // l == i // l)  # own block
    b = _brute(n, lambda i, j: j % l in range(l - c, l))  # last c of every block
    np.testing.assert_array_equal(sa.fixed_mask(n, block=l, c=c, mode="A"), a)
    np.testing.assert_array_equal(sa.fixed_mask(n, block=l, c=c, mode="B"), b)
    merged = sa.fixed_mask(n, block=l, c=c, mode="merged")
    np.testing.assert_array_equal(merged, a | b)
    multi = sa.fixed_mask(n, block=l, c=c, mode="multihead", heads=4)
    np.testing.assert_array_equal(multi, np.stack([a, a, b, b]))
    causal = np.tril(np.ones((n, n), bool))
    np.testing.assert_array_equal((merged.astype(int) @ merged.astype(int)) > 0, causal)
    # Per-head offsets: head h attends to columns {l-c-o_h, ..., l-1-o_h} of each block.
    offsets = [0, l - c]
    shifted = sa.fixed_mask(n, block=l, c=c, mode="B", heads=2, head_offsets=offsets)
    for head, o in enumerate(offsets):
        want = _brute(n, lambda i, j, o=o: j % l in range(l - c - o, l - o))
        np.testing.assert_array_equal(shifted[head], want)


def test_local_and_compressed_masks_match_their_definitions():
    n, block = 19, 4
    within = _brute(n, lambda i, j: j // block == i // block)
    np.testing.assert_array_equal(sa.local_mask(n, block=block, look_back=False), within)
    with_prev = _brute(n, lambda i, j: j // block >= i // block - 1)
    np.testing.assert_array_equal(sa.local_mask(n, block=block), with_prev)
    # Slot s is built from tokens s*3-2 .. s*3: visible once all of them are <= i.
    slots = [[all(t <= i for t in range(3 * s - 2, 3 * s + 1)) for s in range(7)] for i in range(n)]
    np.testing.assert_array_equal(sa.compressed_mask(n, stride=3), np.array(slots))


# ----------------------------------------------------------------------------- bad input


def _bad_inputs():
    q, k, v = _qkv(12)
    w = jnp.zeros((3, HEADS * HEAD_DIM, HEADS * HEAD_DIM))
    odd = _qkv(12, heads=3)
    return [
        ("block", lambda: sa.local_attention(q, k, v, block=0)),
        ("window", lambda: sa.banded_attention(q, k, v, window=-2)),
        ("k shape", lambda: sa.banded_attention(q, k[:, :5], v, window=2)),
        ("stride", lambda: sa.strided_attention(q, k, v, stride=0, mode="A")),
        ("stride", lambda: sa.strided_attention(q, k, v, stride=13, mode="A")),
        ("mode", lambda: sa.strided_attention(q, k, v, stride=4, mode="interleaved")),
        ("heads", lambda: sa.strided_attention(*odd, stride=4, mode="multihead")),
        ("block", lambda: sa.fixed_attention(q, k, v, block=0, c=1, mode="A")),
        ("block", lambda: sa.fixed_attention(q, k, v, block=16, c=1, mode="A")),
        ("c", lambda: sa.fixed_attention(q, k, v, block=4, c=0, mode="B")),
        ("c=5", lambda: sa.fixed_attention(q, k, v, block=4, c=5, mode="B")),
        ("heads", lambda: sa.fixed_attention(*odd, block=4, c=1, mode="multihead")),
        (
            "head_offsets",
            lambda: sa.fixed_attention(q, k, v, block=4, c=1, mode="B", head_offsets=[0, 1]),
        ),
        (
            "head_offsets",
            lambda: sa.fixed_attention(
                q, k, v, block=4, c=2, mode="multihead", head_offsets=[0, 1, 2, 0]
            ),
        ),
        (
            "head_offsets",
            lambda: sa.fixed_attention(q, k, v, block=4, c=2, mode="B", head_offsets=[0, 1, 2, 3]),
        ),
        ("heads", lambda: sa.fixed_mask(12, block=4, c=1, mode="multihead")),
        (
            "compress_k",
            lambda: sa.memory_compressed_attention(q, k, v, compress_k=w[:, :4], compress_v=w),
        ),
        (
            "stride",
            lambda: sa.memory_compressed_attention(q, k, v, compress_k=w, compress_v=w, stride=0),
        ),
        ("dropout_rng", lambda: sa.local_attention(q, k, v, block=4, dropout_rate=0.1)),
        ("stride", lambda: sa.MemoryCompressedKV(stride=0)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_input_names_the_field(index):
    field, call = _bad_inputs()[index]
    with pytest.raises(ValueError, match=field):
        call()


def test_bad_input_fails_while_tracing():
    q, k, v = _qkv(12)
    fn = jax.jit(functools.partial(sa.fixed_attention, block=4, c=5, mode="merged"))
    with pytest.raises(ValueError, match="c=5"):
        fn.lower(q, k, v)

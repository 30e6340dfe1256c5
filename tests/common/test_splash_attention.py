"""The Pallas block-sparse kernel (interpret mode on CPU) against the masked dense definition.

Outputs and gradients of ``common.splash_attention.pattern_attention`` must equal dense
attention under the pattern's ``[n, n]`` mask from ``common.sparse_attention`` (float32),
including n not a multiple of the kernel's 128-token tile and per-head masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sparse_attention as sa
from common.attention import einsum_attention
from common.splash_attention import pattern_attention

HEADS, HEAD_DIM = 2, 16


def _qkv(n, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((1, n, HEADS, HEAD_DIM)), jnp.float32) for _ in "qkv"]


def _loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * jnp.arange(q.shape[1])[None, :, None, None])


@pytest.mark.parametrize(
    "n,mask",
    [
        (256, lambda n: sa.fixed_mask(n, block=32, c=8, mode="merged")),
        (200, lambda n: sa.strided_mask(n, stride=16, mode="merged")),
        (256, lambda n: sa.strided_mask(n, stride=16, mode="multihead", heads=HEADS)),
        (160, lambda n: sa.fixed_mask(n, block=32, c=8, mode="B")),  # rows with no key
    ],
    ids=["fixed-merged", "strided-merged-padded", "strided-multihead", "fixed-B-empty-rows"],
)
@pytest.mark.slow
def test_kernel_matches_masked_dense(n, mask):
    m = np.asarray(mask(n))
    q, k, v = _qkv(n)
    ours = lambda q, k, v: pattern_attention(q, k, v, m)
    dense_mask = jnp.asarray(m[None] if m.ndim == 3 else m[None, None])  # [1, h|1, n, n]
    has_key = jnp.swapaxes(dense_mask[0].any(-1), 0, 1)[None, :, :, None]  # [1, n, h|1, 1]
    ref = lambda q, k, v: jnp.where(has_key, einsum_attention(q, k, v, mask=dense_mask), 0.0)
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
    g_ours = jax.grad(_loss(ours), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(_loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_bad_masks_are_named():
    q, k, v = _qkv(128)
    with pytest.raises(ValueError, match="mask must be"):
        pattern_attention(q, k, v, np.ones((64, 64), bool))
    with pytest.raises(ValueError, match="block=100"):
        pattern_attention(q, k, v, np.tril(np.ones((128, 128), bool)), block=100)

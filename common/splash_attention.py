"""The sparse patterns of ``common.sparse_attention`` through a Pallas block-sparse kernel.

On TPU, JAX ships a Pallas kernel that skips every ``(block x block)`` tile of the score
matrix that a static mask leaves empty: splash attention
(``jax.experimental.pallas.ops.tpu.splash_attention``). ``pattern_attention`` hands it the
boolean definition of a pattern (``local_mask``, ``strided_mask``, ``fixed_mask``, ... of
``common.sparse_attention``), so a Sparse Transformer layer on TPU costs only the tiles its
pattern touches, forward and backward.

The XLA implementations in ``common.sparse_attention`` stay the reference and the CPU / GPU
path. Off TPU this kernel runs in Pallas *interpret* mode, which is exact but slow: it is how
the tests check it on CPU against the masked dense definition, not a way to train.

The mask is a numpy array (static: the kernel's tile schedule is computed from it when the
function is traced). Sequences are padded at the end to a multiple of ``block``; padded
queries attend only to themselves and padded keys are masked out, then the padding is cut.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

Array = jax.Array


def _kernel_mask(mask: np.ndarray, length: int) -> np.ndarray:
    """``[h, n, n] -> [h, length, length]``: padded keys masked; padded queries and queries
    with no key see themselves (a row with no key at all is undefined in the kernel; their
    outputs are zeroed afterwards)."""
    h, n, _ = mask.shape
    out = np.zeros((h, length, length), dtype=bool)
    out[:, :n, :n] = mask
    empty = np.ones((h, length), dtype=bool)
    empty[:, :n] = ~mask.any(axis=-1)
    heads, rows = np.nonzero(empty)
    out[heads, rows, rows] = True
    return out


def pattern_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: np.ndarray,
    *,
    block: int = 128,
    interpret: bool | None = None,
) -> Array:
    """Self-attention ``[b, n, h, d] -> [b, n, h, d]`` restricted to ``mask``.

    ``mask``: numpy bool ``[n, n]`` (every head) or ``[h, n, n]`` (``True`` = may attend), e.g.
    ``np.asarray(sparse_attention.fixed_mask(n, block=128, c=32, mode="merged"))``. A query
    with no key outputs zeros, as in ``common.sparse_attention`` (fixed ``"B"``). ``block``: the
    kernel's tile size along queries and keys. ``interpret``: Pallas interpret mode; default:
    on unless the backend is TPU. Softmax in float32 inside the kernel.
    """
    if q.ndim != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one shape [batch, length, heads, head_dim]; got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    b, n, h, d = q.shape
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 2:
        mask = np.broadcast_to(mask, (h, *mask.shape))
    if mask.shape != (h, n, n):
        raise ValueError(f"mask must be [{n}, {n}] or [{h}, {n}, {n}]; got {mask.shape}")
    if block <= 0 or block % 128:
        raise ValueError(f"block={block} must be a positive multiple of 128 (TPU lanes)")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"

    length = math.ceil(n / block) * block
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(
        _kernel_mask(mask, length),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )

    def heads_first(x: Array) -> Array:  # [b, n, h, d] -> [b, h, length, d]
        x = jnp.pad(x, [(0, 0), (0, length - n), (0, 0), (0, 0)])
        return jnp.swapaxes(x, 1, 2)

    scale = 1.0 / math.sqrt(d)  # the kernel does not scale the scores itself
    out = jax.vmap(kernel)(heads_first(q * scale), heads_first(k), heads_first(v))
    out = jnp.swapaxes(out, 1, 2)[:, :n]  # [b, n, h, d]
    has_key = jnp.asarray(mask.any(axis=-1).T)[None, :, :, None]  # [1, n, h, 1]
    return jnp.where(has_key, out, 0.0).astype(q.dtype)

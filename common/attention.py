"""Scaled dot-product attention: one core, a fused path and a plain einsum reference.

Layout everywhere is ``[batch, length, heads, head_dim]`` (the layout of
``jax.nn.dot_product_attention``). Softmax always runs in float32.

``implementation`` (the argument of ``dot_product_attention``, named as in
``jax.nn.dot_product_attention``, which it mirrors) picks the kernel; every module that
calls it, here and in the model families, exposes the choice as its field
``attention_impl`` and passes it through unchanged:
  * ``None``: ``auto_implementation`` picks: cuDNN's fused (flash) attention on a GPU when the
    call is one it takes (bfloat16/float16, no explicit mask or bias), XLA otherwise.
    ``jax.nn.dot_product_attention``'s own ``None`` means XLA everywhere (its cuDNN
    auto-selection is a TODO), which materialises the scores on a GPU (``benchmarks/gpu.py``,
    measurements in ``benchmarks/LOG.md``);
  * ``"xla"`` / ``"cudnn"``: forwarded to ``jax.nn.dot_product_attention``;
  * ``"einsum"``: the reference written out below. Dropout on the attention weights, which
    the fused kernels do not take, always runs through it.

Causal self-attention (``is_causal``, ``q_len == kv_len >= 64``) that ``implementation=None``
sends to XLA runs as ``causal_chunked_attention``: query chunks that skip the keys they
cannot see, the block skipping a fused kernel does. Explicit ``"xla"`` / ``"einsum"`` keep
the single call over all ``n x n`` scores.

A causal band (``local_window``, GPT-3's banded layers) with ``implementation=None`` goes to
cuDNN's sliding-window kernel where ``auto_implementation`` picks cuDNN, and otherwise (or
with dropout) to ``common.sparse_attention.banded_attention``, which scores only the band
(``O(n * window)``); ``"xla"`` and ``"einsum"`` mask the full ``n x n`` scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common import masks as masks_lib
from common import sharding as sh
from common import sparse_attention
from common.layers import StackedDense, flat_dot_general

Array = jax.Array
IMPLEMENTATIONS = (None, "xla", "cudnn", "einsum")


def einsum_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Reference attention; ``mask`` is boolean ``[b|1, h|1, q, k]``, True = may attend."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if k.shape[2] != q.shape[2]:  # grouped / multi-query: repeat the kv heads
        rep = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale  # [batch, heads, q_len, kv_len]
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)  # [b, q, h, d]


def auto_implementation(
    q: Array,
    k: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    backend: str | None = None,
) -> str:
    """The kernel ``implementation=None`` runs: ``"cudnn"`` or ``"xla"``.

    cuDNN only on a GPU (``backend``, default ``jax.default_backend()``), for half-precision
    q and k of one dtype, a head size that is a multiple of 8 up to 256, and no explicit
    ``mask`` or ``bias``: cuDNN wants those as full ``[.., q_len, kv_len]`` arrays, so a
    ``[b, 1, 1, k]`` padding mask would be materialised per query (causal masking is
    ``is_causal`` and costs nothing). Everything else goes to XLA.
    """
    backend = jax.default_backend() if backend is None else backend
    if (
        backend == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and k.dtype == q.dtype
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and mask is None
        and bias is None
    ):
        return "cudnn"
    return "xla"


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    local_window: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str | None = None,
) -> Array:
    """Attention of ``q [b, q, h, d]`` over ``k, v [b, k, h_kv, d]`` -> ``[b, q, h, d]``.

    ``is_causal`` adds the causal mask for the case ``q_len == kv_len`` (positions aligned);
    with a KV cache pass an explicit ``mask`` built from absolute positions instead.
    ``local_window``: self-attention in a causal band of this width (query ``i`` sees keys
    ``i - local_window < j <= i``, ``masks.band_mask``); implies ``is_causal``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    if local_window is not None:
        return _banded(q, k, v, local_window, mask, bias, dropout_rate, dropout_rng, implementation)
    if (
        is_causal
        and implementation is None
        and q.shape[1] == k.shape[1] >= 2 * MIN_CAUSAL_CHUNK
        and auto_implementation(q, k, mask=mask, bias=bias) == "xla"
    ):
        return causal_chunked_attention(
            q, k, v, mask=mask, bias=bias, dropout_rate=dropout_rate, dropout_rng=dropout_rng
        )
    if implementation == "einsum" or dropout_rate > 0.0:
        if is_causal:
            pos_q = jnp.arange(q.shape[1])
            mask = masks_lib.combine(mask, masks_lib.causal_mask(pos_q, jnp.arange(k.shape[1])))
        return einsum_attention(
            q, k, v, mask=mask, bias=bias, dropout_rate=dropout_rate, dropout_rng=dropout_rng
        )
    if mask is not None:
        mask = jnp.broadcast_to(mask, mask.shape[:1] + (q.shape[2],) + mask.shape[2:])
    call = lambda impl: jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, is_causal=is_causal, implementation=impl
    )
    if implementation is not None:
        return call(implementation)
    if auto_implementation(q, k, mask=mask, bias=bias) == "cudnn":
        if (out := _cudnn_unless_refused(call)) is not None:
            return out
    return call("xla")


CAUSAL_CHUNKS = 4
MIN_CAUSAL_CHUNK = 32


def causal_chunked_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    chunks: int = CAUSAL_CHUNKS,
) -> Array:
    """Causal self-attention (``q_len == kv_len``) in query chunks that skip unseen keys.

    The queries are cut into ``chunks`` pieces of at least ``MIN_CAUSAL_CHUNK`` tokens; the
    piece ending at position ``e`` attends to keys ``[0, e)`` only, through
    ``einsum_attention`` with the causal mask. With 4 chunks the scores, softmax and matmuls
    cover 5/8 of the ``n x n`` square, which is what a fused kernel's block skipping buys.
    The result equals ``einsum_attention`` with the full causal mask; with dropout, chunk
    ``i`` draws its mask from ``fold_in(dropout_rng, i)``. ``mask`` and ``bias`` broadcast
    as in ``einsum_attention`` (``[b|1, h|1, q|1, k]``) and are sliced with the chunk.

    This is the XLA path for causal calls (``dot_product_attention`` with
    ``implementation=None`` where ``auto_implementation`` picks XLA): with materialised
    scores, skipping the masked blocks saves their work (measured in ``benchmarks/LOG.md``).
    """
    n = q.shape[1]
    if k.shape[1] != n:
        raise ValueError(f"causal_chunked_attention needs q_len == kv_len, got {n}, {k.shape[1]}")
    if chunks < 1:
        raise ValueError(f"causal_chunked_attention needs chunks >= 1, got {chunks}")
    size = max(MIN_CAUSAL_CHUNK, -(-n // chunks))

    def rows(x: Array | None, start: int, end: int) -> Array | None:
        if x is None:
            return None
        if x.shape[-2] != 1:
            x = x[..., start:end, :]
        return x[..., :end] if x.shape[-1] != 1 else x

    outs = []
    for i, start in enumerate(range(0, n, size)):
        end = min(start + size, n)
        causal = masks_lib.causal_mask(jnp.arange(start, end), jnp.arange(end))
        outs.append(
            einsum_attention(
                q[:, start:end],
                k[:, :end],
                v[:, :end],
                mask=masks_lib.combine(rows(mask, start, end), causal),
                bias=rows(bias, start, end),
                dropout_rate=dropout_rate,
                dropout_rng=None if dropout_rng is None else jax.random.fold_in(dropout_rng, i),
            )
        )
    return jnp.concatenate(outs, axis=1)  # [b, q, h, d]


def _cudnn_unless_refused(call: Callable[[str], Array]) -> Array | None:
    """``call("cudnn")``, or None where cuDNN refuses the call (no cuDNN, or a GPU, shape or
    layout it does not take). JAX checks that when it traces the call, not when it runs."""
    try:
        return call("cudnn")
    except (NotImplementedError, ValueError, RuntimeError):
        return None


def _banded(q, k, v, window, mask, bias, dropout_rate, dropout_rng, implementation) -> Array:
    """``dot_product_attention`` with ``local_window=window``: see the module docstring."""
    if mask is not None or bias is not None or q.shape[1] != k.shape[1]:
        raise ValueError(
            "local_window is for self-attention (q_len == kv_len) without an explicit mask or "
            f"bias; got q_len {q.shape[1]}, kv_len {k.shape[1]}, mask {mask is not None}, "
            f"bias {bias is not None}"
        )
    if window < 1:
        raise ValueError(f"local_window must be >= 1, got {window}")
    # jax's window (left, right) = (window - 1, 0): key j is seen by query i if
    # i - (window - 1) <= j <= i; cuDNN takes it as a sliding window of ``window`` keys.
    fused = lambda impl: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(window - 1, 0), implementation=impl
    )
    if implementation == "einsum":  # the reference: the dense scores, band-masked
        pos = jnp.arange(q.shape[1])
        mask = masks_lib.band_mask(pos, pos, window)
        return einsum_attention(
            q, k, v, mask=mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng
        )
    if dropout_rate == 0.0:
        if implementation is not None:
            return fused(implementation)
        if auto_implementation(q, k) == "cudnn":
            if (out := _cudnn_unless_refused(fused)) is not None:
                return out
    return sparse_attention.banded_attention(  # the fused kernels take no dropout
        q, k, v, window=window, dropout_rate=dropout_rate, dropout_rng=dropout_rng
    )


class MultiHeadAttention(nn.Module):
    """Multi-head attention with fused QKV for self-attention and a functional KV cache.

    Self-attention when ``kv`` is None, cross-attention otherwise. The cache is an explicit
    pytree ``{"k": [b, max_len, h, d], "v": [b, max_len, h, d]}`` written at ``cache_index``;
    the caller passes it in and gets the updated one back (no mutable collections).
    """

    num_heads: int
    head_dim: int
    use_bias: bool = True
    dropout: float = 0.0  # on the attention weights
    attention_impl: str | None = None  # dot_product_attention's implementation
    kernel_init: Callable[..., Any] = nn.initializers.normal(0.02)
    out_kernel_init: Callable[..., Any] = nn.initializers.normal(0.02)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,  # [batch, q_len, d_model]
        kv: Array | None = None,  # [batch, kv_len, d_kv] for cross-attention
        *,
        mask: Array | None = None,  # bool [b|1, h|1, q_len, kv_len]
        is_causal: bool = False,
        local_window: int | None = None,  # causal band of this width (see dot_product_attention)
        cache: dict[str, Array] | None = None,
        cache_index: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, dict[str, Array] | None]:
        h, d = self.num_heads, self.head_dim
        dense = lambda features, name, axes: nn.DenseGeneral(
            features,
            use_bias=self.use_bias,
            dot_general=flat_dot_general,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        stacked = lambda num, name: StackedDense(
            num,
            (h, d),
            kernel_init=nn.with_logical_partitioning(
                self.kernel_init, (sh.EMBED, None, sh.HEADS, sh.KV)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, sh.HEADS, sh.KV)),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        if kv is None:
            q, k, v = stacked(3, "qkv")(x)  # each [b, t, h, d]
        else:
            q = dense((h, d), "q", (sh.EMBED, sh.HEADS, sh.KV))(x)
            k, v = stacked(2, "kv")(kv)

        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(
                cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1
            )
            v = jax.lax.dynamic_update_slice_in_dim(
                cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1
            )
            cache = {"k": k, "v": v}
            k, v = k.astype(self.dtype), v.astype(self.dtype)

        dropout_rate = 0.0 if deterministic else self.dropout
        rng = self.make_rng("dropout") if dropout_rate > 0.0 else None
        if local_window is not None and (kv is not None or cache is not None or mask is not None):
            raise ValueError("local_window is for self-attention without cache or mask")
        out = dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=is_causal,
            local_window=local_window,
            dropout_rate=dropout_rate,
            dropout_rng=rng,
            implementation=self.attention_impl,
        )  # [batch, q_len, heads, head_dim]
        out = nn.DenseGeneral(
            x.shape[-1],
            axis=(-2, -1),
            dot_general=flat_dot_general,
            use_bias=self.use_bias,
            kernel_init=nn.with_logical_partitioning(
                self.out_kernel_init, (sh.HEADS, sh.KV, sh.EMBED)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (sh.EMBED,)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)  # [batch, q_len, d_model]
        return out, cache

"""Causal attention that computes only the blocks its sparsity pattern needs.

Layout everywhere is ``[batch, length, heads, head_dim]``; every variant is causal
self-attention (``k.shape == q.shape``), runs its softmax in float32 and never forms the
``n x n`` score matrix: a variant with blocks of ``l`` tokens keeps ``O(n * l)`` scores.

* ``local_attention``: Liu et al. 2018 ("Generating Wikipedia by summarizing long
  sequences"), T-DMCA, section 4.2.3: blocks of ``block`` tokens, each query attends
  causally inside its block and, with ``look_back``, to the whole previous block.
* ``banded_attention``: query ``i`` sees ``i - window < j <= i`` (exactly
  ``common.masks.band_mask``), GPT-3's locally banded layer (Brown et al. 2020, section 2.1).
* ``memory_compressed_attention``: Liu et al. 2018, T-DMCA, section 4.2.3: K and V go
  through a strided convolution (kernel 3, stride 3), queries stay uncompressed. The
  convolution is causal: K and V are left-padded by ``kernel - 1`` zeros, so slot ``s`` is
  built from tokens ``s * stride - kernel + 1 .. s * stride`` and query ``i`` sees slot
  ``s`` iff ``s * stride <= i``. Every query sees at least slot 0; it does *not* see the
  tokens after its latest complete slot (up to ``stride - 1`` of them), which is the price
  of compressing causally. (Liu et al. do not say how they align slots; this is our choice.)
* ``strided_attention`` / ``fixed_attention``: the Sparse Transformer patterns (Child et al.
  2019, section 4.3, "Two-dimensional factorized attention"), each with two parts, ``A``
  and ``B`` (always intersected with ``j <= i``):

  ============  ==========================================  ===============================
  pattern       A                                           B
  ============  ==========================================  ===============================
  strided(l)    ``i - l < j <= i``                          ``(i - j) mod l == 0``
  fixed(l, c)   ``floor(j / l) == floor(i / l)``            ``j mod l in [l-c-o, l-o)``
  ============  ==========================================  ===============================

  (``o`` = the head's offset, ``head_offsets``; 0 is the paper's ``{l - c, ..., l - 1}``;
  the paper prefers heads attending to distinct sub-blocks of length ``c``.) ``mode`` picks
  one of the three integrations of section 5, "Factorized attention heads": ``"A"`` or
  ``"B"`` -- *interleaved*, one part per call, the caller alternates them across residual
  blocks; ``"merged"`` -- every head attends to ``A | B`` (a key in both is counted once);
  ``"multihead"`` -- heads ``[0, h/2)`` use A, heads ``[h/2, h)`` use B.

  A query with no key at all outputs zeros: only fixed ``"B"`` (in interleaved or multihead
  mode) has such queries, the positions of block 0 before its first summary column.

How each pattern is computed (``l`` = block or stride, ``nb = n / l`` blocks):

* local / banded / strided A: query block ``r`` against key blocks ``r - 1`` and ``r``
  (``2l`` keys), masked by the definition;
* fixed A: block diagonal (``l`` keys);
* strided B: the sequence as an ``[nb, l]`` grid; a query attends down its column
  (``nb`` keys);
* fixed B: the ``c`` summary columns of every block gathered into ``nb * c`` keys;
* merged: each part returns its unnormalised softmax (row max, row sum, sum of ``p v``) and
  the two are merged with a log-sum-exp; part B is restricted to keys not already in A
  (strided: ``j < i``; fixed: earlier blocks), so no key is counted twice;
* memory-compressed: query chunks against the slots they can see (the lower triangle
  only); this pattern is quadratic by nature, ``n * n / (2 * stride)`` scores.

Any ``n`` works: sequences are padded at the end to a multiple of the block and the padding
is stripped; padded keys lie after every real query, so causality hides them.

Each pattern also has a ``*_mask`` function with its boolean definition over ``[n, n]``
(``True`` = may attend): the masked dense reference for tests and benchmarks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
MODES = ("A", "B", "merged", "multihead")
_EMPTY_ROW_MAX = -1e30  # stabiliser for a row with no key: exp(-inf - this) = 0, no NaN


# ----------------------------------------------------------------------------- validation


def _check_qkv(q: Array, k: Array, v: Array) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, length, heads, head_dim], got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k shape {k.shape} must equal q shape {q.shape} (self-attention)")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v shape {v.shape} must be [batch, length, heads, *] like q {q.shape}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_fits(name: str, value: int, n: int) -> None:
    _check_positive(name, value)
    if value > n:
        raise ValueError(f"{name}={value} is longer than the sequence (length {n})")


def _check_mode(mode: str, heads: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "multihead":
        if heads is None:
            raise ValueError("heads is required for mode='multihead'")
        if heads % 2:
            raise ValueError(f"mode='multihead' splits the heads in two: heads={heads} is odd")


def _check_dropout(rate: float, rng: Array | None) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate}")
    if rate > 0.0 and rng is None:
        raise ValueError("dropout_rate > 0 needs a dropout_rng")


def _fixed_offsets(
    block: int, c: int, mode: str, heads: int | None, head_offsets: Sequence[int] | None
) -> np.ndarray | None:
    """Validated per-head offsets of fixed head B, one per head that uses B (or None)."""
    _check_positive("c", c)
    if c > block:
        raise ValueError(f"c={c} must be at most the block l={block}")
    if head_offsets is None or mode == "A":
        return None
    if heads is None:
        raise ValueError("heads is required with head_offsets")
    b_heads = heads // 2 if mode == "multihead" else heads
    offsets = np.asarray(head_offsets)
    if offsets.ndim != 1 or len(offsets) != b_heads:
        raise ValueError(
            f"head_offsets needs one offset per head using pattern B ({b_heads} for "
            f"mode={mode!r} with {heads} heads), got {list(np.ravel(offsets))}"
        )
    in_range = (offsets >= 0) & (offsets <= block - c)
    if not np.issubdtype(offsets.dtype, np.integer) or not in_range.all():
        raise ValueError(
            f"head_offsets must be ints in [0, l - c] = [0, {block - c}], got {offsets.tolist()}"
        )
    return offsets.astype(np.int32)


# ----------------------------------------------------------------------------- definitions
# Each predicate takes broadcastable int arrays of query positions i and key positions j.


def _local_def(i, j, *, block: int, look_back: bool):
    return (j <= i) & (j // block >= i // block - int(look_back))


def _band_def(i, j, *, window: int):
    return (j <= i) & (j > i - window)


def _strided_a_def(i, j, *, stride: int):
    return _band_def(i, j, window=stride)


def _strided_b_def(i, j, *, stride: int):
    return (j <= i) & ((i - j) % stride == 0)


def _fixed_a_def(i, j, *, block: int):
    return (j <= i) & (j // block == i // block)


def _fixed_b_def(i, j, *, block: int, c: int, offset=0):
    col = j % block
    return (j <= i) & (col >= block - c - offset) & (col < block - offset)


def _per_head(mode: str, heads: int | None, a: Array, b_heads: Array | list[Array]) -> Array:
    """Combine part masks into ``[n, n]`` or ``[heads, n, n]`` as ``mode`` says."""
    b_stack = jnp.stack(b_heads) if isinstance(b_heads, list) else b_heads
    if mode == "A":
        return a
    if mode == "B":
        return b_stack
    if mode == "merged":
        return a | b_stack
    half = heads // 2  # multihead
    b_stack = jnp.broadcast_to(b_stack, (half,) + a.shape)
    return jnp.concatenate([jnp.broadcast_to(a, (half,) + a.shape), b_stack])


def local_mask(n: int, *, block: int, look_back: bool = True) -> Array:
    """``[n, n]`` mask of ``local_attention``."""
    _check_positive("block", block)
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    return _local_def(i, j, block=block, look_back=look_back)


def banded_mask(n: int, *, window: int) -> Array:
    """``[n, n]`` mask of ``banded_attention`` (= ``masks.band_mask`` for positions 0..n-1)."""
    _check_positive("window", window)
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    return _band_def(i, j, window=window)


def compressed_mask(n: int, *, stride: int = 3) -> Array:
    """``[n, ceil(n / stride)]`` mask of queries over compressed slots: ``s * stride <= i``."""
    _check_positive("stride", stride)
    slots = -(-n // stride)
    return jnp.arange(slots)[None, :] * stride <= jnp.arange(n)[:, None]


def strided_mask(n: int, *, stride: int, mode: str, heads: int | None = None) -> Array:
    """Mask of ``strided_attention``: ``[n, n]``, or ``[heads, n, n]`` for ``"multihead"``."""
    _check_fits("stride", stride, n)
    _check_mode(mode, heads)
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    a = _strided_a_def(i, j, stride=stride)
    return _per_head(mode, heads, a, _strided_b_def(i, j, stride=stride))


def fixed_mask(
    n: int,
    *,
    block: int,
    c: int,
    mode: str,
    heads: int | None = None,
    head_offsets: Sequence[int] | None = None,
) -> Array:
    """Mask of ``fixed_attention``: ``[n, n]``, or ``[heads, n, n]`` when heads differ
    (``"multihead"``, or ``head_offsets`` given)."""
    _check_fits("block", block, n)
    _check_mode(mode, heads)
    offsets = _fixed_offsets(block, c, mode, heads, head_offsets)
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    a = _fixed_a_def(i, j, block=block)
    if offsets is None:
        b = _fixed_b_def(i, j, block=block, c=c)
    else:
        b = [_fixed_b_def(i, j, block=block, c=c, offset=int(o)) for o in offsets]
    return _per_head(mode, heads, a, b)


# ----------------------------------------------------------------------------- core


def _partial(q, k, v, mask, scale, dropout=None):
    """Unnormalised softmax attention of ``q [..., Q, h, d]`` over ``k, v [..., K, h, *]``.

    ``mask`` broadcasts against the scores ``[..., h, Q, K]``; ``dropout`` is
    ``(rate, rng)`` or None. Returns ``o [..., Q, h, dv]`` (float32, sum of ``p v``), the row
    max ``m [..., Q, h]`` (a stabiliser, no gradient) and the row sum ``l [..., Q, h]``.
    """
    s = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
    s = jnp.where(mask, s * scale, -jnp.inf)  # [..., h, Q, K]
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(m == -jnp.inf, _EMPTY_ROW_MAX, m)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1)  # [..., h, Q]
    if dropout is not None:
        rate, rng = dropout
        keep = jax.random.bernoulli(rng, 1.0 - rate, p.shape)
        p = jnp.where(keep, p / (1.0 - rate), 0.0)
    o = jnp.einsum(
        "...hqk,...khd->...qhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return o, jnp.swapaxes(m[..., 0], -1, -2), jnp.swapaxes(l, -1, -2)


def _finish(o, l, dtype):
    """``o / l`` (a row with no key -> 0) in ``dtype``."""
    return (o / jnp.where(l > 0, l, 1.0)[..., None]).astype(dtype)


def _merge(parts, dtype):
    """Log-sum-exp merge of partial softmaxes over disjoint key sets."""
    top = functools.reduce(jnp.maximum, [m for _, m, _ in parts])
    o = sum(o * jnp.exp(m - top)[..., None] for o, m, _ in parts)
    l = sum(l * jnp.exp(m - top) for _, m, l in parts)
    return _finish(o, l, dtype)


def _pad(x: Array, length: int) -> Array:
    extra = length - x.shape[1]
    return x if extra == 0 else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _dropout(rate: float, rng: Array | None):
    return (rate, rng) if rate > 0.0 else None


def _block_partial(q, k, v, *, block: int, look_back: bool, definition: Callable, dropout=None):
    """Query block ``r`` against key block ``r`` (and ``r - 1`` with ``look_back``).

    ``q, k, v``: ``[b, N, h, *]`` with ``N`` a multiple of ``block``; ``definition(i, j)``
    masks the pairs. Returns ``_partial``'s triple in sequence layout ``[b, N, h, ...]``.
    """
    b, length, h, d = q.shape
    nb = length // block
    split = lambda x: x.reshape(b, nb, block, h, x.shape[-1])  # [b, nb, block, h, *]
    qb, kb, vb = split(q), split(k), split(v)
    q_pos = jnp.arange(length).reshape(nb, block)
    k_pos = q_pos
    if look_back and nb > 1:
        with_prev = lambda x: jnp.concatenate(
            [jnp.pad(x[:, :-1], [(0, 0), (1, 0), (0, 0), (0, 0), (0, 0)]), x], axis=2
        )  # [b, nb, 2 * block, h, *]
        kb, vb = with_prev(kb), with_prev(vb)
        k_pos = jnp.concatenate([q_pos - block, q_pos], axis=1)  # [nb, 2 * block]
    mask = definition(q_pos[:, :, None], k_pos[:, None, :]) & (k_pos >= 0)[:, None, :]
    o, m, l = _partial(
        qb, kb, vb, mask[:, None], 1.0 / math.sqrt(d), dropout
    )  # o [b, nb, block, h, dv]; m, l [b, nb, block, h]
    return o.reshape(b, length, h, -1), m.reshape(b, length, h), l.reshape(b, length, h)


def _column_partial(q, k, v, *, stride: int, strict: bool):
    """Strided B: query ``r * stride + c`` attends down column ``c`` to rows ``<= r``
    (``< r`` when ``strict``)."""
    b, length, h, d = q.shape
    nb = length // stride
    cols = lambda x: jnp.swapaxes(x.reshape(b, nb, stride, h, x.shape[-1]), 1, 2)
    rows = jnp.arange(nb)
    mask = rows[None, :] < rows[:, None] if strict else rows[None, :] <= rows[:, None]
    o, m, l = _partial(cols(q), cols(k), cols(v), mask, 1.0 / math.sqrt(d))
    back = lambda x: jnp.swapaxes(x, 1, 2).reshape(b, length, h, *x.shape[4:])
    return back(o), back(m), back(l)


def _summary_partial(q, k, v, *, block: int, c: int, offsets, strict: bool):
    """Fixed B: every query against the ``c`` summary columns of every block, masked to
    ``j <= i`` (to earlier blocks only when ``strict``)."""
    b, length, h, d = q.shape
    nb = length // block
    offs = np.zeros((1,), np.int32) if offsets is None else offsets
    cols = (block - c - offs)[:, None] + np.arange(c)[None, :]  # [h or 1, c]

    def summaries(x):  # [b, N, h, *] -> [b, nb * c, h, *]
        xb = x.reshape(b, nb, block, h, x.shape[-1])
        if offsets is None:
            xs = xb[:, :, block - c :]
        else:
            xs = jnp.take_along_axis(xb, jnp.asarray(cols.T)[None, None, :, :, None], axis=2)
        return xs.reshape(b, nb * c, h, x.shape[-1])

    k_pos = (np.arange(nb)[:, None, None] * block + cols.T[None]).reshape(nb * c, -1)
    j = jnp.asarray(k_pos.T)[:, None, :]  # [h or 1, 1, nb * c]
    i = jnp.arange(length)[None, :, None]  # [1, N, 1]
    mask = (j // block < i // block) if strict else (j <= i)  # [h or 1, N, nb * c]
    o, m, l = _partial(q, summaries(k), summaries(v), mask, 1.0 / math.sqrt(d))
    return o, m, l


def _two_part(q, k, v, mode: str, part_a: Callable, part_b: Callable) -> Array:
    """Run the parts as ``mode`` says: ``part_a(q, k, v)``, ``part_b(q, k, v, strict)``
    (``strict``: leave out the keys that part A already has)."""
    alone = lambda part: _finish(part[0], part[2], q.dtype)
    if mode == "A":
        return alone(part_a(q, k, v))
    if mode == "B":
        return alone(part_b(q, k, v, False))
    if mode == "merged":
        return _merge([part_a(q, k, v), part_b(q, k, v, True)], q.dtype)
    half = q.shape[2] // 2  # multihead: heads [0, half) use A, [half, h) use B
    lo, hi = (lambda x: x[:, :, :half]), (lambda x: x[:, :, half:])
    out_a = alone(part_a(lo(q), lo(k), lo(v)))
    out_b = alone(part_b(hi(q), hi(k), hi(v), False))
    return jnp.concatenate([out_a, out_b], axis=2)


# ----------------------------------------------------------------------------- variants


def local_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    block: int,
    look_back: bool = True,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Liu et al. 2018 local attention: causal inside blocks of ``block`` tokens, plus the
    whole previous block when ``look_back``. ``[b, n, h, d] -> [b, n, h, dv]``.

    ``block >= n`` is plain causal attention. ``dropout_rate`` drops attention weights.
    """
    _check_qkv(q, k, v)
    _check_positive("block", block)
    _check_dropout(dropout_rate, dropout_rng)
    n = q.shape[1]
    blk = min(block, n)
    length = -(-n // blk) * blk
    q, k, v = (_pad(x, length) for x in (q, k, v))
    definition = functools.partial(_local_def, block=blk, look_back=look_back)
    o, _, l = _block_partial(
        q,
        k,
        v,
        block=blk,
        look_back=look_back,
        definition=definition,
        dropout=_dropout(dropout_rate, dropout_rng),
    )
    return _finish(o, l, q.dtype)[:, :n]


def banded_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    window: int,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Causal band: query ``i`` sees ``i - window < j <= i`` (``masks.band_mask``).

    Computed in blocks of ``window`` tokens, each query block against itself and the block
    before, so ``O(n * window)`` scores. ``window >= n`` is plain causal attention.
    """
    _check_qkv(q, k, v)
    _check_positive("window", window)
    _check_dropout(dropout_rate, dropout_rng)
    n = q.shape[1]
    blk = min(window, n)
    length = -(-n // blk) * blk
    q, k, v = (_pad(x, length) for x in (q, k, v))
    o, _, l = _block_partial(
        q,
        k,
        v,
        block=blk,
        look_back=True,
        definition=functools.partial(_band_def, window=window),
        dropout=_dropout(dropout_rate, dropout_rng),
    )
    return _finish(o, l, q.dtype)[:, :n]


def strided_attention(q: Array, k: Array, v: Array, *, stride: int, mode: str) -> Array:
    """Sparse Transformer strided pattern (Child et al. 2019, section 4.3).

    A: ``i - stride < j <= i``; B: ``j <= i`` with ``(i - j) mod stride == 0``. ``mode``:
    ``"A"`` / ``"B"`` (interleaved: the caller alternates them across residual blocks),
    ``"merged"`` (``A | B`` in every head) or ``"multihead"`` (first half of the heads A,
    second half B). ``O(n * (2 * stride + n / stride))`` scores.
    """
    _check_qkv(q, k, v)
    n, heads = q.shape[1], q.shape[2]
    _check_fits("stride", stride, n)
    _check_mode(mode, heads)
    length = -(-n // stride) * stride
    q, k, v = (_pad(x, length) for x in (q, k, v))

    def part_a(q, k, v):
        definition = functools.partial(_strided_a_def, stride=stride)
        return _block_partial(q, k, v, block=stride, look_back=True, definition=definition)

    def part_b(q, k, v, strict):
        return _column_partial(q, k, v, stride=stride, strict=strict)

    return _two_part(q, k, v, mode, part_a, part_b)[:, :n]


def fixed_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    block: int,
    c: int,
    mode: str,
    head_offsets: Sequence[int] | None = None,
) -> Array:
    """Sparse Transformer fixed pattern (Child et al. 2019, section 4.3).

    A: own block of ``block`` (= l) tokens, ``j <= i``; B: ``j <= i`` with
    ``j mod l in [l - c - o, l - o)`` for the head's offset ``o`` (``head_offsets``: one int
    in ``[0, l - c]`` per head that uses B -- all heads, or the second half in
    ``"multihead"`` mode; default 0 = the paper's last ``c`` positions of each block).
    ``mode`` as in ``strided_attention``. ``O(n * (l + c * n / l))`` scores.
    """
    _check_qkv(q, k, v)
    n, heads = q.shape[1], q.shape[2]
    _check_fits("block", block, n)
    _check_mode(mode, heads)
    offsets = _fixed_offsets(block, c, mode, heads, head_offsets)
    length = -(-n // block) * block
    q, k, v = (_pad(x, length) for x in (q, k, v))

    def part_a(q, k, v):
        definition = functools.partial(_fixed_a_def, block=block)
        return _block_partial(q, k, v, block=block, look_back=False, definition=definition)

    def part_b(q, k, v, strict):
        return _summary_partial(q, k, v, block=block, c=c, offsets=offsets, strict=strict)

    return _two_part(q, k, v, mode, part_a, part_b)[:, :n]


# ----------------------------------------------------------------------------- compressed


def compress_kv(x: Array, kernel: Array, bias: Array | None = None, *, stride: int = 3) -> Array:
    """Causal strided convolution over the sequence (Liu et al. 2018, section 4.2.3).

    ``x [b, n, h, d]``, ``kernel [width, h * d, h * d]`` (mixes all heads, as a conv over
    the projected keys/values), ``bias [h * d]`` -> ``[b, ceil(n / stride), h, d]``. ``x`` is
    left-padded by ``width - 1`` zeros: slot ``s`` covers tokens
    ``s * stride - width + 1 .. s * stride``.
    """
    b, n, h, d = x.shape
    width = kernel.shape[0]
    y = jax.lax.conv_general_dilated(
        x.reshape(b, n, h * d),
        kernel.astype(x.dtype),
        window_strides=(stride,),
        padding=[(width - 1, 0)],
        dimension_numbers=("NWC", "WIO", "NWC"),
    )  # [b, ceil(n / stride), h * d]
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.reshape(b, y.shape[1], h, d)


def compressed_attention(
    q: Array,
    k_c: Array,
    v_c: Array,
    *,
    stride: int = 3,
    chunk: int = 256,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Uncompressed queries ``[b, n, h, d]`` over compressed ``k_c, v_c [b, ceil(n/stride),
    h, *]`` (from ``compress_kv``); query ``i`` sees slot ``s`` iff ``s * stride <= i``.

    Queries go in chunks of ``chunk * stride``; chunk ``r`` scores only the ``(r + 1) * chunk``
    slots it can see, so about ``n * n / (2 * stride)`` scores in all (the pattern itself is
    quadratic: ``stride`` times smaller than causal dense, no more). The backward pass keeps
    them; wrap the layer in ``jax.checkpoint`` (a remat policy) to trade that memory for
    recomputation.
    """
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, length, heads, head_dim], got shape {q.shape}")
    _check_positive("stride", stride)
    _check_positive("chunk", chunk)
    _check_dropout(dropout_rate, dropout_rng)
    b, n, h, d = q.shape
    slots = -(-n // stride)
    for name, x in (("k_c", k_c), ("v_c", v_c)):
        if x.ndim != 4 or x.shape[0] != b or x.shape[1] != slots or x.shape[2] != h:
            raise ValueError(
                f"{name} shape {x.shape} must be [{b}, ceil({n} / stride={stride}) = {slots}, "
                f"{h}, *]"
            )
    if k_c.shape[3] != d:
        raise ValueError(f"k_c head_dim {k_c.shape[3]} must equal q's {d}")
    q_chunk = chunk * stride
    outs = []
    for r in range(-(-n // q_chunk)):
        start, stop = r * q_chunk, min(n, (r + 1) * q_chunk)
        seen = min(slots, (r + 1) * chunk)  # the slots this chunk's last query can see
        i = start + jnp.arange(stop - start)
        mask = jnp.arange(seen)[None, :] * stride <= i[:, None]  # [Q, seen]
        dropout = None
        if dropout_rate > 0.0:
            dropout = (dropout_rate, jax.random.fold_in(dropout_rng, r))
        o, _, l = _partial(
            q[:, start:stop], k_c[:, :seen], v_c[:, :seen], mask, 1.0 / math.sqrt(d), dropout
        )
        outs.append(_finish(o, l, q.dtype))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def memory_compressed_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    compress_k: Array,
    compress_v: Array,
    bias_k: Array | None = None,
    bias_v: Array | None = None,
    stride: int = 3,
    chunk: int = 256,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Liu et al. 2018 memory-compressed attention, causal. ``[b, n, h, d] -> [b, n, h, dv]``.

    ``compress_k [width, h * d, h * d]`` and ``compress_v [width, h * dv, h * dv]`` are the
    strided convolutions' kernels (width 3, ``stride`` 3 in the paper), ``bias_*`` their
    optional biases; see ``compress_kv`` and ``compressed_attention``. The module
    ``MemoryCompressedKV`` owns these parameters.
    """
    _check_qkv(q, k, v)
    _check_positive("stride", stride)
    b, n, h, d = q.shape
    for name, w, x in (("compress_k", compress_k, k), ("compress_v", compress_v, v)):
        feat = h * x.shape[-1]
        if w.ndim != 3 or w.shape[0] < 1 or w.shape[1:] != (feat, feat):
            raise ValueError(f"{name} must be [width >= 1, {feat}, {feat}], got {w.shape}")
    for name, bias, x in (("bias_k", bias_k, k), ("bias_v", bias_v, v)):
        if bias is not None and bias.shape != (h * x.shape[-1],):
            raise ValueError(f"{name} must be [{h * x.shape[-1]}], got {bias.shape}")
    k_c = compress_kv(k, compress_k, bias_k, stride=stride)
    v_c = compress_kv(v, compress_v, bias_v, stride=stride)
    return compressed_attention(
        q,
        k_c,
        v_c,
        stride=stride,
        chunk=chunk,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )


class MemoryCompressedKV(nn.Module):
    """The strided convolutions of memory-compressed attention (Liu et al. 2018, 4.2.3).

    ``__call__(k, v)`` with ``k, v [b, n, h, d]`` returns ``(k_c, v_c)``, each
    ``[b, ceil(n / stride), h, d]``, for ``compressed_attention``. Params: ``k_kernel``,
    ``v_kernel`` ``[kernel_size, h * d, h * d]`` and, with ``use_bias``, ``k_bias``,
    ``v_bias`` ``[h * d]``.
    """

    kernel_size: int = 3
    stride: int = 3
    use_bias: bool = True
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        _check_positive("kernel_size", self.kernel_size)
        _check_positive("stride", self.stride)
        super().__post_init__()

    @nn.compact
    def __call__(self, k: Array, v: Array) -> tuple[Array, Array]:
        out = []
        for name, x in (("k", k), ("v", v)):
            feat = x.shape[2] * x.shape[3]
            kernel = self.param(
                f"{name}_kernel", self.kernel_init, (self.kernel_size, feat, feat), self.param_dtype
            )
            bias = None
            if self.use_bias:
                bias = self.param(f"{name}_bias", nn.initializers.zeros, (feat,), self.param_dtype)
                bias = bias.astype(self.dtype)
            x = x.astype(self.dtype)
            out.append(compress_kv(x, kernel.astype(self.dtype), bias, stride=self.stride))
        return out[0], out[1]

"""The Sparse Transformer (Child et al. 2019, "Generating Long Sequences with Sparse
Transformers"): a decoder-only Transformer whose attention scores only a factorized pattern.

* Section 5.2, "Scaling to hundreds of layers": pre-norm residual blocks
  (``x + attn(LN(x))``, ``x + ffn(LN(x))``) with a final LayerNorm; the output projections
  of every residual branch are initialised with std ``init_std / sqrt(2 N)`` (``N`` =
  ``num_layers``). The feed-forward width is ``d_ff`` (4 d in the paper) with GELU.
* Section 5.3, "Modeling diverse data types": learned *factorized* position embeddings.
  Text (``positions="text"``): embedding of the index of the stride block plus embedding of
  the position inside it, ``W_block[i // l] + W_inner[i % l]`` (``l = position_block``,
  default the attention stride); images (``positions="image"``, a raster of
  ``image_shape = (rows, cols, channels)`` bytes): ``W_row[r] + W_col[c] + W_channel[ch]``.
* Section 4.3 / 5: ``attention`` is ``"dense"`` (causal, ``common.attention``: cuDNN on GPU),
  ``"strided"`` or ``"fixed"`` (``common.sparse_attention``, which scores only the blocks
  of the pattern); ``mode`` integrates the two parts A and B of a factorized pattern as the
  paper's three ways: ``"interleaved"`` (even blocks A, odd blocks B), ``"merged"`` (every
  head attends to A | B) or ``"multihead"`` (half the heads A, half B). There is no dropout
  on the attention weights (the paper drops only residual branches); ``dropout`` applies to
  the embeddings and the residual branches.
* Section 5.4, "Saving memory by recomputing attention weights": ``remat_policy`` wraps
  every block in ``nn.remat`` with a ``jax.checkpoint_policies`` policy:
  ``"nothing_saveable"`` recomputes the whole block, ``"dots_with_no_batch_dims_saveable"``
  keeps the weight matmuls and recomputes attention (the paper's choice: attention and
  feed-forward are recomputed, the cheap part of the memory is kept), ``None`` turns remat
  off.
* Section 5.5 / 6: bf16 compute (``dtype=jnp.bfloat16``) with float32 params
  (``param_dtype``); softmax, LayerNorm statistics and the loss run in float32.

Deliberate differences: input and output byte embeddings are tied (the paper does not say);
a sequence shorter than the stride is padded to one stride inside the attention (padding at
the end is invisible to causal queries), so the model runs on any length up to ``max_len``.

Every configuration error (a stride that does not fit ``max_len``, ``c > stride``, an odd
head count for ``"multihead"``, a sequence longer than the positional table, ...) is a
``ValueError`` naming the field, raised in ``__post_init__`` or while tracing, i.e. before
XLA compiles anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import presets, splash_attention, validation
from common import sharding as sh
from common import sparse_attention as sa
from common.attention import dot_product_attention
from common.layers import (
    MLP,
    REMAT_POLICIES,
    StackedDense,
    flat_dot_general,
    layer_norm,
    remat,
)
from common.losses import cross_entropy

Array = jax.Array
ATTENTION_KINDS = ("dense", "strided", "fixed")
MODES = ("interleaved", "merged", "multihead")
# "xla": common.sparse_attention (the reference; CPU and GPU). "splash": the pattern's mask
# through the Pallas block-sparse kernel of common.splash_attention (TPU; interpret mode,
# exact but slow, elsewhere).
ATTENTION_IMPLS = ("xla", "splash")
POSITIONS = ("text", "image")


def _pad_to(x: Array, length: int) -> Array:
    extra = length - x.shape[1]
    return x if extra <= 0 else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def sparse_pattern_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    kind: str,
    part: str,
    stride: int,
    c: int,
    head_offsets: Sequence[int] | None = None,
    attention_impl: str = "xla",
) -> Array:
    """Causal self-attention ``[b, n, h, d] -> [b, n, h, d]`` for one layer.

    ``kind``: ``"dense"`` | ``"strided"`` | ``"fixed"``; ``part``: the ``mode`` of
    ``common.sparse_attention`` (``"A"``, ``"B"``, ``"merged"``, ``"multihead"``). A sequence
    shorter than ``stride`` is padded to ``stride`` tokens and cut back afterwards.
    """
    if kind == "dense":
        return dot_product_attention(q, k, v, is_causal=True)
    n = q.shape[1]
    q, k, v = (_pad_to(x, stride) for x in (q, k, v))
    if attention_impl == "splash":
        length, heads = q.shape[1], q.shape[2]
        if kind == "strided":
            mask = sa.strided_mask(length, stride=stride, mode=part, heads=heads)
        else:
            mask = sa.fixed_mask(
                length, block=stride, c=c, mode=part, heads=heads, head_offsets=head_offsets
            )
        return splash_attention.pattern_attention(q, k, v, np.asarray(mask))[:, :n]
    if kind == "strided":
        out = sa.strided_attention(q, k, v, stride=stride, mode=part)
    else:
        out = sa.fixed_attention(q, k, v, block=stride, c=c, mode=part, head_offsets=head_offsets)
    return out[:, :n]


class SparseSelfAttention(nn.Module):
    """Fused QKV projection, one sparse (or dense) causal pattern, output projection.

    No dropout on the attention weights (Child et al. 2019, section 5.2).
    """

    num_heads: int
    kind: str  # "dense" | "strided" | "fixed"
    part: str  # common.sparse_attention mode: "A" | "B" | "merged" | "multihead"
    stride: int  # l: strided stride / fixed block
    c: int  # fixed pattern: summary positions per block
    head_offsets: tuple[int, ...] | None = None  # fixed pattern: per-head offsets of part B
    attention_impl: str = "xla"  # see ATTENTION_IMPLS
    init_std: float = 0.02
    out_init_std: float = 0.02  # std of the output projection (a residual branch)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d_model = x.shape[-1]
        h, d = self.num_heads, d_model // self.num_heads
        q, k, v = StackedDense(
            3,
            (h, d),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(self.init_std), (sh.EMBED, None, sh.HEADS, sh.KV)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, sh.HEADS, sh.KV)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="qkv",
        )(x)  # each [batch, len, heads, head_dim]
        out = sparse_pattern_attention(
            q,
            k,
            v,
            kind=self.kind,
            part=self.part,
            stride=self.stride,
            c=self.c,
            head_offsets=self.head_offsets,
            attention_impl=self.attention_impl,
        )  # [batch, len, heads, head_dim]
        return nn.DenseGeneral(
            d_model,
            axis=(-2, -1),
            dot_general=flat_dot_general,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(self.out_init_std), (sh.HEADS, sh.KV, sh.EMBED)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (sh.EMBED,)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)  # [batch, len, d_model]


class Block(nn.Module):
    """Pre-norm residual block (section 5.2): ``x + drop(attn(LN(x)))``, then the FFN.

    ``attention`` is any module mapping ``[b, n, d_model] -> [b, n, d_model]``; the Sparse
    Transformer passes ``SparseSelfAttention``, ``nlp.long_lm`` its local / memory-compressed
    layers.
    """

    attention: nn.Module
    d_ff: int
    dropout: float
    layer_norm_eps: float
    init_std: float
    out_init_std: float
    deterministic: bool
    activation: str = "gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = nn.Dropout(self.dropout)
        a = self.attention(layer_norm("ln_1", eps=self.layer_norm_eps, **kw)(x))
        x = x + drop(a, deterministic=self.deterministic)  # [batch, len, d_model]
        mlp = MLP(
            self.d_ff,
            activation=self.activation,
            dropout=self.dropout,
            kernel_init=nn.initializers.normal(self.init_std),
            out_kernel_init=nn.initializers.normal(self.out_init_std),
            name="mlp",
            **kw,
        )
        ln_2 = layer_norm("ln_2", eps=self.layer_norm_eps, **kw)
        return x + mlp(ln_2(x), deterministic=self.deterministic)


class FactorizedPositional(nn.Module):
    """Learned factorized positions (Child et al. 2019, section 5.3), ``[n] -> [n, dim]``.

    ``shape`` is the factorization of the position index, most significant first: text
    ``(num_blocks, block)`` gives ``W_0[i // block] + W_1[i % block]``; an image raster
    ``(rows, cols, channels)`` gives ``W_0[row] + W_1[col] + W_2[channel]``. Position ``i``
    must be below ``prod(shape)``.
    """

    shape: tuple[int, ...]
    dim: int
    init_std: float = 0.01
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, positions: Array) -> Array:
        out = 0.0
        rest = positions
        strides = np.cumprod((1,) + tuple(self.shape[::-1]))[:-1][::-1]  # place values
        for axis, (size, place) in enumerate(zip(self.shape, strides, strict=True)):
            table = self.param(
                f"embedding_{axis}",
                nn.with_logical_partitioning(
                    nn.initializers.normal(self.init_std), (None, sh.EMBED)
                ),
                (size, self.dim),
                self.param_dtype,
            )
            index = rest // int(place)
            rest = rest % int(place)
            out = out + jnp.take(table, index, axis=0).astype(self.dtype)  # [n, dim]
        return out


class SparseTransformer(nn.Module):
    """Decoder-only Sparse Transformer LM over a byte (or any) vocabulary; presets in
    ``PRESETS``. ``__call__(tokens [b, n]) -> logits [b, n, vocab]`` (float32)."""

    vocab_size: int = 256
    max_len: int = 12288  # context length = capacity of the positional table
    num_layers: int = 30
    num_heads: int = 8
    d_model: int = 512
    d_ff: int = 2048
    attention: str = "fixed"  # "dense" | "strided" | "fixed"
    mode: str = "merged"  # "interleaved" | "merged" | "multihead" (unused for dense)
    stride: int = 128  # l: the strided pattern's stride, the fixed pattern's block
    c: int = 32  # fixed pattern: summary positions at the end of each block (c <= l)
    head_offsets: tuple[int, ...] | None = None  # fixed: per-head offsets of part B
    attention_impl: str = "xla"  # see ATTENTION_IMPLS: "splash" = the Pallas kernel (TPU)
    positions: str = "text"  # "text": block + inner; "image": row + column + channel
    position_block: int | None = None  # text factorization block; None = stride
    image_shape: tuple[int, int, int] | None = None  # (rows, cols, channels) for "image"
    dropout: float = 0.0  # embeddings and residual branches (never attention weights)
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02  # residual output projections: init_std / sqrt(2 * num_layers)
    remat_policy: str | None = None  # see common.layers.REMAT_POLICIES; None = no remat
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        validation.check(self, self.config_problems())
        super().__post_init__()

    def config_problems(self) -> list[str]:
        positive = ("vocab_size", "max_len", "num_layers", "num_heads", "d_model", "d_ff")
        p = validation.positive_ints(self, *positive)
        if p:
            return p
        p += validation.divides(self, "num_heads", "d_model")
        p += validation.one_of(self, "attention", ATTENTION_KINDS)
        p += validation.one_of(self, "mode", MODES)
        p += validation.one_of(self, "attention_impl", ATTENTION_IMPLS)
        p += validation.one_of(self, "remat_policy", REMAT_POLICIES)
        p += validation.one_of(self, "positions", POSITIONS)
        p += validation.fractions(self, "dropout")
        if not isinstance(self.stride, int) or self.stride <= 0:
            p.append(f"stride={self.stride!r} must be a positive int")
        elif self.stride > self.max_len:
            p.append(f"stride={self.stride} does not fit the sequence (max_len={self.max_len})")
        elif self.attention != "dense":
            if self.mode == "multihead" and self.num_heads % 2:
                p.append(
                    f"num_heads={self.num_heads} is odd: mode='multihead' splits the heads "
                    "between the two parts"
                )
            if self.attention == "fixed":
                if not isinstance(self.c, int) or self.c <= 0:
                    p.append(f"c={self.c!r} must be a positive int")
                elif self.c > self.stride:
                    p.append(f"c={self.c} must be at most the block l = stride={self.stride}")
                elif self.head_offsets is not None:
                    b_heads = self.num_heads // 2 if self.mode == "multihead" else self.num_heads
                    offs = list(self.head_offsets)
                    if len(offs) != b_heads or not all(
                        isinstance(o, int) and 0 <= o <= self.stride - self.c for o in offs
                    ):
                        p.append(
                            f"head_offsets={tuple(offs)} needs {b_heads} ints in "
                            f"[0, stride - c] = [0, {self.stride - self.c}]"
                        )
        if self.positions == "text":
            block = self.position_block if self.position_block is not None else self.stride
            if not isinstance(block, int) or block <= 0 or block > self.max_len:
                p.append(
                    f"position_block={block!r} must be a positive int that fits the sequence "
                    f"(max_len={self.max_len})"
                )
        elif self.positions == "image":
            shape = self.image_shape
            if shape is None or len(shape) != 3 or min(shape) <= 0:
                p.append(f"image_shape={shape!r} must be (rows, cols, channels) for images")
            elif math.prod(shape) != self.max_len:
                p.append(
                    f"image_shape={tuple(shape)} holds {math.prod(shape)} positions but "
                    f"max_len={self.max_len}: they must be equal"
                )
        return p

    def position_shape(self) -> tuple[int, ...]:
        """The factorization of the positional table (its product >= ``max_len``)."""
        if self.positions == "image":
            return tuple(self.image_shape)
        block = self.position_block if self.position_block is not None else self.stride
        return (-(-self.max_len // block), block)

    def layer_part(self, i: int) -> str:
        """The ``common.sparse_attention`` mode of layer ``i``."""
        if self.mode == "interleaved":
            return "A" if i % 2 == 0 else "B"
        return self.mode

    @nn.compact
    def __call__(self, tokens: Array, *, deterministic: bool = True) -> Array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"sequence length {length} is longer than the positional table "
                f"(max_len={self.max_len})"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        wte = nn.Embed(
            self.vocab_size,
            self.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(self.init_std), (sh.VOCAB, sh.EMBED)
            ),
            name="wte",
            **kw,
        )
        wpe = FactorizedPositional(self.position_shape(), self.d_model, name="wpe", **kw)
        x = wte(tokens) + wpe(jnp.arange(length))  # [batch, len, d_model]
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, sh.ACTIVATIONS)

        out_std = self.init_std / math.sqrt(2 * self.num_layers)
        block_cls = remat(Block, self.remat_policy)
        for i in range(self.num_layers):
            attn = SparseSelfAttention(
                num_heads=self.num_heads,
                kind=self.attention,
                part=self.layer_part(i),
                stride=self.stride,
                c=self.c,
                head_offsets=None if self.head_offsets is None else tuple(self.head_offsets),
                attention_impl=self.attention_impl,
                init_std=self.init_std,
                out_init_std=out_std,
                parent=None,  # unbound: the block adopts it as its `attention` child
                **kw,
            )
            x = block_cls(
                attention=attn,
                d_ff=self.d_ff,
                dropout=self.dropout,
                layer_norm_eps=self.layer_norm_eps,
                init_std=self.init_std,
                out_init_std=out_std,
                deterministic=deterministic,
                name=f"h_{i}",
                **kw,
            )(x)
            x = nn.with_logical_constraint(x, sh.ACTIVATIONS)
        x = layer_norm("ln_f", eps=self.layer_norm_eps, **kw)(x)
        return wte.attend(x).astype(jnp.float32)  # [batch, len, vocab]


PRESETS: dict[str, dict[str, Any]] = {
    # Section 7.2 (Enwik8): 30 layers, d = 512, 8 heads, fixed pattern with stride 128 and
    # c = 32, merged factorized heads, context 12,288 bytes.
    "sparse-transformer-enwik8": dict(
        vocab_size=256,
        max_len=12288,
        num_layers=30,
        num_heads=8,
        d_model=512,
        d_ff=2048,
        attention="fixed",
        mode="merged",
        stride=128,
        c=32,
        remat_policy="dots_with_no_batch_dims_saveable",
    ),
    # Tiny preset for tests: every path at toy size (two residual blocks: A then B).
    "sparse-transformer-tiny": dict(
        vocab_size=256,
        max_len=64,
        num_layers=2,
        num_heads=4,
        d_model=32,
        d_ff=128,
        attention="fixed",
        mode="interleaved",
        stride=8,
        c=2,
    ),
}


def from_preset(name: str, **overrides: Any) -> SparseTransformer:
    """``SparseTransformer`` from a named preset with field overrides (unknown fields fail)."""
    return presets.build(SparseTransformer, PRESETS, name, **overrides)


def lm_loss_fn(model: nn.Module):
    """Next-token loss for ``common.training``: ``(params, batch, rng) -> (mean nats, {})``.

    ``batch``: ``inputs``, ``targets`` int ``[batch, len]`` and optional float ``weights``.
    """

    def loss_fn(params, batch, rng):
        logits = model.apply(
            {"params": params}, batch["inputs"], deterministic=False, rngs={"dropout": rng}
        )
        total, count = cross_entropy(logits, batch["targets"], batch.get("weights"))
        return total / count, {}

    return loss_fn

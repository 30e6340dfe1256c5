"""SAM's image encoder: a plain ViT with windowed attention and a convolutional neck.

Kirillov et al. 2023, "Segment Anything", section 3 and appendix A ("Image encoder"): an
MAE-pre-trained ViT (patch 16 at 1024 x 1024, a 64 x 64 token grid) adapted to high
resolution as in ViTDet (Li et al. 2022):

* most blocks attend inside non-overlapping ``14 x 14`` windows; the grid is zero-padded on
  the bottom and right to a multiple of the window (64 -> 70), *after* the block's first
  LayerNorm, and the padded tokens take part as keys (no mask), as in the reference;
* four equally spaced blocks (``global_attn_indexes``) attend over the whole grid;
* every block adds decomposed relative position biases (MViTv2, Li et al. 2022): the bias
  of query ``(i, j)`` on key ``(k, l)`` is ``q . R_h[i - k] + q . R_w[j - l]``, with one
  learned table per axis of ``2 S - 1`` rows (``S`` the window or grid side);
* absolute position embeddings for the 64 x 64 grid are added after the patch embedding;
* the neck maps the tokens to 256 channels: 1x1 convolution, LayerNorm over channels,
  3x3 convolution, LayerNorm (no conv biases).

Images are channels-last ``[batch, height, width, 3]``, already normalised and padded to
``image_size`` (``vision.sam.model.preprocess``); the output is ``[batch, grid, grid, out]``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common import validation
from common.attention import IMPLEMENTATIONS, dot_product_attention
from common.layers import MLP, REMAT_POLICIES, layer_norm, remat

Array = jax.Array


# --------------------------------------------------------------------------- windows


def window_partition(x: Array, window: int) -> tuple[Array, tuple[int, int]]:
    """``[b, h, w, c]`` -> ``[b * nh * nw, window, window, c]`` and the padded ``(hp, wp)``.

    The grid is zero-padded on the bottom and right to a multiple of ``window``; windows are
    ordered row-major over the window grid within each image.
    """
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window, -w % window
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [b, nh, nw, window, window, c]
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: Array, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> Array:
    """Inverse of ``window_partition``: ``[b * nh * nw, window, window, c]`` -> ``[b, h, w, c]``."""
    hp, wp = padded
    nh, nw = hp // window, wp // window
    c = windows.shape[-1]
    x = windows.reshape(-1, nh, nw, window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)  # [b, hp, wp, c]
    return x[:, : size[0], : size[1]]


# --------------------------------------------------------------------------- relative positions


def relative_table(table: Array, q_size: int, k_size: int) -> Array:
    """``[q_size, k_size, dim]``: row ``i - j + k_size - 1`` of ``table`` for query i, key j.

    ``table`` is ``[2 S - 1, dim]`` with ``S == q_size == k_size`` (SAM only ever asks for
    the side its table was built for: a window, or the grid at the pre-training resolution).
    """
    if q_size != k_size or table.shape[0] != 2 * q_size - 1:
        raise ValueError(
            f"relative position table of {table.shape[0]} rows does not fit query/key sides "
            f"{q_size}/{k_size} (needs 2 * side - 1 = {2 * max(q_size, k_size) - 1}); the "
            "encoder runs at the image size its tables were built for"
        )
    offsets = jnp.arange(q_size)[:, None] - jnp.arange(k_size)[None, :] + (k_size - 1)
    return table[offsets]  # [q_size, k_size, dim]


def decomposed_relative_bias(q: Array, table_h: Array, table_w: Array) -> Array:
    """Attention bias ``[b, heads, h * w, h * w]`` from unscaled queries ``[b, h, w, heads, d]``.

    ``bias[(i, j), (k, l)] = q[i, j] . R_h[i - k] + q[i, j] . R_w[j - l]``: two small
    contractions instead of a full ``(h w)^2`` table of embeddings (MViTv2's decomposition).
    """
    b, h, w, n, _ = q.shape
    rh = relative_table(table_h, h, h).astype(q.dtype)  # [h, h, d]
    rw = relative_table(table_w, w, w).astype(q.dtype)  # [w, w, d]
    rel_h = jnp.einsum("bhwnd,hkd->bnhwk", q, rh, preferred_element_type=jnp.float32)
    rel_w = jnp.einsum("bhwnd,wld->bnhwl", q, rw, preferred_element_type=jnp.float32)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # [b, heads, h, w, h, w]
    return bias.reshape(b, n, h * w, h * w)


# --------------------------------------------------------------------------- modules


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a 2-D grid with decomposed relative position bias.

    Input ``[b, h, w, d]`` (a window or the whole grid); ``table_size`` is the side ``S`` the
    relative tables cover (``2 S - 1`` rows each).
    """

    num_heads: int
    table_size: int
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, d = x.shape
        n = self.num_heads
        dh = d // n
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = nn.DenseGeneral(
            (3, n, dh),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", None, "heads", "kv")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads", "kv")),
            name="qkv",
            **kw,
        )(x)  # [b, h, w, 3, heads, dh]
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [b, h, w, heads, dh]
        table_init = nn.with_logical_partitioning(nn.initializers.zeros, (None, "kv"))
        table_h = self.param(
            "rel_pos_h", table_init, (2 * self.table_size - 1, dh), self.param_dtype
        )
        table_w = self.param(
            "rel_pos_w", table_init, (2 * self.table_size - 1, dh), self.param_dtype
        )
        bias = decomposed_relative_bias(q, table_h, table_w)  # [b, heads, h*w, h*w]
        flat = lambda t: t.reshape(b, h * w, n, dh)
        out = dot_product_attention(
            flat(q), flat(k), flat(v), bias=bias, implementation=self.attention_impl
        )  # [b, h*w, heads, dh]
        out = out.reshape(b, h, w, n, dh)
        return nn.DenseGeneral(
            d,
            axis=(-2, -1),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("heads", "kv", "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="out",
            **kw,
        )(out)  # [b, h, w, d]


class EncoderBlock(nn.Module):
    """Pre-LN ViT block; windowed (``window > 0``) or global (``window == 0``) attention."""

    num_heads: int
    d_ff: int
    window: int  # 0: global attention over the whole grid
    grid: int  # side of the token grid (sizes the global blocks' relative tables)
    layer_norm_eps: float = 1e-6
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # x: [b, h, w, d]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm("ln_1", eps=self.layer_norm_eps, **kw)(x)
        size = x.shape[1:3]
        if self.window:
            h, padded = window_partition(h, self.window)  # [b * windows, window, window, d]
        h = RelPosAttention(
            self.num_heads,
            self.window or self.grid,
            attention_impl=self.attention_impl,
            name="attn",
            **kw,
        )(h)
        if self.window:
            h = window_unpartition(h, self.window, padded, size)  # [b, h, w, d]
        x = x + h
        h = layer_norm("ln_2", eps=self.layer_norm_eps, **kw)(x)
        return x + MLP(self.d_ff, activation="gelu", name="mlp", **kw)(h)  # [b, h, w, d]


class ImageEncoder(nn.Module):
    """SAM's ViT image encoder: ``[b, S, S, 3]`` (normalised, padded) -> ``[b, S/P, S/P, out]``."""

    image_size: int = 1024
    patch_size: int = 16
    num_channels: int = 3
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    d_ff: int = 3072
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_channels: int = 256
    layer_norm_eps: float = 1e-6
    remat_policy: str | None = None  # see common.layers.REMAT_POLICIES; None: no recompute
    attention_impl: str | None = None  # see common.attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        p = validation.positive_ints(
            self, "image_size", "patch_size", "num_channels", "d_model", "num_layers"
        )
        p += validation.positive_ints(self, "num_heads", "d_ff", "out_channels")
        if validation.is_positive_int(self.patch_size) and self.image_size % self.patch_size:
            p.append(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        p += validation.divides(self, "num_heads", "d_model")
        p += validation.non_negative_ints(self, "window_size")  # 0: every block global
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_layers]
        if bad:
            p.append(f"global_attn_indexes {bad} are not block indices < {self.num_layers}")
        p += validation.one_of(self, "attention_impl", IMPLEMENTATIONS)
        p += validation.one_of(self, "remat_policy", REMAT_POLICIES)
        validation.check(self, p, "SAM image encoder")
        super().__post_init__()

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def check_images(self, images: Array) -> None:
        want = (self.image_size, self.image_size, self.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"SAM image encoder input must be [batch, {want[0]}, {want[1]}, {want[2]}] "
                f"(channels-last, normalised, padded to image_size), got shape {images.shape}"
            )

    @nn.compact
    def __call__(self, images: Array) -> Array:
        self.check_images(images)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, p, g = self.d_model, self.patch_size, self.grid
        x = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="patch_embed",
            **kw,
        )(images.astype(self.dtype))  # [b, g, g, d]
        pos = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.zeros, (None, None, None, "embed")),
            (1, g, g, d),
            self.param_dtype,
        )
        x = x + pos.astype(self.dtype)  # [b, g, g, d]
        block_cls = remat(EncoderBlock, self.remat_policy)
        for i in range(self.num_layers):
            x = block_cls(
                num_heads=self.num_heads,
                d_ff=self.d_ff,
                window=0 if i in self.global_attn_indexes else self.window_size,
                grid=g,
                layer_norm_eps=self.layer_norm_eps,
                attention_impl=self.attention_impl,
                name=f"block_{i}",
                **kw,
            )(x)  # [b, g, g, d]
        out = self.out_channels
        conv = lambda k, name: nn.Conv(
            out,
            (k, k),
            padding="SAME",
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, "embed", None)
            ),
            name=name,
            **kw,
        )
        x = conv(1, "neck_conv_0")(x)  # [b, g, g, out]
        x = layer_norm("neck_ln_0", eps=1e-6, **kw)(x)
        x = conv(3, "neck_conv_1")(x)  # [b, g, g, out]
        return layer_norm("neck_ln_1", eps=1e-6, **kw)(x)  # [b, g, g, out]

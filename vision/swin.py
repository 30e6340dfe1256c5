"""Swin Transformer (Liu et al. 2021, "Hierarchical Vision Transformer using Shifted Windows").

Every piece of section 3 of the paper:

* 3.1 patch partition: the image is cut into 4 x 4 patches, each linearly embedded to ``C``
  channels (a stride-4 convolution), followed by a LayerNorm as in the reference code
  (``patch_norm=True``). Four stages follow; between stages, patch merging concatenates
  each 2 x 2 group of neighbours (order ``(0,0), (1,0), (0,1), (1,1)`` as ``(row, col)``
  offsets, the reference's ``x0, x1, x2, x3``), applies LayerNorm over the ``4C`` channels
  and a linear map ``4C -> 2C`` without bias, halving the resolution (strides 4, 8, 16, 32).
* 3.2 window attention: self-attention inside non-overlapping ``M x M`` windows (W-MSA),
  alternating with shifted windows (SW-MSA) whose partition is displaced by ``M // 2``.
  The shift is done as a cyclic roll of the feature map by ``-M // 2``; windows that now
  straddle the image border are masked so that positions that were not adjacent in the
  un-rolled image cannot attend to each other (``shifted_window_mask``); the output is
  rolled back. Each block is pre-LN: ``x + DropPath(W-MSA(LN(x)))``, then
  ``x + DropPath(MLP(LN(x)))``.
* Relative position bias: each head learns a table of ``(2M - 1)^2`` biases, indexed by
  the offset ``(dy, dx)`` between query and key as ``(dy + M - 1) * (2M - 1) + dx + M - 1``
  (the reference's ``relative_position_index``), added to the attention logits.
* Section 4.1: stochastic depth with a rate growing linearly from 0 to ``drop_path_rate``
  over all blocks; the classifier is a final LayerNorm, global average pooling and a
  linear head.

Behaviour at resolutions the reference handles specially (both as Hugging Face's
``SwinModel`` does): an image whose sides are not multiples of the patch size is
zero-padded on the right/bottom; a stage whose side is not a multiple of the window is
zero-padded after the block's first LayerNorm (padded positions take part in attention,
as in the reference), and an odd side is zero-padded before patch merging. As in the
reference, a stage whose shorter side is ``<= M`` uses windows of that side and no shift.

Deliberate differences: (1) when that side is smaller than ``M`` the reference rebuilds
the bias table for the smaller window (the official code; Hugging Face fails there); we
keep the ``(2M - 1)^2`` table and read the offsets that the smaller window needs, so the
parameters do not depend on the input size. (2) Hugging Face's ``SwinLayer`` applies drop
path only to the attention branch; we apply it to both branches as the paper and the
official code do (this only matters in training). (3) Masked logits are set to a large
negative number rather than offset by -100 (the softmax weights differ by < 1e-40).

Option outside the paper: ``stem_channels`` replaces the linear patch embedding by a
convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"):
``log2(patch_size)`` 3x3 convs of stride 2, each followed by LayerNorm and the activation,
then a 1x1 conv to ``C`` and the patch LayerNorm. The token map and everything after it
are unchanged. The presets and the default (``()``) keep the paper's patch embedding.

``return_features=True`` / ``method="features"`` gives the hierarchical feature maps of
every stage (before patch merging; strides 4, 8, 16, 32 with ``C, 2C, 4C, 8C`` channels) for
detection and segmentation heads. Images are channels-last ``[batch, height, width, C]``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import presets, validation
from common import sharding as sh
from common.attention import IMPLEMENTATIONS, dot_product_attention
from common.layers import (
    ACTIVATIONS,
    MLP,
    REMAT_POLICIES,
    StackedDense,
    activation,
    layer_norm,
    remat,
)

Array = jax.Array


# --------------------------------------------------------------------------- pure functions


def window_partition(x: Array, window: int) -> Array:
    """``[batch, H, W, C]`` -> ``[batch * H/M * W/M, M, M, C]``, windows in row-major order.

    Window ``b * (H/M * W/M) + i * (W/M) + j`` holds ``x[b, i*M:(i+1)*M, j*M:(j+1)*M]``.
    """
    b, h, w, c = x.shape
    if h % window or w % window:
        raise ValueError(f"window_partition: {h}x{w} is not a multiple of window={window}")
    x = x.reshape(b, h // window, window, w // window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [b, h/M, w/M, M, M, c]
    return x.reshape(-1, window, window, c)


def window_reverse(windows: Array, window: int, height: int, width: int) -> Array:
    """Inverse of ``window_partition``: ``[batch * nW, M, M, C]`` -> ``[batch, H, W, C]``."""
    if height % window or width % window:
        raise ValueError(f"window_reverse: {height}x{width} is not a multiple of window={window}")
    c = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [b, h/M, M, w/M, M, c]
    return x.reshape(-1, height, width, c)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """Boolean ``[nW, M*M, M*M]`` mask of SW-MSA (True = may attend), for a feature map of
    ``height x width`` (multiples of ``window``) rolled by ``-shift`` along both axes.

    As in the reference: each axis of the rolled map is cut into three regions,
    ``[0, n - M)``, ``[n - M, n - shift)`` and ``[n - shift, n)`` (the last one holds what
    the roll wrapped around from the other border); two positions of a window may attend to
    each other iff they lie in the same region along both axes.
    """
    if height % window or width % window:
        raise ValueError(
            f"shifted_window_mask: {height}x{width} is not a multiple of window={window}"
        )
    if not 0 <= shift < window:
        raise ValueError(f"shifted_window_mask: shift={shift} must be in [0, window={window})")
    labels = np.zeros((1, height, width, 1), np.int32)
    cuts = lambda n: (slice(0, n - window), slice(n - window, n - shift), slice(n - shift, n))
    region = 0
    for hs in cuts(height):
        for ws in cuts(width):
            labels[:, hs, ws, :] = region
            region += 1
    lw = np.asarray(window_partition(labels, window)).reshape(-1, window * window)  # [nW, N]
    return lw[:, :, None] == lw[:, None, :]  # [nW, N, N]


def relative_position_index(window: int, table_window: int | None = None) -> np.ndarray:
    """``[M*M, M*M]`` indices into a ``(2T - 1)^2`` bias table (``T = table_window``, default
    ``M``): entry ``(i, j)`` is the offset from key ``j`` to query ``i``,
    ``(dy + T - 1) * (2T - 1) + (dx + T - 1)``, as in the reference."""
    t = window if table_window is None else table_window
    if window > t:
        raise ValueError(f"window {window} is larger than the bias table's window {t}")
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]: query minus key
    return (rel[0] + t - 1) * (2 * t - 1) + (rel[1] + t - 1)


def merge_patches(x: Array) -> Array:
    """``[batch, H, W, C]`` -> ``[batch, ceil(H/2), ceil(W/2), 4C]``: each 2 x 2 neighbourhood
    concatenated as ``x[0::2, 0::2] | x[1::2, 0::2] | x[0::2, 1::2] | x[1::2, 1::2]`` (the
    reference's order); odd sides are zero-padded at the bottom/right first."""
    _, h, w, _ = x.shape
    if h % 2 or w % 2:
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
    return jnp.concatenate(parts, axis=-1)


def conv(name: str, features: int, kernel: int, stride: int, padding: str, **kw: Any) -> nn.Conv:
    """A ``kernel x kernel`` conv of this stride for ``[batch, H, W, c]`` maps (patch
    embedding and stem), its output channels on the "embed" axis."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, None, sh.EMBED)
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (sh.EMBED,)),
        name=name,
        **kw,
    )


def stage_windows(height: int, width: int, window: int) -> tuple[int, int]:
    """``(window, shift)`` a stage of ``height x width`` uses: the reference's rule is one
    window over the shorter side and no shift when that side is ``<= window``."""
    if min(height, width) <= window:
        return min(height, width), 0
    return window, window // 2


# --------------------------------------------------------------------------- modules


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drops the whole residual branch per example."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = jax.random.bernoulli(
            self.make_rng("dropout"), 1.0 - self.rate, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with the learned relative position bias."""

    num_heads: int
    window: int  # M of the bias table (the paper's window size)
    attn_dropout: float = 0.0
    attention_impl: str | None = None  # see common.attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,  # [windows, w*w, dim]; w <= window
        window: int,  # side w of these windows
        mask: Array | None,  # bool [windows | 1, 1, w*w, w*w]
        *,
        deterministic: bool = True,
    ) -> Array:
        dim = x.shape[-1]
        h, d = self.num_heads, dim // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = StackedDense(
            3,
            (h, d),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.truncated_normal(0.02), (sh.EMBED, None, sh.HEADS, sh.KV)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, sh.HEADS, sh.KV)),
            name="qkv",
            dot_general=jax.lax.dot_general,  # see common.layers.flat_dot_general
            **kw,
        )(x)  # each [windows, w*w, heads, d]
        table = self.param(
            "relative_position_bias_table",
            nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, sh.HEADS)),
            ((2 * self.window - 1) ** 2, h),
            self.param_dtype,
        )
        index = relative_position_index(window, self.window).reshape(-1)
        bias = jnp.take(table, jnp.asarray(index), axis=0).reshape(window**2, window**2, h)
        bias = bias.transpose(2, 0, 1)[None]  # [1, heads, w*w, w*w]
        # logits are float32 on the XLA/einsum paths; cuDNN wants the bias in the input dtype
        bias = bias.astype(self.dtype if self.attention_impl == "cudnn" else jnp.float32)
        rate = 0.0 if deterministic else self.attn_dropout
        out = dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            dropout_rate=rate,
            dropout_rng=self.make_rng("dropout") if rate > 0.0 else None,
            implementation=self.attention_impl,
        )  # [windows, w*w, heads, d]
        return nn.DenseGeneral(
            dim,
            axis=(-2, -1),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.truncated_normal(0.02), (sh.HEADS, sh.KV, sh.EMBED)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (sh.EMBED,)),
            name="out",
            **kw,
        )(out)  # [windows, w*w, dim]


class SwinBlock(nn.Module):
    """One Swin block (paper equation 3): (S)W-MSA and MLP, both pre-LN with residuals."""

    num_heads: int
    window: int  # M: bias-table window
    mlp_dim: int
    drop_path: float
    dropout: float
    attn_dropout: float
    layer_norm_eps: float
    activation: str
    shifted: bool  # odd blocks of a stage: SW-MSA
    deterministic: bool
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # x: [batch, H, W, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, c = x.shape
        window, shift = stage_windows(height, width, self.window)
        shift = shift if self.shifted else 0
        drop_path = DropPath(self.drop_path)

        h = layer_norm("ln_1", eps=self.layer_norm_eps, **kw)(x)
        pad_h, pad_w = -height % window, -width % window
        if pad_h or pad_w:  # zero-pad after the norm, as the reference does
            h = jnp.pad(h, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        hp, wp = height + pad_h, width + pad_w
        mask = None
        if shift:
            h = jnp.roll(h, (-shift, -shift), axis=(1, 2))  # cyclic shift
            m = jnp.asarray(shifted_window_mask(hp, wp, window, shift))[:, None]  # [nW,1,N,N]
            mask = jnp.tile(m, (b, 1, 1, 1))  # [batch*nW, 1, N, N]; windows are batch-major
        windows = window_partition(h, window).reshape(-1, window * window, c)  # [b*nW, N, C]
        attn = WindowAttention(
            self.num_heads,
            self.window,
            attn_dropout=self.attn_dropout,
            attention_impl=self.attention_impl,
            name="attn",
            **kw,
        )(windows, window, mask, deterministic=self.deterministic)
        h = window_reverse(attn.reshape(-1, window, window, c), window, hp, wp)  # [b, hp, wp, C]
        if shift:
            h = jnp.roll(h, (shift, shift), axis=(1, 2))  # reverse cyclic shift
        h = h[:, :height, :width]
        h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
        x = x + drop_path(h, deterministic=self.deterministic)

        h = layer_norm("ln_2", eps=self.layer_norm_eps, **kw)(x)
        h = MLP(
            self.mlp_dim,
            activation=self.activation,
            dropout=self.dropout,
            kernel_init=nn.initializers.truncated_normal(0.02),
            out_kernel_init=nn.initializers.truncated_normal(0.02),
            # MLP's default common.layers.flat_dot_general (its narrowing output projection
            # takes the faster weight gradient) is faster here; the attention projections
            # keep jax.lax.dot_general, which was faster flattened on one-thread devices
            # (benchmarks/LOG.md).
            name="mlp",
            **kw,
        )(h, deterministic=self.deterministic)
        return x + drop_path(h, deterministic=self.deterministic)  # [batch, H, W, C]


class PatchMerging(nn.Module):
    """``merge_patches`` -> LayerNorm(4C) -> Linear(4C -> 2C, no bias)."""

    layer_norm_eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [batch, H, W, C] -> [batch, H/2, W/2, 2C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = layer_norm("norm", eps=self.layer_norm_eps, **kw)(merge_patches(x))
        return nn.Dense(
            2 * c,
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.truncated_normal(0.02), (None, sh.EMBED)
            ),
            name="reduction",
            **kw,
        )(x)


class Swin(nn.Module):
    """Swin Transformer classifier and hierarchical backbone. Presets live in ``PRESETS``.

    ``apply(params, images)`` returns logits ``[batch, num_classes]`` (float32), or the
    pooled features ``[batch, 8C]`` when ``num_classes == 0``. ``return_features=True`` also
    returns the list of stage feature maps ``[batch, H_s, W_s, C_s]`` (before merging; the
    last one before the final norm); ``method="features"`` returns only that list.
    """

    num_classes: int = 1000  # 0: no head, return the pooled features
    image_size: int = 224  # nominal resolution (FLOPs, examples); any size is accepted
    patch_size: int = 4
    # () = the paper's patch partition + linear embedding (a p x p conv of stride p). Else
    # the convolutional stem of the module docstring: one 3x3 conv of stride 2 ("SAME"
    # padding) per entry, to that many channels; log2(patch_size) entries.
    stem_channels: tuple[int, ...] = ()
    num_channels: int = 3
    embed_dim: int = 96  # C
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7  # M
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path_rate: float = 0.2  # stochastic depth of the last block (0 for the first)
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"
    pad_inputs: bool = True  # False: sizes that need padding raise instead
    head_zero_init: bool = False
    remat_policy: str | None = None  # see common.layers.REMAT_POLICIES; None = no remat
    attention_impl: str | None = None  # see common.attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        positive = ("image_size", "patch_size", "num_channels", "embed_dim", "window_size")
        problems = validation.positive_ints(self, *positive)
        problems += validation.non_negative_ints(self, "num_classes")
        if self.stem_channels:
            if 2 ** len(self.stem_channels) != self.patch_size:
                problems.append(
                    f"stem_channels={tuple(self.stem_channels)} has {len(self.stem_channels)} "
                    f"stride-2 convs, which make patches of {2 ** len(self.stem_channels)}, "
                    f"not patch_size={self.patch_size}"
                )
            if any(c <= 0 for c in self.stem_channels):
                problems.append(f"stem_channels={tuple(self.stem_channels)} must be positive")
        if len(self.depths) == 0 or any(dp <= 0 for dp in self.depths):
            problems.append(f"depths={tuple(self.depths)} must be non-empty and positive")
        if len(self.num_heads) != len(self.depths):
            problems.append(
                f"num_heads={tuple(self.num_heads)} needs one entry per stage "
                f"(depths has {len(self.depths)})"
            )
        else:
            for s, h in enumerate(self.num_heads):
                dim = self.embed_dim * 2**s
                if h <= 0 or dim % h:
                    problems.append(f"num_heads[{s}]={h} does not divide stage {s} width {dim}")
        if self.mlp_ratio <= 0:
            problems.append(f"mlp_ratio={self.mlp_ratio} must be positive")
        problems += validation.one_of(self, "activation", sorted(ACTIVATIONS))
        problems += validation.one_of(self, "attention_impl", IMPLEMENTATIONS)
        problems += validation.one_of(self, "remat_policy", REMAT_POLICIES)
        problems += validation.fractions(self, "dropout", "attn_dropout", "drop_path_rate")
        validation.check(self, problems)
        super().__post_init__()

    @property
    def num_features(self) -> int:
        """Channels of the last stage (``C * 2^(stages - 1)``)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def drop_path_rates(self) -> list[float]:
        """Per-block stochastic depth, linear from 0 to ``drop_path_rate`` (section 4.1)."""
        n = sum(self.depths)
        return [self.drop_path_rate * i / max(n - 1, 1) for i in range(n)]

    def stage_resolutions(self, height: int, width: int) -> list[tuple[int, int]]:
        """Feature-map size of every stage for an image of ``height x width``."""
        h, w = -(-height // self.patch_size), -(-width // self.patch_size)
        out = []
        for _ in self.depths:
            out.append((h, w))
            h, w = (h + 1) // 2, (w + 1) // 2
        return out

    def check_images(self, images: Array) -> list[tuple[int, int]]:
        """Raises ``ValueError`` for a bad image batch; returns ``stage_resolutions``."""
        height, width = validation.check_images(images.shape, self.num_channels)
        stages = self.stage_resolutions(height, width)
        if not self.pad_inputs:
            problems = []
            if height % self.patch_size or width % self.patch_size:
                problems.append(
                    f"image {height}x{width} is not a multiple of patch_size={self.patch_size}"
                )
            for s, (h, w) in enumerate(stages):
                window, _ = stage_windows(h, w, self.window_size)
                if h % window or w % window:
                    problems.append(f"stage {s} map {h}x{w} is not a multiple of window {window}")
                if s < len(stages) - 1 and (h % 2 or w % 2):
                    problems.append(f"stage {s} map {h}x{w} has an odd side and cannot be merged")
            if problems:
                raise ValueError(
                    "with pad_inputs=False the image size must need no padding: "
                    + "; ".join(problems)
                )
        return stages

    def features(self, images: Array, *, deterministic: bool = True) -> list[Array]:
        """Stage feature maps ``[batch, H/4, W/4, C]`` ... ``[batch, H/32, W/32, 8C]``."""
        return self(images, deterministic=deterministic, return_features=True)[1]

    @nn.compact
    def __call__(
        self, images: Array, *, deterministic: bool = True, return_features: bool = False
    ) -> Array | tuple[Array, list[Array]]:
        self.check_images(images)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        _, height, width, _ = images.shape
        x = images.astype(self.dtype)
        if height % p or width % p:  # zero-pad to whole patches, as the reference does
            x = jnp.pad(x, ((0, 0), (0, -height % p), (0, -width % p), (0, 0)))
        for i, channels in enumerate(self.stem_channels):  # [batch, H/2^(i+1), W/2^(i+1), c]
            x = conv(f"stem_conv_{i}", channels, 3, 2, "SAME", **kw)(x)
            x = layer_norm(f"stem_norm_{i}", eps=self.layer_norm_eps, **kw)(x)
            x = activation(self.activation)(x)
        k = 1 if self.stem_channels else p
        x = conv("patch_embed", self.embed_dim, k, k, "VALID", **kw)(x)  # [batch, H/4, W/4, C]
        x = layer_norm("patch_norm", eps=self.layer_norm_eps, **kw)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)

        rates = self.drop_path_rates()
        block_cls = remat(SwinBlock, self.remat_policy)
        features = []
        k = 0
        for s, depth in enumerate(self.depths):
            dim = self.embed_dim * 2**s
            for i in range(depth):
                x = block_cls(
                    num_heads=self.num_heads[s],
                    window=self.window_size,
                    mlp_dim=int(self.mlp_ratio * dim),
                    drop_path=rates[k],
                    dropout=self.dropout,
                    attn_dropout=self.attn_dropout,
                    layer_norm_eps=self.layer_norm_eps,
                    activation=self.activation,
                    shifted=i % 2 == 1,
                    deterministic=deterministic,
                    attention_impl=self.attention_impl,
                    name=f"stage_{s}_block_{i}",
                    **kw,
                )(x)
                x = nn.with_logical_constraint(x, (sh.BATCH, None, None, sh.EMBED))
                k += 1
            features.append(x)  # [batch, H_s, W_s, dim]
            if s < len(self.depths) - 1:
                x = PatchMerging(self.layer_norm_eps, name=f"stage_{s}_merge", **kw)(x)

        x = layer_norm("norm", eps=self.layer_norm_eps, **kw)(x)
        out = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)  # [batch, 8C]
        if self.num_classes:
            out = nn.Dense(
                self.num_classes,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.zeros
                    if self.head_zero_init
                    else nn.initializers.truncated_normal(0.02),
                    (sh.EMBED, None),
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                name="head",
                **kw,
            )(out)
        out = out.astype(jnp.float32)  # [batch, num_classes] (or the pooled features)
        return (out, features) if return_features else out


# One table for the family (section 3.3 and table 1 of the paper). Stochastic depth as in
# section 4.1 / the official configs: 0.2, 0.3, 0.5 for T, S, B; 0.2 for L (ImageNet-22K).
_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.2)
_224 = dict(num_classes=1000, image_size=224, window_size=7)
_384 = dict(num_classes=1000, image_size=384, window_size=12)
PRESETS: dict[str, dict[str, Any]] = {
    "swin-t": dict(**_T, **_224),
    "swin-s": dict(**_S, **_224),
    "swin-b": dict(**_B, **_224),
    "swin-l": dict(**_L, **_224),
    "swin-t-384": dict(**_T, **_384),
    "swin-s-384": dict(**_S, **_384),
    "swin-b-384": dict(**_B, **_384),
    "swin-l-384": dict(**_L, **_384),
    # Toy size for tests ("tiny" would collide with Swin-T, which the paper calls Swin-Tiny).
    # At 48 x 48 the last stage (2 x 2) is smaller than the window: one 2 x 2 window.
    "swin-toy": dict(
        num_classes=10,
        image_size=48,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=3,
        drop_path_rate=0.1,
    ),
}


def from_preset(name: str, **overrides: Any) -> Swin:
    """``Swin`` built from a named preset, with field overrides (unknown fields fail)."""
    return presets.build(Swin, PRESETS, name, **overrides)


def example_images(model: Swin, batch: int = 1) -> jax.ShapeDtypeStruct:
    """Abstract input at the model's ``image_size`` (for ``init`` / ``eval_shape`` / FLOPs)."""
    s = model.image_size
    return jax.ShapeDtypeStruct((batch, s, s, model.num_channels), jnp.float32)

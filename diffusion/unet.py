"""The DDPM UNet (Ho et al. 2020, section 4 and appendix B), laid out as diffusers'
``UNet2DModel`` so that its checkpoints convert one to one (``diffusion/convert.py``).

The network maps a noisy image ``x_t`` and its timestep ``t`` to the model output (the noise
for epsilon-prediction). Its parts, each a module here so that the latent-diffusion UNet
(cross-attention, Stable Diffusion v1 sizes) grows from the same blocks:

* ``timestep_embedding``: the Transformer's sinusoidal position encoding of ``t`` (Ho et al.
  section 4: "diffusion time t is specified by adding the Transformer sinusoidal position
  embedding"), then ``TimestepMLP`` (Dense, SiLU, Dense) to ``4 x`` the base width.
* ``ResnetBlock``: GroupNorm, SiLU, 3x3 conv, plus the projected time embedding, GroupNorm,
  SiLU, dropout, 3x3 conv, and a residual (a 1x1 conv when the width changes) (Ho et al.
  appendix B, after the Wide ResNet of Zagoruyko and Komodakis).
* ``Attention`` (q/k/v/out projections, self- or cross-attention over a context) inside
  ``AttentionBlock`` (GroupNorm first, residual after): the self-attention the paper puts at
  the 16 x 16 resolution.
* ``Downsample`` (a stride-2 3x3 conv) and ``Upsample`` (nearest-neighbour 2x, then a 3x3 conv).
* ``UNet``: ``len(block_channels)`` levels of ``layers_per_block`` residual blocks (with
  attention where ``down_attention`` says), downsampling between levels, a middle block
  (residual, attention, residual), and the mirrored up path of ``layers_per_block + 1``
  residual blocks per level, each taking one skip connection (PixelCNN++-style).

Class conditioning (as diffusers' ``num_class_embeds``): an embedding of the label added to
the time embedding. With ``null_label`` the table has one extra row, label ``num_classes``,
that stands for "no class": trained on randomly dropped labels, it gives the unconditional
model that classifier-free guidance (Ho and Salimans 2021) extrapolates from.

Layout is NHWC (diffusers is NCHW). GroupNorm statistics and the attention softmax run in
float32 whatever ``dtype`` is. Parameters carry no logical axis annotations: the model is
data-parallel (replicated parameters); convolution channels do not map onto ``embed``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common import presets
from common.attention import dot_product_attention

Array = jax.Array


def timestep_embedding(
    t: Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> Array:
    """Sinusoidal embedding ``[batch, dim]`` of (possibly fractional) timesteps ``t [batch]``.

    Frequencies ``max_period ** (-i / (dim / 2 - freq_shift))`` for ``i < dim / 2``; the sines
    come first unless ``flip_sin_to_cos`` (diffusers' ``Timesteps``: DDPM used
    ``freq_shift=1`` and sines first, Stable Diffusion ``freq_shift=0`` and cosines first).
    Always float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # [batch, half]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # [batch, 2 * half]
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _group_norm(name: str, groups: int, eps: float, dtype: Any, param_dtype: Any) -> nn.GroupNorm:
    # flax computes the statistics in float32 (force_float32_reductions) for any dtype.
    return nn.GroupNorm(
        num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name
    )


def _conv(name: str, features: int, kernel: int, dtype: Any, param_dtype: Any, **kw) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        padding=kw.pop("padding", "SAME"),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        **kw,
    )


class TimestepMLP(nn.Module):
    """Dense -> SiLU -> Dense on the sinusoidal embedding (diffusers' ``TimestepEmbedding``)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, emb: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = nn.Dense(self.features, name="linear_1", **kw)(emb)  # [batch, features]
        return nn.Dense(self.features, name="linear_2", **kw)(nn.silu(emb))


class ResnetBlock(nn.Module):
    """Residual block with the time embedding added between its two convolutions."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    output_scale: float = 1.0  # the sum is divided by this (diffusers' output_scale_factor)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array | None, *, deterministic: bool = True) -> Array:
        # x: [batch, h, w, c_in]; temb: [batch, time_dim]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(_group_norm("norm1", self.groups, self.eps, **kw)(x))
        h = _conv("conv1", self.out_channels, 3, **kw)(h)  # [batch, h, w, out]
        if temb is not None:
            t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(_group_norm("norm2", self.groups, self.eps, **kw)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _conv("conv2", self.out_channels, 3, **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv("conv_shortcut", self.out_channels, 1, **kw)(x)
        return (x + h) / self.output_scale  # [batch, h, w, out]


class Attention(nn.Module):
    """Multi-head attention of ``x [batch, n, d]`` over itself or over ``context``.

    Separate q/k/v/out projections (diffusers' ``Attention``: ``to_q``, ``to_k``, ``to_v``,
    ``to_out.0``); scores scaled by ``1 / sqrt(head_dim)``, softmax in float32. With
    ``context [batch, m, d_ctx]`` it is the cross-attention of the latent-diffusion UNet.
    """

    num_heads: int
    head_dim: int
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, d = x.shape
        ctx = x if context is None else context
        inner = self.num_heads * self.head_dim
        split = lambda y: y.reshape(b, y.shape[1], self.num_heads, self.head_dim)
        q = split(nn.Dense(inner, use_bias=self.qkv_bias, name="to_q", **kw)(x))  # [b, n, h, dh]
        k = split(nn.Dense(inner, use_bias=self.qkv_bias, name="to_k", **kw)(ctx))  # [b, m, h, dh]
        v = split(nn.Dense(inner, use_bias=self.qkv_bias, name="to_v", **kw)(ctx))
        out = dot_product_attention(q, k, v).reshape(b, n, inner)  # [b, n, inner]
        return nn.Dense(d, name="to_out", **kw)(out)  # [b, n, d]


class AttentionBlock(nn.Module):
    """GroupNorm -> self-attention over the ``h * w`` positions -> residual -> ``/ rescale``.

    ``head_dim=None`` is one head over all channels (DDPM's attention).
    """

    head_dim: int | None = None
    groups: int = 32
    eps: float = 1e-6
    rescale: float = 1.0  # diffusers' rescale_output_factor
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        head_dim = self.head_dim or c
        if c % head_dim:
            raise ValueError(f"attention over {c} channels cannot use heads of width {head_dim}")
        h = _group_norm("group_norm", self.groups, self.eps, **kw)(x).reshape(b, hh * ww, c)
        h = Attention(c // head_dim, head_dim, name="attn", **kw)(h)  # [b, h * w, c]
        return (x + h.reshape(b, hh, ww, c)) / self.rescale


class Downsample(nn.Module):
    """A stride-2 3x3 conv; ``padding=0`` pads one zero row/column at the bottom/right only
    (the DDPM CIFAR-10 checkpoint), ``padding=1`` pads one on every side."""

    channels: int
    padding: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
        conv = _conv("conv", self.channels, 3, self.dtype, self.param_dtype, padding=pad, strides=2)
        return conv(x)  # [batch, h / 2, w / 2, channels]


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [batch, 2h, 2w, c]
        return _conv("conv", self.channels, 3, self.dtype, self.param_dtype)(x)


class UNet(nn.Module):
    """The DDPM UNet: ``(x_t [b, h, w, in], t [b], labels [b]) -> [b, h, w, out_channels]``.

    Presets live in ``PRESETS``; ``h`` and ``w`` must be divisible by ``downsample_factor``.
    """

    out_channels: int = 3
    block_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    down_attention: tuple[bool, ...] = (False, True, False, False)  # per level
    up_attention: tuple[bool, ...] | None = None  # per up level; None: mirror down_attention
    mid_attention: bool = True
    attention_head_dim: int | None = None  # None: one head over all channels
    groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.1
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    downsample_padding: int = 0
    mid_scale: float = 1.0  # diffusers' mid_block_scale_factor
    num_classes: int = 0  # 0: unconditional
    null_label: bool = False  # one extra embedding row, label num_classes, for guidance
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)

    @property
    def num_class_embeds(self) -> int:
        return self.num_classes + int(self.null_label)

    def _up_attention(self) -> tuple[bool, ...]:
        if self.up_attention is None:
            return tuple(reversed(self.down_attention))
        return tuple(self.up_attention)

    def check_config(self) -> None:
        n = len(self.block_channels)
        if len(self.down_attention) != n or len(self._up_attention()) != n:
            raise ValueError(
                f"down_attention {self.down_attention} and up_attention {self.up_attention} "
                f"need one entry per level ({n} levels in block_channels {self.block_channels})"
            )
        bad = [c for c in self.block_channels if c % self.groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by groups={self.groups}")
        if self.null_label and self.num_classes <= 0:
            raise ValueError("null_label needs a class-conditional model (num_classes > 0)")

    def check_image_size(self, height: int, width: int) -> None:
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the UNet's total "
                f"downsampling {f} ({len(self.block_channels)} levels)"
            )

    def check_labels(self, labels: Any, *, allow_null: bool = True) -> None:
        """Host-side check of concrete labels: inside ``[0, num_classes)`` (or the null label)."""
        import numpy as np

        if self.num_classes <= 0:
            raise ValueError("this UNet is unconditional (num_classes=0); pass no labels")
        labels = np.asarray(labels)
        top = self.num_class_embeds if allow_null else self.num_classes
        bad = labels[(labels < 0) | (labels >= top)]
        if bad.size:
            null = f", {self.num_classes} = null" if self.null_label and allow_null else ""
            raise ValueError(
                f"labels {sorted(set(bad.tolist()))[:8]} are outside the classes "
                f"0..{self.num_classes - 1}{null}"
            )

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        labels: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> Array:
        self.check_config()
        b, hh, ww, _ = x.shape
        self.check_image_size(hh, ww)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = dict(groups=self.groups, eps=self.norm_eps, dropout=self.dropout, **kw)
        attn = dict(head_dim=self.attention_head_dim, groups=self.groups, eps=self.norm_eps, **kw)
        base = self.block_channels[0]
        t = jnp.broadcast_to(jnp.asarray(t), (b,))

        emb = timestep_embedding(
            t, base, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        ).astype(self.dtype)  # [b, base]
        temb = TimestepMLP(4 * base, name="time_embedding", **kw)(emb)  # [b, 4 * base]
        if self.num_classes > 0:
            if labels is None:
                raise ValueError("this UNet is class-conditional: pass labels")
            table = nn.Embed(self.num_class_embeds, 4 * base, name="class_embedding", **kw)
            temb = temb + table(labels)  # [b, 4 * base]
        elif labels is not None:
            raise ValueError("this UNet is unconditional (num_classes=0); pass no labels")

        h = _conv("conv_in", base, 3, **kw)(x)  # [b, h, w, base]
        skips = [h]
        for i, ch in enumerate(self.block_channels):
            for j in range(self.layers_per_block):
                h = ResnetBlock(ch, name=f"down_{i}_resnet_{j}", **res)(
                    h, temb, deterministic=deterministic
                )
                if self.down_attention[i]:
                    h = AttentionBlock(name=f"down_{i}_attn_{j}", **attn)(h)
                skips.append(h)
            if i < len(self.block_channels) - 1:
                h = Downsample(ch, self.downsample_padding, name=f"down_{i}_downsample", **kw)(h)
                skips.append(h)  # [b, h / 2**(i+1), w / 2**(i+1), ch]

        mid = dict(res, output_scale=self.mid_scale)
        top = self.block_channels[-1]
        h = ResnetBlock(top, name="mid_resnet_0", **mid)(h, temb, deterministic=deterministic)
        if self.mid_attention:
            h = AttentionBlock(rescale=self.mid_scale, name="mid_attn_0", **attn)(h)
        h = ResnetBlock(top, name="mid_resnet_1", **mid)(h, temb, deterministic=deterministic)

        up_attention = self._up_attention()
        for i, ch in enumerate(reversed(self.block_channels)):
            for j in range(self.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)  # [b, h, w, c + c_skip]
                h = ResnetBlock(ch, name=f"up_{i}_resnet_{j}", **res)(
                    h, temb, deterministic=deterministic
                )
                if up_attention[i]:
                    h = AttentionBlock(name=f"up_{i}_attn_{j}", **attn)(h)
            if i < len(self.block_channels) - 1:
                h = Upsample(ch, name=f"up_{i}_upsample", **kw)(h)

        h = nn.silu(_group_norm("conv_norm_out", self.groups, self.norm_eps, **kw)(h))
        return _conv("conv_out", self.out_channels, 3, **kw)(h)  # [b, h, w, out_channels]


_DDPM_CIFAR10 = dict(
    out_channels=3,
    block_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_attention=(False, True, False, False),  # attention at 16 x 16
    up_attention=(False, False, True, False),
    attention_head_dim=None,
    groups=32,
    norm_eps=1e-6,
    dropout=0.1,  # Ho et al. appendix B, CIFAR-10
    flip_sin_to_cos=False,
    freq_shift=1.0,
    downsample_padding=0,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Ho et al. 2020, CIFAR-10 32 x 32 (diffusers' google/ddpm-cifar10-32 configuration).
    "ddpm-cifar10": _DDPM_CIFAR10,
    # For tests: two levels, attention at the lower one, one residual block per level.
    "ddpm-tiny": dict(
        _DDPM_CIFAR10,
        block_channels=(16, 32),
        layers_per_block=1,
        down_attention=(False, True),
        up_attention=(True, False),
        groups=8,
        dropout=0.0,
    ),
}


def from_preset(name: str, **overrides: Any) -> UNet:
    """``UNet`` built from a named preset, with field overrides (unknown fields fail)."""
    return presets.build(UNet, PRESETS, name, **overrides)


def example_inputs(model: UNet, image_size: int, in_channels: int = 3, batch: int = 1):
    """Abstract ``(x, t, labels)`` for ``init`` / lowering (labels only when conditional)."""
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32) if model.num_classes > 0 else None
    return x, t, labels

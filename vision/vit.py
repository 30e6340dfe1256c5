"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

* Section 3.1: the image ``[H, W, C]`` is cut into ``P x P`` patches, each flattened and
  linearly projected to ``d_model`` (done here as a ``P x P`` convolution with stride ``P``,
  the same linear map); a learned class token is prepended and learned 1-D position
  embeddings are added; a pre-LN Transformer encoder (LayerNorm before attention and MLP,
  residuals around both, GELU MLP) and a final LayerNorm follow. The class token's final
  state (or, with ``pool="mean"``, the mean of all patch tokens, as in the paper's
  appendix D.3 "global average pooling" variant) feeds the head.
* The paper's pre-training head has one hidden ``tanh`` layer; ``representation_size``
  adds it (Hugging Face's ``ViTModel`` "pooler"). Without it the head is one linear layer
  (fine-tuning head), zero-initialised as in the paper's fine-tuning setup.
* Section 3.2: at a resolution other than the one the position table was trained for, the
  grid part of the table is resized with 2-D interpolation (``resize_positions``; bicubic
  by default, numerically equal to ``torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False)`` without antialiasing, which Hugging Face's ViT and CLIP use in
  ``interpolate_pos_encoding``). timm's ``resample_abs_pos_embed`` defaults to
  ``antialias=True``, torch's PIL-style cubic filter, which gives other values even when
  upsampling (max abs difference 0.2 on a unit-normal 4 x 4 grid resized to 6 x 5).

Images are channels-last ``[batch, height, width, channels]``. Sizes follow table 1 of the
paper; ViT-Ti and ViT-S are DeiT's (Touvron et al. 2021). ``vit-toy`` is for tests.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import presets, validation
from common import sharding as sh
from common.attention import IMPLEMENTATIONS, MultiHeadAttention
from common.layers import ACTIVATIONS, MLP, REMAT_POLICIES, dense, layer_norm, remat

Array = jax.Array
POOLS = ("token", "mean")
RESIZE_METHODS = ("bicubic", "bilinear")


# --------------------------------------------------------------------------- positions


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with torch's ``a = -0.75``."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def interpolation_matrix(in_size: int, out_size: int, method: str = "bicubic") -> np.ndarray:
    """``[out_size, in_size]`` weights of 1-D resampling as torch's ``interpolate`` does it.

    ``align_corners=False`` and no antialiasing; out-of-range taps are clamped to the border
    (torch's bicubic); bilinear clamps negative source coordinates to 0 (torch's bilinear).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r} is not one of {RESIZE_METHODS}")
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    w = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if method == "bilinear":
        src = np.maximum(src, 0.0)
        i0 = np.floor(src).astype(int)
        lam = src - i0
        i1 = np.minimum(i0 + 1, in_size - 1)
        i0 = np.minimum(i0, in_size - 1)
        np.add.at(w, (rows, i0), 1.0 - lam)
        np.add.at(w, (rows, i1), lam)
        return w
    i0 = np.floor(src).astype(int)
    t = src - i0
    for k in range(-1, 3):
        idx = np.clip(i0 + k, 0, in_size - 1)
        np.add.at(w, (rows, idx), _cubic(t - k))
    return w


def resize_positions(grid: Array, new_shape: tuple[int, int], method: str = "bicubic") -> Array:
    """Resizes a grid of position embeddings ``[h, w, dim]`` to ``[*new_shape, dim]``.

    Separable 1-D interpolation (section 3.2 of the paper); the arithmetic runs in float32
    and the result has ``grid``'s dtype.
    """
    if grid.ndim != 3:
        raise ValueError(f"position grid must be [height, width, dim], got shape {grid.shape}")
    h, w = grid.shape[:2]
    if (h, w) == tuple(new_shape):
        return grid
    wh = jnp.asarray(interpolation_matrix(h, new_shape[0], method), jnp.float32)
    ww = jnp.asarray(interpolation_matrix(w, new_shape[1], method), jnp.float32)
    out = jnp.einsum("ah,hwd,bw->abd", wh, grid.astype(jnp.float32), ww)  # [h', w', dim]
    return out.astype(grid.dtype)


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


# --------------------------------------------------------------------------- modules


class EncoderBlock(nn.Module):
    """Pre-LN block: ``x + attn(LN(x))`` then ``x + MLP(LN(x))`` (paper equations 2-3)."""

    num_heads: int
    d_ff: int
    dropout: float
    attn_dropout: float
    layer_norm_eps: float
    activation: str
    deterministic: bool
    attention_impl: str | None = None
    causal: bool = False  # causal self-attention (CLIP's text encoder)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # x: [batch, tokens, d_model]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d_model = x.shape[-1]
        h = layer_norm("ln_1", eps=self.layer_norm_eps, **kw)(x)
        h, _ = MultiHeadAttention(
            num_heads=self.num_heads,
            head_dim=d_model // self.num_heads,
            dropout=self.attn_dropout,
            attention_impl=self.attention_impl,
            kernel_init=nn.initializers.xavier_uniform(),
            out_kernel_init=nn.initializers.xavier_uniform(),
            name="attn",
            **kw,
        )(h, is_causal=self.causal, deterministic=self.deterministic)
        x = x + nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
        h = layer_norm("ln_2", eps=self.layer_norm_eps, **kw)(x)
        h = MLP(
            self.d_ff,
            activation=self.activation,
            dropout=self.dropout,
            kernel_init=nn.initializers.xavier_uniform(),
            out_kernel_init=nn.initializers.xavier_uniform(),
            name="mlp",
            **kw,
        )(h, deterministic=self.deterministic)
        return x + h  # [batch, tokens, d_model]


class ViT(nn.Module):
    """Vision Transformer classifier / encoder. Presets live in ``PRESETS``.

    ``apply(params, images)`` returns logits ``[batch, num_classes]`` (float32), or the
    pooled representation ``[batch, representation_size or d_model]`` when
    ``num_classes == 0``. ``return_tokens=True`` also returns the final-normed token
    sequence ``[batch, tokens, d_model]`` (class token first when ``pool="token"``);
    ``method="features"`` returns only that sequence.
    """

    num_classes: int = 1000  # 0: no head, return the pooled representation
    image_size: int | tuple[int, int] = 224  # resolution the position table is laid out for
    patch_size: int = 16
    num_channels: int = 3
    num_layers: int = 12
    num_heads: int = 12
    d_model: int = 768
    d_ff: int = 3072
    pool: str = "token"  # "token": class token; "mean": mean of the patch tokens
    representation_size: int | None = None  # hidden tanh layer before the head (pre-training)
    dropout: float = 0.0  # on embeddings and residual branches
    attn_dropout: float = 0.0  # on attention weights
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"
    resize_method: str = "bicubic"  # how positions are resized to another resolution
    head_zero_init: bool = True  # zero-initialise the classifier (the paper's fine-tuning)
    remat_policy: str | None = None  # see common.layers.REMAT_POLICIES; None = no remat
    attention_impl: str | None = None  # see common.attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        positive = ("patch_size", "num_channels", "num_layers", "num_heads", "d_model", "d_ff")
        p = validation.positive_ints(self, *positive)
        p += validation.non_negative_ints(self, "num_classes")
        p += validation.divides(self, "num_heads", "d_model")
        size = _pair(self.image_size)
        if validation.is_positive_int(self.patch_size) and any(
            s <= 0 or s % self.patch_size for s in size
        ):
            p.append(
                f"image_size={self.image_size} is not a positive multiple of "
                f"patch_size={self.patch_size}"
            )
        p += validation.one_of(self, "pool", POOLS)
        p += validation.optional_positive_ints(self, "representation_size")
        p += validation.one_of(self, "activation", sorted(ACTIVATIONS))
        p += validation.one_of(self, "resize_method", RESIZE_METHODS)
        p += validation.one_of(self, "attention_impl", IMPLEMENTATIONS)
        p += validation.one_of(self, "remat_policy", REMAT_POLICIES)
        p += validation.fractions(self, "dropout", "attn_dropout")
        validation.check(self, p)
        super().__post_init__()

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid of the position table (``image_size // patch_size`` per side)."""
        h, w = _pair(self.image_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pool == "token" else 0

    def check_images(self, images: Array) -> tuple[int, int]:
        """Raises ``ValueError`` for a bad image batch; returns its patch grid."""
        h, w = validation.check_images(images.shape, self.num_channels, self.patch_size)
        return h // self.patch_size, w // self.patch_size

    def features(self, images: Array, *, deterministic: bool = True) -> Array:
        """The final-normed tokens ``[batch, tokens, d_model]``."""
        return self(images, deterministic=deterministic, return_tokens=True)[1]

    @nn.compact
    def __call__(
        self, images: Array, *, deterministic: bool = True, return_tokens: bool = False
    ) -> Array | tuple[Array, Array]:
        grid = self.check_images(images)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.d_model
        x = nn.Conv(
            d,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, sh.EMBED)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (sh.EMBED,)),
            name="patch_embed",
            **kw,
        )(images.astype(self.dtype))  # [batch, h/P, w/P, d_model]
        batch = x.shape[0]
        x = x.reshape(batch, -1, d)  # [batch, patches, d_model], row-major over the grid

        prefix = self.num_prefix_tokens
        if prefix:
            cls = self.param(
                "cls",
                nn.with_logical_partitioning(nn.initializers.zeros, (None, None, sh.EMBED)),
                (1, 1, d),
                self.param_dtype,
            )
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, d)), x], 1)
        table_grid = self.grid_size
        pos = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, sh.EMBED)),
            (1, prefix + table_grid[0] * table_grid[1], d),
            self.param_dtype,
        )
        if tuple(grid) != table_grid:
            resized = resize_positions(
                pos[0, prefix:].reshape(*table_grid, d), grid, self.resize_method
            )
            pos = jnp.concatenate([pos[:, :prefix], resized.reshape(1, -1, d)], axis=1)
        x = x + pos.astype(self.dtype)  # [batch, tokens, d_model]
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, sh.ACTIVATIONS)

        block_cls = remat(EncoderBlock, self.remat_policy)
        for i in range(self.num_layers):
            x = block_cls(
                num_heads=self.num_heads,
                d_ff=self.d_ff,
                dropout=self.dropout,
                attn_dropout=self.attn_dropout,
                layer_norm_eps=self.layer_norm_eps,
                activation=self.activation,
                deterministic=deterministic,
                attention_impl=self.attention_impl,
                name=f"block_{i}",
                **kw,
            )(x)
            x = nn.with_logical_constraint(x, sh.ACTIVATIONS)
        tokens = layer_norm("norm", eps=self.layer_norm_eps, **kw)(x)  # [batch, tokens, d]

        if self.pool == "token":
            pooled = tokens[:, 0]  # [batch, d_model]
        else:
            pooled = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(self.dtype)
        if self.representation_size is not None:
            pooled = dense(self.representation_size, (sh.EMBED, sh.MLP), name="pre_logits", **kw)(
                pooled
            )
            pooled = jnp.tanh(pooled)  # [batch, representation_size]
        out = pooled
        if self.num_classes:
            head_init = (
                nn.initializers.zeros if self.head_zero_init else nn.initializers.normal(0.02)
            )
            in_axis = sh.MLP if self.representation_size is not None else sh.EMBED
            out = dense(
                self.num_classes, (in_axis, None), name="head", kernel_init=head_init, **kw
            )(pooled)
        out = out.astype(jnp.float32)  # [batch, num_classes] (or the pooled representation)
        return (out, tokens) if return_tokens else out


# One table for the family: table 1 of the paper (B, L, H) and DeiT (Ti, S); all at 224 with
# the 1000-class ImageNet head, as the papers count them.
_IMAGENET = dict(num_classes=1000, image_size=224)
PRESETS: dict[str, dict[str, Any]] = {
    "vit-ti/16": dict(
        **_IMAGENET, patch_size=16, num_layers=12, num_heads=3, d_model=192, d_ff=768
    ),
    "vit-s/16": dict(
        **_IMAGENET, patch_size=16, num_layers=12, num_heads=6, d_model=384, d_ff=1536
    ),
    "vit-b/16": dict(
        **_IMAGENET, patch_size=16, num_layers=12, num_heads=12, d_model=768, d_ff=3072
    ),
    "vit-b/32": dict(
        **_IMAGENET, patch_size=32, num_layers=12, num_heads=12, d_model=768, d_ff=3072
    ),
    "vit-l/16": dict(
        **_IMAGENET, patch_size=16, num_layers=24, num_heads=16, d_model=1024, d_ff=4096
    ),
    "vit-h/14": dict(
        **_IMAGENET, patch_size=14, num_layers=32, num_heads=16, d_model=1280, d_ff=5120
    ),
    # Toy size for tests ("tiny" would collide with the paper's ViT-Ti).
    "vit-toy": dict(
        num_classes=10, image_size=32, patch_size=8, num_layers=2, num_heads=4, d_model=48, d_ff=96
    ),
}


def from_preset(name: str, **overrides: Any) -> ViT:
    """``ViT`` built from a named preset, with field overrides (unknown fields fail)."""
    return presets.build(ViT, PRESETS, name, **overrides)


def example_images(model: ViT, batch: int = 1) -> jax.ShapeDtypeStruct:
    """Abstract input at the model's ``image_size`` (for ``init`` / ``eval_shape`` / FLOPs)."""
    h, w = _pair(model.image_size)
    return jax.ShapeDtypeStruct((batch, h, w, model.num_channels), jnp.float32)

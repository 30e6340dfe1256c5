"""SAM's prompt encoder: sparse prompts (points, boxes) to tokens, dense prompts (masks) to a grid.

Kirillov et al. 2023, section 3 and appendix A ("Prompt encoder"):

* a point or box corner ``(x, y)`` (pixels in the padded input frame, shifted by half a
  pixel to the pixel centre) is normalised to ``[0, 1]^2``, mapped to ``[-1, 1]^2`` and
  encoded with random Fourier features (Tancik et al. 2020): ``[sin(2 pi c G), cos(2 pi c
  G)]`` with a fixed Gaussian matrix ``G`` ``[2, dim / 2]``. ``G`` is a buffer, not a
  parameter: it lives in the ``"buffers"`` collection, so it is neither counted nor trained;
* a learned type embedding is added: foreground point, background point, top-left corner,
  bottom-right corner. Label ``-1`` marks a padding point: its encoding is replaced by the
  learned "not a point" embedding. Without a box, one padding point is appended (the
  reference does this so the decoder always sees at least one non-box token);
* a dense mask prompt (low-resolution logits at 4x the embedding grid) goes through two
  2x2 stride-2 convolutions (LayerNorm over channels and GELU after each) and a 1x1
  convolution to ``dim`` channels; without one, the learned "no mask" embedding is tiled;
* ``dense_pe`` encodes the centres of the embedding grid's cells the same way, for the
  decoder's image positions.

Layouts: points ``[b, n, 2]`` (x, y), labels ``[b, n]``, boxes ``[b, 4]`` (x0, y0, x1, y1),
masks ``[b, 4h, 4w]``; sparse embeddings ``[b, tokens, dim]``, dense ``[b, h, w, dim]``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

BACKGROUND, FOREGROUND, PADDING = 0, 1, -1  # point labels


class PromptEncoder(nn.Module):
    """Points, boxes and masks -> ``(sparse [b, tokens, dim], dense [b, h, w, dim])``."""

    embed_dim: int = 256
    image_embedding_size: tuple[int, int] = (64, 64)  # the image embedding's grid (h, w)
    input_image_size: tuple[int, int] = (1024, 1024)  # the padded input frame (H, W)
    mask_in_chans: int = 16  # hidden channels of the mask convolutions
    layer_norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        d, c = self.embed_dim, self.mask_in_chans
        if d % 2:
            raise ValueError(f"prompt embed_dim={d} must be even (sin and cos halves)")
        if c % 4 or c <= 0:
            raise ValueError(f"mask_in_chans={c} must be a positive multiple of 4")
        emb = nn.initializers.normal(1.0)  # torch nn.Embedding's N(0, 1)
        self.point_embeddings = self.param("point_embeddings", emb, (4, d), self.param_dtype)
        self.not_a_point_embed = self.param("not_a_point_embed", emb, (d,), self.param_dtype)
        self.no_mask_embed = self.param("no_mask_embed", emb, (d,), self.param_dtype)
        self.gaussian_matrix = self.variable(
            "buffers",
            "gaussian_matrix",
            lambda: jax.random.normal(self.make_rng("params"), (2, d // 2), jnp.float32),
        )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.mask_conv_0 = nn.Conv(c // 4, (2, 2), strides=(2, 2), padding="VALID", **kw)
        self.mask_ln_0 = nn.LayerNorm(epsilon=self.layer_norm_eps, use_fast_variance=False, **kw)
        self.mask_conv_1 = nn.Conv(c, (2, 2), strides=(2, 2), padding="VALID", **kw)
        self.mask_ln_1 = nn.LayerNorm(epsilon=self.layer_norm_eps, use_fast_variance=False, **kw)
        self.mask_conv_2 = nn.Conv(d, (1, 1), **kw)

    @property
    def mask_input_size(self) -> tuple[int, int]:
        h, w = self.image_embedding_size
        return 4 * h, 4 * w

    def fourier(self, coords: Array) -> Array:
        """Random Fourier features ``[..., dim]`` of coordinates ``[..., 2]`` in ``[0, 1]``."""
        g = self.gaussian_matrix.value.astype(jnp.float32)  # [2, dim/2]
        c = (2.0 * coords.astype(jnp.float32) - 1.0) @ g  # [..., dim/2]
        c = 2.0 * math.pi * c
        return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)  # [..., dim]

    def _pixels_to_unit(self, coords: Array) -> Array:
        """Pixel ``(x, y)`` in the input frame, shifted to pixel centres, as ``[0, 1]``."""
        h, w = self.input_image_size
        coords = coords.astype(jnp.float32) + 0.5
        return coords / jnp.asarray([w, h], jnp.float32)  # [..., 2]

    def dense_pe(self) -> Array:
        """Encoding of the embedding grid's cell centres, ``[h, w, dim]``."""
        h, w = self.image_embedding_size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        xy = jnp.stack(jnp.meshgrid(x, y, indexing="xy"), axis=-1)  # [h, w, 2] as (x, y)
        return self.fourier(xy).astype(self.dtype)

    def embed_points(self, points: Array, labels: Array, pad: bool) -> Array:
        """``[b, n, 2]`` pixels and ``[b, n]`` labels -> ``[b, n (+1 if pad), dim]``."""
        if pad:
            b = points.shape[0]
            points = jnp.concatenate([points, jnp.zeros((b, 1, 2), points.dtype)], axis=1)
            labels = jnp.concatenate([labels, jnp.full((b, 1), PADDING, labels.dtype)], axis=1)
        pe = self.fourier(self._pixels_to_unit(points))  # [b, n, dim]
        lab = labels[..., None]
        types = self.point_embeddings.astype(jnp.float32)
        pe = jnp.where(lab == PADDING, self.not_a_point_embed.astype(jnp.float32), pe)
        pe = jnp.where(lab == BACKGROUND, pe + types[0], pe)
        pe = jnp.where(lab == FOREGROUND, pe + types[1], pe)
        return pe.astype(self.dtype)  # [b, n, dim]

    def embed_boxes(self, boxes: Array) -> Array:
        """``[b, 4]`` (x0, y0, x1, y1) -> two corner tokens ``[b, 2, dim]``."""
        corners = boxes.reshape(-1, 2, 2)  # [b, 2 corners, (x, y)]
        pe = self.fourier(self._pixels_to_unit(corners))  # [b, 2, dim]
        pe = pe + self.point_embeddings[2:4].astype(jnp.float32)
        return pe.astype(self.dtype)

    def embed_masks(self, masks: Array) -> Array:
        """Low-resolution mask logits ``[b, 4h, 4w]`` -> ``[b, h, w, dim]``."""
        if tuple(masks.shape[1:]) != self.mask_input_size:
            raise ValueError(
                f"mask prompt must be [batch, {self.mask_input_size[0]}, "
                f"{self.mask_input_size[1]}] (4x the image embedding grid), got {masks.shape}"
            )
        gelu = lambda t: jax.nn.gelu(t, approximate=False)
        x = masks[..., None].astype(self.dtype)  # [b, 4h, 4w, 1]
        x = gelu(self.mask_ln_0(self.mask_conv_0(x)))  # [b, 2h, 2w, c/4]
        x = gelu(self.mask_ln_1(self.mask_conv_1(x)))  # [b, h, w, c]
        return self.mask_conv_2(x)  # [b, h, w, dim]

    def __call__(
        self,
        points: Array | None = None,
        labels: Array | None = None,
        boxes: Array | None = None,
        masks: Array | None = None,
    ) -> tuple[Array, Array]:
        """Sparse tokens (points, then box corners) and the dense embedding."""
        if (points is None) != (labels is None):
            raise ValueError("point prompts need both points [b, n, 2] and labels [b, n]")
        batch = next((t.shape[0] for t in (points, boxes, masks) if t is not None), 1)
        sparse = [jnp.zeros((batch, 0, self.embed_dim), self.dtype)]
        if points is not None:
            sparse.append(self.embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        sparse = jnp.concatenate(sparse, axis=1)  # [b, tokens, dim]
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = jnp.broadcast_to(
                self.no_mask_embed.astype(self.dtype), (batch, h, w, self.embed_dim)
            )
        return sparse, dense  # [b, tokens, dim], [b, h, w, dim]

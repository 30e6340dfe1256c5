"""SAM's mask decoder: a two-way transformer, upscaling, hypernetwork heads, IoU head.

Kirillov et al. 2023, section 3 and appendix A ("Lightweight mask decoder"), figure 14:

* learned output tokens (one IoU token, ``1 + 3`` mask tokens: one for unambiguous prompts,
  three for the multimask output) are prepended to the prompt tokens;
* each of the two decoder layers runs (1) self-attention over the tokens, (2) cross-attention
  from tokens to the image embedding, (3) an MLP on the tokens, (4) cross-attention from
  the image embedding to the tokens, each followed by a residual and a LayerNorm (post-LN).
  Positional encodings are re-added to queries and keys at every attention; the tokens'
  "positions" are their own initial embeddings. The first layer's self-attention skips the
  positions and its residual (it replaces the tokens). Cross-attentions project to half the
  width (``attention_downsample_rate = 2``);
* a final token-to-image attention and LayerNorm;
* the updated image embedding is upscaled 4x with two 2x2 stride-2 transposed convolutions
  (LayerNorm over channels and GELU between, GELU after) to ``dim / 8`` channels; each mask
  token goes through its own 3-layer MLP (the hypernetwork) to ``dim / 8`` weights, and a
  mask is the dot product of those weights with every upscaled pixel;
* a 3-layer MLP on the IoU token predicts each mask's IoU with the object.

``multimask_output=True`` returns the three ambiguity-aware masks, ``False`` the first.
Layouts are channels-last: image embedding ``[b, h, w, dim]``; masks ``[b, masks, 4h, 4w]``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.attention import dot_product_attention

Array = jax.Array


def _dense(features: int, name: str, kw: dict) -> nn.Dense:
    return nn.Dense(features, name=name, **kw)


class DownsampledAttention(nn.Module):
    """Multi-head attention whose q/k/v projections map ``dim`` to ``dim / downsample_rate``.

    Separate q, k, v projections (queries and keys come from different streams), then the
    output projection back to ``dim``. Inputs ``[b, n, dim]``.
    """

    num_heads: int
    downsample_rate: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q: Array, k: Array, v: Array) -> Array:
        d = q.shape[-1]
        inner = d // self.downsample_rate
        if inner % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide the width {inner}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads = lambda t: t.reshape(*t.shape[:2], self.num_heads, -1)  # [b, n, heads, dh]
        q = heads(_dense(inner, "q", kw)(q))
        k = heads(_dense(inner, "k", kw)(k))
        v = heads(_dense(inner, "v", kw)(v))
        out = dot_product_attention(q, k, v)  # [b, n_q, heads, dh]
        return _dense(d, "out", kw)(out.reshape(*out.shape[:2], inner))  # [b, n_q, dim]


class TwoWayBlock(nn.Module):
    """One decoder layer: token self-attn, token->image, token MLP, image->token (post-LN)."""

    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    skip_first_pe: bool = False  # the first layer: self-attention without positions or residual
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, queries: Array, keys: Array, query_pe: Array, key_pe: Array
    ) -> tuple[Array, Array]:
        # queries: [b, tokens, dim]; keys: [b, h*w, dim]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(
            epsilon=self.layer_norm_eps, use_fast_variance=False, name=name, **kw
        )
        attn = lambda rate, name: DownsampledAttention(self.num_heads, rate, name=name, **kw)
        if self.skip_first_pe:
            queries = attn(1, "self_attn")(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + attn(1, "self_attn")(q, q, queries)
        queries = ln("ln_1")(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = ln("ln_2")(queries + attn(self.downsample_rate, "token_to_image")(q, k, keys))
        h = nn.relu(_dense(self.mlp_dim, "mlp_fc", kw)(queries))  # [b, tokens, mlp_dim]
        queries = ln("ln_3")(queries + _dense(queries.shape[-1], "mlp_proj", kw)(h))
        q, k = queries + query_pe, keys + key_pe
        keys = ln("ln_4")(keys + attn(self.downsample_rate, "image_to_token")(k, q, queries))
        return queries, keys


class HeadMLP(nn.Module):
    """``num_layers`` Dense layers with ReLU between (the hypernetwork and IoU heads)."""

    hidden: int
    out: int
    num_layers: int = 3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = _dense(self.out if last else self.hidden, f"layer_{i}", kw)(x)
            x = x if last else nn.relu(x)
        return x


class Upsample2x(nn.Module):
    """A 2x2 stride-2 transposed convolution: each pixel becomes a 2x2 block.

    ``out[2i + a, 2j + b] = x[i, j] @ kernel[a, b] + bias``; the kernel is ``[2, 2, in,
    out]`` (torch's ``ConvTranspose2d`` weight ``[in, out, 2, 2]`` transposed).
    """

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [b, h, w, c]
        c = x.shape[-1]
        bound = 1.0 / math.sqrt(self.features * 4)  # torch's fan-in of a transposed conv
        init = nn.initializers.uniform(2 * bound)
        kernel = self.param(
            "kernel", lambda *a: init(*a) - bound, (2, 2, c, self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.einsum("nhwc,pqco->nhpwqo", x, kernel)  # [b, h, 2, w, 2, out]
        b, h, _, w, _, o = y.shape
        return y.reshape(b, 2 * h, 2 * w, o) + bias  # [b, 2h, 2w, out]


class MaskDecoder(nn.Module):
    """Image embedding + prompt embeddings -> mask logits ``[b, m, 4h, 4w]`` and IoU ``[b, m]``."""

    transformer_dim: int = 256
    num_layers: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    layer_norm_eps: float = 1e-5  # the two-way layers' LayerNorms (HF's SamModel: 1e-6)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    @nn.compact
    def __call__(
        self,
        image_embeddings: Array,
        image_pe: Array,
        sparse: Array,
        dense: Array,
        multimask_output: bool = True,
    ) -> tuple[Array, Array]:
        """``image_embeddings`` ``[1 or b, h, w, dim]`` (one image shared by ``b`` prompts, or one
        image per prompt); ``image_pe`` ``[h, w, dim]``; ``sparse`` ``[b, tokens, dim]``;
        ``dense`` ``[b, h, w, dim]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, m = self.transformer_dim, self.num_mask_tokens
        b = sparse.shape[0]
        if image_embeddings.shape[0] not in (1, b):
            raise ValueError(
                f"image embeddings batch {image_embeddings.shape[0]} must be 1 or the prompt "
                f"batch {b}"
            )
        emb = nn.initializers.normal(1.0)
        iou_token = self.param("iou_token", emb, (1, d), self.param_dtype)
        mask_tokens = self.param("mask_tokens", emb, (m, d), self.param_dtype)
        out_tokens = jnp.concatenate([iou_token, mask_tokens], 0).astype(self.dtype)  # [1+m, d]
        tokens = jnp.concatenate(
            [jnp.broadcast_to(out_tokens, (b, 1 + m, d)), sparse.astype(self.dtype)], axis=1
        )  # [b, 1 + m + prompts, d]
        src = image_embeddings.astype(self.dtype) + dense.astype(self.dtype)  # [b, h, w, d]
        _, h, w, _ = src.shape
        keys = src.reshape(b, h * w, d)  # [b, h*w, d]
        key_pe = jnp.broadcast_to(image_pe.astype(self.dtype).reshape(1, h * w, d), keys.shape)

        queries = tokens
        for i in range(self.num_layers):
            queries, keys = TwoWayBlock(
                self.num_heads,
                self.mlp_dim,
                self.attention_downsample_rate,
                skip_first_pe=i == 0,
                layer_norm_eps=self.layer_norm_eps,
                name=f"layer_{i}",
                **kw,
            )(queries, keys, tokens, key_pe)
        final = DownsampledAttention(
            self.num_heads, self.attention_downsample_rate, name="final_attn", **kw
        )
        queries = queries + final(queries + tokens, keys + key_pe, keys)
        queries = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="final_ln", **kw)(
            queries
        )  # [b, tokens, d]
        iou_out = queries[:, 0]  # [b, d]
        mask_out = queries[:, 1 : 1 + m]  # [b, m, d]

        gelu = lambda t: jax.nn.gelu(t, approximate=False)
        x = keys.reshape(b, h, w, d)
        x = Upsample2x(d // 4, name="upscale_0", **kw)(x)  # [b, 2h, 2w, d/4]
        x = gelu(nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name="upscale_ln", **kw)(x))
        x = gelu(Upsample2x(d // 8, name="upscale_1", **kw)(x))  # [b, 4h, 4w, d/8]
        hyper = jnp.stack(
            [HeadMLP(d, d // 8, 3, name=f"hypernet_{i}", **kw)(mask_out[:, i]) for i in range(m)],
            axis=1,
        )  # [b, m, d/8]
        masks = jnp.einsum("bmc,bhwc->bmhw", hyper, x)  # [b, m, 4h, 4w]
        iou = HeadMLP(self.iou_head_hidden_dim, m, self.iou_head_depth, name="iou_head", **kw)(
            iou_out
        )  # [b, m]
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel].astype(jnp.float32), iou[:, sel].astype(jnp.float32)

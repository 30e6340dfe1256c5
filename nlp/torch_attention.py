"""``torch.nn`` attention and Transformer layers with PyTorch's exact semantics, in Flax.

For researchers porting code between the two frameworks: ``TorchMultiheadAttention``,
``TorchTransformerEncoderLayer``, ``TorchTransformerDecoderLayer``, the stacks
``TorchTransformerEncoder`` / ``TorchTransformerDecoder`` and ``TorchTransformer`` take the
same constructor arguments and call arguments as ``torch.nn.MultiheadAttention``,
``TransformerEncoderLayer``, ``TransformerDecoderLayer``, ``TransformerEncoder``,
``TransformerDecoder`` and ``Transformer`` (torch 2.x), and the ``params_from_torch_*``
converters load their state dicts. Parity in eval mode is tested to 1e-5 in float32
(``tests/nlp/test_torch_attention.py``).

The semantics kept from torch:

* ``embed_dim`` is the total width over heads; ``head_dim = embed_dim // num_heads``, so more
  heads add no parameters. ``kdim`` / ``vdim`` are the input widths of keys and values. When
  ``kdim == vdim == embed_dim`` the q|k|v input projection is one packed parameter (torch's
  ``in_proj_weight``), otherwise three (``q_proj_weight`` / ``k_proj_weight`` /
  ``v_proj_weight``), exactly as torch stores them.
* Sequence-first ``[len, batch, dim]`` unless ``batch_first=True``; unbatched ``[len, dim]``
  inputs work too.
* ``key_padding_mask`` ``[batch, S]``: bool (True = ignore that key) or float (added to the
  scores). ``attn_mask`` ``[L, S]`` or ``[batch * num_heads, L, S]`` (batch-major, as torch):
  bool (True = NOT allowed) or float (added). Bool and float masks may be mixed.
* ``need_weights`` returns the attention weights (after dropout, as torch), averaged over
  heads (``[batch, L, S]``) or per head (``[batch, heads, L, S]``) when
  ``average_attn_weights=False``.
* ``add_bias_kv`` and ``add_zero_attn`` append a learned / zero key-value position.
* Layers: post-LN ``LN(x + dropout(sublayer(x)))`` or ``norm_first=True``
  (``x + dropout(sublayer(LN(x)))``); the feed-forward is linear -> activation -> dropout ->
  linear -> dropout; activation ``"relu"`` or ``"gelu"`` (exact erf GELU, as ``F.gelu``).
* Parameter initialisation follows torch's distributions (xavier-uniform q/k/v, zero
  projection biases, ``nn.Linear``'s kaiming-uniform elsewhere; ``TorchTransformer``
  re-initialises every matrix xavier-uniform as ``nn.Transformer._reset_parameters`` does).
  torch's ``TransformerEncoder`` deep-copies one layer (all layers start identical); here each
  layer draws its own weights.

Deliberate differences:

* A query whose every key is masked by *boolean* masks attends uniformly over them (scores
  set to the float32 minimum); torch returns NaN for that row. Float masks of ``-inf`` still
  give NaN, as in torch.
* ``is_causal=True`` without an ``attn_mask`` builds the causal mask (torch raises); with a
  mask, the mask is used (torch treats ``is_causal`` as a hint that the mask is causal).
* Softmax always runs in float32 and the returned weights are float32; the outputs are in
  ``dtype``. There is no fused fast path (torch's eval fast path and nested tensors are
  implementation details with the same results; ``TransformerEncoder``'s nested-tensor path
  returns zeros at padded positions, here they hold ordinary values).
* ``deterministic`` (keyword) replaces ``module.train()`` / ``eval()``; dropout draws from the
  ``"dropout"`` rng stream.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import convert, validation
from common import sharding as sh
from common.layers import activation, flat_dot_general, layer_norm

Array = jax.Array
Init = Callable[..., Any]
TORCH_ACTIVATIONS = ("relu", "gelu")


# --------------------------------------------------------------------------- helpers


def square_subsequent_mask(size: int, dtype: Any = jnp.float32) -> Array:
    """``[size, size]`` float mask, ``-inf`` above the diagonal (torch's
    ``nn.Transformer.generate_square_subsequent_mask``)."""
    return jnp.triu(jnp.full((size, size), -jnp.inf, dtype), k=1)


def _torch_linear_init(fan_in: int) -> Init:
    """``nn.Linear``'s default: kaiming-uniform(a=sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    the same bound for the weight and the bias."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _xavier_2d(key, shape, dtype=jnp.float32):
    """xavier-uniform of the 2-D ``[in, out]`` kernel (torch's xavier_uniform_ on ``[out, in]``)."""
    return nn.initializers.xavier_uniform()(key, shape, dtype)


def _check_mask_dtype(mask: Any, name: str) -> Array:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_ and not jnp.issubdtype(mask.dtype, jnp.floating):
        raise ValueError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    return mask


# --------------------------------------------------------------------------- attention


class TorchMultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` (see the module docstring for the semantics).

    Params: ``in_proj/{kernel [E, 3E], bias [3E]}`` when packed, else
    ``{q,k,v}_proj/{kernel [E|kdim|vdim, E], bias [E]}``; ``out_proj/{kernel, bias}``;
    ``bias_k`` / ``bias_v`` ``[1, 1, E]`` with ``add_bias_kv``.
    """

    embed_dim: int  # total width over heads (torch's embed_dim)
    num_heads: int
    dropout: float = 0.0  # on the attention weights
    bias: bool = True  # biases of the input and output projections
    add_bias_kv: bool = False  # append a learned key/value position (bias_k, bias_v)
    add_zero_attn: bool = False  # append an all-zero key/value position
    kdim: int | None = None  # width of the key inputs (None: embed_dim)
    vdim: int | None = None  # width of the value inputs (None: embed_dim)
    batch_first: bool = False  # [batch, len, dim] instead of torch's default [len, batch, dim]
    out_kernel_init: Init | None = None  # None: nn.Linear's default, as torch
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        problems = validation.positive_ints(self, "embed_dim", "num_heads")
        problems += validation.divides(self, "num_heads", "embed_dim")
        problems += validation.optional_positive_ints(self, "kdim", "vdim")
        problems += validation.fractions(self, "dropout")
        validation.check(self, problems)
        super().__post_init__()

    @property
    def key_dim(self) -> int:
        return self.embed_dim if self.kdim is None else self.kdim

    @property
    def value_dim(self) -> int:
        return self.embed_dim if self.vdim is None else self.vdim

    @property
    def packed(self) -> bool:
        """True when torch stores one ``in_proj_weight`` (kdim == vdim == embed_dim)."""
        return self.key_dim == self.embed_dim and self.value_dim == self.embed_dim

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def _masks(self, key_padding_mask, attn_mask, is_causal, batched, n, l, s):
        """(allowed bool, bias float), each None or broadcastable to ``[n, h, l, s]``."""
        allowed, bias = None, None

        def add(mask):
            nonlocal allowed, bias
            if mask.dtype == jnp.bool_:
                allowed = ~mask if allowed is None else allowed & ~mask
            else:
                m = mask.astype(jnp.float32)
                bias = m if bias is None else bias + m

        if key_padding_mask is not None:
            kpm = _check_mask_dtype(key_padding_mask, "key_padding_mask")
            want = (n, s) if batched else (s,)
            if kpm.shape != want:
                raise ValueError(
                    f"key_padding_mask has shape {kpm.shape}, expected {want} "
                    "([batch, source length], or [source length] for unbatched inputs)"
                )
            add(kpm.reshape(n, 1, 1, s))
        if attn_mask is not None:
            am = _check_mask_dtype(attn_mask, "attn_mask")
            h = self.num_heads
            if am.ndim == 2:
                if am.shape != (l, s):
                    raise ValueError(f"the 2-D attn_mask has shape {am.shape}, expected {(l, s)}")
                add(am[None, None])
            elif am.ndim == 3:
                want = (n * h, l, s) if batched else (h, l, s)
                if am.shape != want:
                    raise ValueError(
                        f"the 3-D attn_mask has shape {am.shape}, expected {want} "
                        "([batch * num_heads, L, S], batch-major as torch)"
                    )
                add(am.reshape(n, h, l, s))
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {am.ndim}-D")
        elif is_causal:
            add(jnp.triu(jnp.ones((l, s), jnp.bool_), k=1)[None, None])
        return allowed, bias

    @nn.compact
    def __call__(
        self,
        query: Array,  # [L, N, E] ([N, L, E] if batch_first; [L, E] unbatched)
        key: Array | None = None,  # [S, N, kdim]; None: the query (self-attention)
        value: Array | None = None,  # [S, N, vdim]; None: the key
        key_padding_mask: Array | None = None,  # [N, S] bool (True = ignore) or float
        need_weights: bool = True,
        attn_mask: Array | None = None,  # [L, S] or [N * heads, L, S]; bool True = blocked
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        deterministic: bool = True,
    ) -> tuple[Array, Array | None]:
        """``(output [L, N, E] in query's layout, weights or None)`` as torch's ``forward``."""
        key = query if key is None else key
        value = key if value is None else value
        self_attention = key is query and value is query
        E, h, d = self.embed_dim, self.num_heads, self.head_dim
        if query.ndim not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D, got shape {query.shape}")
        if key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(
                f"query, key and value must have the same rank; got shapes {query.shape}, "
                f"{key.shape}, {value.shape}"
            )
        batched = query.ndim == 3

        def batch_major(x):  # -> [N, len, dim]
            if not batched:
                return x[None]
            return x if self.batch_first else jnp.swapaxes(x, 0, 1)

        q_in, k_in, v_in = batch_major(query), batch_major(key), batch_major(value)
        for name, x, want in (
            ("query", q_in, E),
            ("key", k_in, self.key_dim),
            ("value", v_in, self.value_dim),
        ):
            if x.shape[-1] != want:
                what = "embed_dim" if name == "query" else ("kdim" if name == "key" else "vdim")
                raise ValueError(
                    f"{name} has width {x.shape[-1]}, but the module has {what}={want}"
                )
        if k_in.shape[:2] != v_in.shape[:2]:
            raise ValueError(
                f"key and value must have the same batch size and length; got {key.shape} and "
                f"{value.shape}"
            )
        if q_in.shape[0] != k_in.shape[0]:
            raise ValueError(f"query and key batch sizes differ: {query.shape} vs {key.shape}")
        n, l, s = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        allowed, bias = self._masks(key_padding_mask, attn_mask, is_causal, batched, n, l, s)

        # Input projections, each [N, len, E].
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.packed:
            proj = _PackedInProjection(E, use_bias=self.bias, name="in_proj", **kw)
            if self_attention:
                q, k, v = jnp.split(proj(q_in, 0, 3), 3, axis=-1)
            else:
                q = proj(q_in, 0, 1)
                if key is value:
                    k, v = jnp.split(proj(k_in, 1, 3), 2, axis=-1)
                else:
                    k, v = proj(k_in, 1, 2), proj(v_in, 2, 3)
        else:

            def linear(name, axes):
                return nn.Dense(
                    E,
                    use_bias=self.bias,
                    dot_general=flat_dot_general,
                    kernel_init=nn.with_logical_partitioning(_xavier_2d, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                    name=name,
                    **kw,
                )

            q = linear("q_proj", (sh.EMBED, sh.HEADS))(q_in)
            k = linear("k_proj", (None, sh.HEADS))(k_in)
            v = linear("v_proj", (None, sh.HEADS))(v_in)

        def pad_masks(allowed, bias):  # one more key position, allowed and unbiased
            if allowed is not None:
                allowed = jnp.broadcast_to(allowed, allowed.shape[:-1] + (s,))
                allowed = jnp.pad(allowed, [(0, 0)] * 3 + [(0, 1)], constant_values=True)
            if bias is not None:
                bias = jnp.broadcast_to(bias, bias.shape[:-1] + (s,))
                bias = jnp.pad(bias, [(0, 0)] * 3 + [(0, 1)])
            return allowed, bias

        if self.add_bias_kv:
            # torch's xavier_normal_ on [1, 1, E]: fan_in = size(1) * E, fan_out = size(0) * E,
            # so std = sqrt(2 / (E + E)) = sqrt(1 / E); an untruncated normal, as torch draws.
            xavier_normal = nn.initializers.variance_scaling(
                1.0, "fan_avg", "normal", in_axis=1, out_axis=0
            )
            init = nn.with_logical_partitioning(xavier_normal, (None, None, sh.HEADS))
            bias_k = self.param("bias_k", init, (1, 1, E), self.param_dtype)
            bias_v = self.param("bias_v", init, (1, 1, E), self.param_dtype)
            k = jnp.concatenate([k, jnp.broadcast_to(bias_k, (n, 1, E)).astype(k.dtype)], axis=1)
            v = jnp.concatenate([v, jnp.broadcast_to(bias_v, (n, 1, E)).astype(v.dtype)], axis=1)
            allowed, bias = pad_masks(allowed, bias)
            s += 1
        q = q.reshape(n, l, h, d)  # [N, L, heads, head_dim]
        k = k.reshape(n, s, h, d)  # [N, S, heads, head_dim]
        v = v.reshape(n, s, h, d)
        if self.add_zero_attn:
            k = jnp.concatenate([k, jnp.zeros((n, 1, h, d), k.dtype)], axis=1)
            v = jnp.concatenate([v, jnp.zeros((n, 1, h, d), v.dtype)], axis=1)
            allowed, bias = pad_masks(allowed, bias)
            s += 1

        q = q * jnp.asarray(math.sqrt(1.0 / d), q.dtype)  # torch scales q before q @ k^T
        scores = jnp.einsum("nlhd,nshd->nhls", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            scores = scores + bias  # [N, heads, L, S]
        if allowed is not None:
            scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1)  # float32 [N, heads, L, S]
        weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("nhls,nshd->nlhd", weights.astype(v.dtype), v).reshape(n, l, E)
        out_init = self.out_kernel_init or _torch_linear_init(E)
        out = nn.Dense(
            E,
            use_bias=self.bias,
            dot_general=flat_dot_general,
            kernel_init=nn.with_logical_partitioning(out_init, (sh.HEADS, sh.EMBED)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (sh.EMBED,)),
            name="out_proj",
            **kw,
        )(out)  # [N, L, E]

        if not batched:
            out = out[0]
        elif not self.batch_first:
            out = jnp.swapaxes(out, 0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(axis=1)  # [N, L, S]
        return out, (weights if batched else weights[0])


class _PackedInProjection(nn.Module):
    """torch's packed ``in_proj_weight`` as one ``[E, 3E]`` kernel (q | k | v on the output axis);
    ``__call__(x, start, stop)`` applies the parts ``start:stop`` only."""

    embed_dim: int
    use_bias: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, start: int, stop: int) -> Array:
        E = self.embed_dim
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_xavier_2d, (sh.EMBED, sh.HEADS)),
            (E, 3 * E),
            self.param_dtype,
        )
        kernel = jnp.asarray(kernel)[:, start * E : stop * E].astype(self.dtype)
        y = flat_dot_general(
            x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ()))
        )  # [..., parts*E]
        if self.use_bias:
            b = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (sh.HEADS,)),
                (3 * E,),
                self.param_dtype,
            )
            y = y + jnp.asarray(b)[start * E : stop * E].astype(self.dtype)
        return y


# --------------------------------------------------------------------------- layers


class _LayerParts(nn.Module):
    """Fields and parts shared by the encoder and decoder layers (not used on its own)."""

    d_model: int = 512
    nhead: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"  # "relu" | "gelu" (exact erf GELU, torch's F.gelu)
    layer_norm_eps: float = 1e-5
    batch_first: bool = False
    norm_first: bool = False  # pre-LN instead of torch's default post-LN
    bias: bool = True  # biases of every linear and LayerNorm
    xavier_init: bool = False  # every matrix xavier-uniform (what nn.Transformer does)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _validate(self, what: str, extra: tuple[str, ...] = ()) -> None:
        problems = _layer_problems(self) + validation.positive_ints(self, *extra)
        validation.check(self, problems, what)

    def _attention(self, name: str) -> TorchMultiheadAttention:
        return _layer_attention(self, name=name)

    def _linear(self, features: int, fan_in: int, axes, name: str) -> nn.Dense:
        init = _torch_linear_init(fan_in)
        return nn.Dense(
            features,
            use_bias=self.bias,
            dot_general=flat_dot_general,
            kernel_init=nn.with_logical_partitioning(
                _xavier_2d if self.xavier_init else init, axes
            ),
            bias_init=nn.with_logical_partitioning(init, axes[1:]),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _norm(self, name: str) -> nn.LayerNorm:
        return _torch_layer_norm(self, name)

    def _feed_forward(self, x: Array, deterministic: bool) -> Array:
        """linear1 -> activation -> dropout -> linear2 -> dropout (torch's ``_ff_block``)."""
        x = self._linear(self.dim_feedforward, self.d_model, (sh.EMBED, sh.MLP), "linear1")(x)
        x = activation(self.activation)(x)  # [.., dim_feedforward]
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        x = self._linear(self.d_model, self.dim_feedforward, (sh.MLP, sh.EMBED), "linear2")(x)
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


def _layer_problems(m: Any) -> list[str]:
    """Problems with the layer fields of ``m`` (a layer, a stack or ``TorchTransformer``)."""
    problems = validation.positive_ints(m, "d_model", "nhead", "dim_feedforward")
    problems += validation.divides(m, "nhead", "d_model")
    problems += validation.one_of(m, "activation", TORCH_ACTIVATIONS)
    return problems + validation.fractions(m, "dropout")


def _layer_attention(m: Any, **kw: Any) -> TorchMultiheadAttention:
    """The ``TorchMultiheadAttention`` a layer with the fields of ``m`` builds."""
    return TorchMultiheadAttention(
        m.d_model,
        m.nhead,
        dropout=m.dropout,
        bias=m.bias,
        batch_first=m.batch_first,
        out_kernel_init=_xavier_2d if getattr(m, "xavier_init", True) else None,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        **kw,
    )


def _torch_layer_norm(m: Any, name: str) -> nn.LayerNorm:
    """``nn.LayerNorm(d_model, eps, bias=bias)``; statistics in float32."""
    return layer_norm(
        name, eps=m.layer_norm_eps, dtype=m.dtype, param_dtype=m.param_dtype, use_bias=m.bias
    )


class TorchTransformerEncoderLayer(_LayerParts):
    """``torch.nn.TransformerEncoderLayer``: self-attention and feed-forward sub-layers.

    Params: ``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2`` (torch's names).
    """

    def __post_init__(self):
        self._validate("TorchTransformerEncoderLayer")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        src: Array,  # [S, N, d_model] ([N, S, d_model] if batch_first)
        src_mask: Array | None = None,  # [S, S] or [N * nhead, S, S]
        src_key_padding_mask: Array | None = None,  # [N, S]
        is_causal: bool = False,
        *,
        deterministic: bool = True,
    ) -> Array:
        attn = self._attention("self_attn")
        drop1 = nn.Dropout(self.dropout)

        def sa_block(x):
            out, _ = attn(
                x,
                x,
                x,
                key_padding_mask=src_key_padding_mask,
                need_weights=False,
                attn_mask=src_mask,
                is_causal=is_causal,
                deterministic=deterministic,
            )
            return drop1(out, deterministic=deterministic)

        norm1, norm2 = self._norm("norm1"), self._norm("norm2")
        x = src
        if self.norm_first:
            x = x + sa_block(norm1(x))
            x = x + self._feed_forward(norm2(x), deterministic)
        else:
            x = norm1(x + sa_block(x))
            x = norm2(x + self._feed_forward(x, deterministic))
        return x


class TorchTransformerDecoderLayer(_LayerParts):
    """``torch.nn.TransformerDecoderLayer``: self-attention, cross-attention over ``memory``
    and feed-forward sub-layers.

    Params: ``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``, ``norm1..3``.
    """

    def __post_init__(self):
        self._validate("TorchTransformerDecoderLayer")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        tgt: Array,  # [T, N, d_model] ([N, T, d_model] if batch_first)
        memory: Array,  # [S, N, d_model]
        tgt_mask: Array | None = None,  # [T, T] or [N * nhead, T, T]
        memory_mask: Array | None = None,  # [T, S] or [N * nhead, T, S]
        tgt_key_padding_mask: Array | None = None,  # [N, T]
        memory_key_padding_mask: Array | None = None,  # [N, S]
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        deterministic: bool = True,
    ) -> Array:
        self_attn, cross_attn = self._attention("self_attn"), self._attention("multihead_attn")
        drop1, drop2 = nn.Dropout(self.dropout), nn.Dropout(self.dropout)

        def sa_block(x):
            out, _ = self_attn(
                x,
                x,
                x,
                key_padding_mask=tgt_key_padding_mask,
                need_weights=False,
                attn_mask=tgt_mask,
                is_causal=tgt_is_causal,
                deterministic=deterministic,
            )
            return drop1(out, deterministic=deterministic)

        def mha_block(x):
            out, _ = cross_attn(
                x,
                memory,
                memory,
                key_padding_mask=memory_key_padding_mask,
                need_weights=False,
                attn_mask=memory_mask,
                is_causal=memory_is_causal,
                deterministic=deterministic,
            )
            return drop2(out, deterministic=deterministic)

        norm1, norm2, norm3 = self._norm("norm1"), self._norm("norm2"), self._norm("norm3")
        x = tgt
        if self.norm_first:
            x = x + sa_block(norm1(x))
            x = x + mha_block(norm2(x))
            x = x + self._feed_forward(norm3(x), deterministic)
        else:
            x = norm1(x + sa_block(x))
            x = norm2(x + mha_block(x))
            x = norm3(x + self._feed_forward(x, deterministic))
        return x


def _layer_fields(m: Any) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(_LayerParts) if f.name not in ("parent", "name")]
    return {k: getattr(m, k) for k in names}


class TorchTransformerEncoder(_LayerParts):
    """``torch.nn.TransformerEncoder`` of ``num_layers`` encoder layers with these fields, plus
    an optional final LayerNorm (``norm=True``; ``nn.Transformer`` has one).

    Params: ``layers_{i}`` (torch's ``layers.{i}``) and ``norm``.
    """

    num_layers: int = 6
    norm: bool = False  # a final LayerNorm

    def __post_init__(self):
        self._validate("TorchTransformerEncoder", ("num_layers",))
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        src: Array,
        mask: Array | None = None,
        src_key_padding_mask: Array | None = None,
        is_causal: bool = False,
        *,
        deterministic: bool = True,
    ) -> Array:
        x = src
        for i in range(self.num_layers):
            layer = TorchTransformerEncoderLayer(**_layer_fields(self), name=f"layers_{i}")
            x = layer(x, mask, src_key_padding_mask, is_causal, deterministic=deterministic)
        return _torch_layer_norm(self, "norm")(x) if self.norm else x


class TorchTransformerDecoder(_LayerParts):
    """``torch.nn.TransformerDecoder``: ``num_layers`` decoder layers and an optional final
    LayerNorm. Params: ``layers_{i}`` and ``norm``."""

    num_layers: int = 6
    norm: bool = False  # a final LayerNorm

    def __post_init__(self):
        self._validate("TorchTransformerDecoder", ("num_layers",))
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        tgt: Array,
        memory: Array,
        tgt_mask: Array | None = None,
        memory_mask: Array | None = None,
        tgt_key_padding_mask: Array | None = None,
        memory_key_padding_mask: Array | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        deterministic: bool = True,
    ) -> Array:
        x = tgt
        for i in range(self.num_layers):
            layer = TorchTransformerDecoderLayer(**_layer_fields(self), name=f"layers_{i}")
            x = layer(
                x,
                memory,
                tgt_mask,
                memory_mask,
                tgt_key_padding_mask,
                memory_key_padding_mask,
                tgt_is_causal,
                memory_is_causal,
                deterministic=deterministic,
            )
        return _torch_layer_norm(self, "norm")(x) if self.norm else x


class TorchTransformer(nn.Module):
    """``torch.nn.Transformer``: encoder stack + final norm, decoder stack + final norm.

    No embeddings or output layer (as torch). ``encode`` / ``decode`` expose the two halves.
    Params: ``encoder/{layers_i, norm}``, ``decoder/{layers_i, norm}``.
    """

    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"  # "relu" | "gelu"
    layer_norm_eps: float = 1e-5
    batch_first: bool = False
    norm_first: bool = False
    bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        problems = _layer_problems(self)
        problems += validation.positive_ints(self, "num_encoder_layers", "num_decoder_layers")
        validation.check(self, problems)
        super().__post_init__()

    def setup(self):
        kw = dict(
            d_model=self.d_model,
            nhead=self.nhead,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            activation=self.activation,
            layer_norm_eps=self.layer_norm_eps,
            batch_first=self.batch_first,
            norm_first=self.norm_first,
            bias=self.bias,
            xavier_init=True,  # nn.Transformer._reset_parameters
            norm=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder = TorchTransformerEncoder(num_layers=self.num_encoder_layers, **kw)
        self.decoder = TorchTransformerDecoder(num_layers=self.num_decoder_layers, **kw)

    def encode(
        self,
        src,
        src_mask=None,
        src_key_padding_mask=None,
        src_is_causal=False,
        *,
        deterministic: bool = True,
    ) -> Array:
        return self.encoder(
            src, src_mask, src_key_padding_mask, src_is_causal, deterministic=deterministic
        )

    def decode(
        self,
        tgt,
        memory,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        tgt_is_causal=False,
        memory_is_causal=False,
        *,
        deterministic: bool = True,
    ) -> Array:
        return self.decoder(
            tgt,
            memory,
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            tgt_is_causal,
            memory_is_causal,
            deterministic=deterministic,
        )

    def __call__(
        self,
        src: Array,  # [S, N, d_model] ([N, S, d_model] if batch_first)
        tgt: Array,  # [T, N, d_model]
        src_mask: Array | None = None,
        tgt_mask: Array | None = None,
        memory_mask: Array | None = None,
        src_key_padding_mask: Array | None = None,
        tgt_key_padding_mask: Array | None = None,
        memory_key_padding_mask: Array | None = None,
        src_is_causal: bool = False,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        deterministic: bool = True,
    ) -> Array:
        """Decoder output ``[T, N, d_model]`` (torch's ``forward``, same argument order)."""
        batch_axis = 0 if self.batch_first else 1
        if src.ndim == 3 and src.shape[batch_axis] != tgt.shape[batch_axis]:
            raise ValueError(
                f"the batch number of src and tgt must be equal; got {src.shape} and {tgt.shape}"
            )
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise ValueError(
                f"the feature number of src and tgt must be equal to d_model={self.d_model}; "
                f"got {src.shape[-1]} and {tgt.shape[-1]}"
            )
        memory = self.encode(
            src, src_mask, src_key_padding_mask, src_is_causal, deterministic=deterministic
        )
        return self.decode(
            tgt,
            memory,
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            tgt_is_causal,
            memory_is_causal,
            deterministic=deterministic,
        )


# --------------------------------------------------------------------------- converters
#
# Each converter takes a state dict (a mapping of torch tensors / numpy arrays, or a checkpoint
# path; see common.convert.load_state_dict) of the matching torch module, optionally under a
# key ``prefix``, and returns ``{"params": ...}`` for the Flax module. torch's Linear weight is
# [out, in]; our kernels are [in, out]. Keys left unused raise unless they match
# ``allow_unused`` (regular expressions).

Source = str | os.PathLike | Mapping[str, Any]


class _StateDict(convert.StateDict):
    """``convert.StateDict`` that can also report a tensor's shape without using it."""

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)


def _mha_flat(sd: _StateDict, m: TorchMultiheadAttention, p: str) -> dict[str, np.ndarray]:
    """Flat ``{path: array}`` of one MHA from torch keys under prefix ``p``."""
    E, kd, vd = m.embed_dim, m.key_dim, m.value_dim
    has_packed = f"{p}in_proj_weight" in sd
    has_separate = any(f"{p}{n}_proj_weight" in sd for n in "qkv")
    if m.packed and has_separate and not has_packed:
        shapes = {n: sd.shape(f"{p}{n}_proj_weight") for n in "qkv" if f"{p}{n}_proj_weight" in sd}
        raise ValueError(
            f"{sd.what} stores separate q/k/v projections ({p}q/k/v_proj_weight, shapes "
            f"{shapes}): the torch module had kdim/vdim different from embed_dim, but this "
            f"module packs them (kdim == vdim == embed_dim == {E}); set kdim and vdim to the "
            "second dimension of k_proj_weight / v_proj_weight"
        )
    if not m.packed and has_packed:
        raise ValueError(
            f"{sd.what} stores a packed {p}in_proj_weight (the torch module had kdim == vdim == "
            f"embed_dim), but this module has kdim={m.kdim}, vdim={m.vdim}, embed_dim={E}, which "
            "needs separate q/k/v projections"
        )
    # Diagnose bias=False only when the projection weights are there; otherwise (a wrong
    # prefix or state dict) the missing-key error below names the missing weight.
    has_weights = has_packed if m.packed else has_separate
    if m.bias and has_weights and f"{p}in_proj_bias" not in sd:
        raise ValueError(
            f"{sd.what} has no {p}in_proj_bias: the torch module was built with bias=False; "
            "build this one with bias=False too"
        )
    flat: dict[str, np.ndarray] = {}
    if m.packed:
        sd.require([f"{p}in_proj_weight"])
        flat["in_proj/kernel"] = sd.take(f"{p}in_proj_weight", (3 * E, E)).T  # [E, 3E]
        if m.bias:
            flat["in_proj/bias"] = sd.take(f"{p}in_proj_bias", (3 * E,))
    else:
        for n, width, field in (("q", E, "embed_dim"), ("k", kd, "kdim"), ("v", vd, "vdim")):
            key = f"{p}{n}_proj_weight"
            sd.require([key])
            got = sd.shape(key)
            if got != (E, width):
                raise ValueError(
                    f"{sd.what} key {key} has shape {got}, but the module needs {(E, width)} "
                    f"(embed_dim={E}, {field}={width}); the torch module was built with "
                    f"embed_dim={got[0]} and an input width of {got[1] if len(got) > 1 else '?'}"
                )
            flat[f"{n}_proj/kernel"] = sd.take(key).T  # [width, E]
        if m.bias:
            b = sd.take(f"{p}in_proj_bias", (3 * E,))
            flat["q_proj/bias"], flat["k_proj/bias"], flat["v_proj/bias"] = np.split(b, 3)
    out_proj = sd.linear(f"{p}out_proj", E, E, bias=m.bias)
    flat.update({f"out_proj/{k}": v for k, v in out_proj.items()})
    if m.add_bias_kv:
        flat["bias_k"] = sd.take(f"{p}bias_k", (1, 1, E))
        flat["bias_v"] = sd.take(f"{p}bias_v", (1, 1, E))
    return flat


def _layer_flat(sd: _StateDict, m: _LayerParts, p: str, decoder: bool) -> dict:
    d, ff = m.d_model, m.dim_feedforward
    attn = _layer_attention(m, parent=None)  # the config the layer builds (shapes only)
    tree: dict[str, Any] = {
        "self_attn": _mha_flat(sd, attn, f"{p}self_attn."),
        "linear1": sd.linear(f"{p}linear1", d, ff, bias=m.bias),
        "linear2": sd.linear(f"{p}linear2", ff, d, bias=m.bias),
        "norm1": sd.layer_norm(f"{p}norm1", d, bias=m.bias),
        "norm2": sd.layer_norm(f"{p}norm2", d, bias=m.bias),
    }
    if decoder:
        tree["multihead_attn"] = _mha_flat(sd, attn, f"{p}multihead_attn.")
        tree["norm3"] = sd.layer_norm(f"{p}norm3", d, bias=m.bias)
    return convert.flatten(tree)


def _finish(sd, flat, module, example, allow_unused, what) -> dict[str, Any]:
    sd.check_all_used(allow_unused)
    expected = convert.abstract_params(module.init, jax.random.key(0), *example)
    convert.check_params(flat, expected, what=f"params converted from the {what} state dict")
    return {"params": convert.unflatten(convert.cast_like(flat, expected))}


def _state_dict(source: Source, prefix: str, what: str) -> _StateDict:
    sd = convert.load_state_dict(source)
    if prefix:
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return _StateDict(sd, what=what)


def _x(width: int) -> Array:
    return jnp.zeros((1, 1, width), jnp.float32)  # [len 1, batch 1, width] in either layout


def params_from_torch_mha(
    state_dict: Source,
    module: TorchMultiheadAttention,
    *,
    prefix: str = "",
    allow_unused: Iterable[str] = (),
) -> dict[str, Any]:
    """Params for ``module`` from a ``torch.nn.MultiheadAttention`` state dict.

    ``prefix`` selects a sub-module's keys (e.g. ``"encoder.layers.0.self_attn."``); other keys
    are ignored. A packed/separate or kdim/vdim mismatch raises a ``ValueError`` saying which
    widths the torch module had. ``num_heads`` is not stored by torch: it must match by hand.
    """
    sd = _state_dict(state_dict, prefix, "MultiheadAttention state dict")
    flat = _mha_flat(sd, module, "")
    example = (_x(module.embed_dim), _x(module.key_dim), _x(module.value_dim))
    return _finish(sd, flat, module, example, allow_unused, "MultiheadAttention")


def params_from_torch_encoder_layer(
    state_dict: Source,
    module: TorchTransformerEncoderLayer,
    *,
    prefix: str = "",
    allow_unused: Iterable[str] = (),
) -> dict[str, Any]:
    """Params for ``module`` from a ``torch.nn.TransformerEncoderLayer`` state dict."""
    sd = _state_dict(state_dict, prefix, "TransformerEncoderLayer state dict")
    flat = _layer_flat(sd, module, "", decoder=False)
    return _finish(sd, flat, module, (_x(module.d_model),), allow_unused, "encoder layer")


def params_from_torch_decoder_layer(
    state_dict: Source,
    module: TorchTransformerDecoderLayer,
    *,
    prefix: str = "",
    allow_unused: Iterable[str] = (),
) -> dict[str, Any]:
    """Params for ``module`` from a ``torch.nn.TransformerDecoderLayer`` state dict."""
    sd = _state_dict(state_dict, prefix, "TransformerDecoderLayer state dict")
    flat = _layer_flat(sd, module, "", decoder=True)
    example = (_x(module.d_model), _x(module.d_model))
    return _finish(sd, flat, module, example, allow_unused, "decoder layer")


def _stack_flat(sd, m: _LayerParts, num_layers: int, norm: bool, p: str, decoder: bool) -> dict:
    flat = {}
    for i in range(num_layers):
        layer = _layer_flat(sd, m, f"{p}layers.{i}.", decoder)
        flat.update({f"layers_{i}/{k}": v for k, v in layer.items()})
    if norm:
        final_norm = sd.layer_norm(f"{p}norm", m.d_model, bias=m.bias)
        flat.update({f"norm/{k}": v for k, v in final_norm.items()})
    return flat


def params_from_torch_encoder(
    state_dict: Source,
    module: TorchTransformerEncoder,
    *,
    prefix: str = "",
    allow_unused: Iterable[str] = (),
) -> dict[str, Any]:
    """Params for ``module`` from a ``torch.nn.TransformerEncoder`` state dict."""
    sd = _state_dict(state_dict, prefix, "TransformerEncoder state dict")
    flat = _stack_flat(sd, module, module.num_layers, module.norm, "", decoder=False)
    return _finish(sd, flat, module, (_x(module.d_model),), allow_unused, "encoder")


def params_from_torch_decoder(
    state_dict: Source,
    module: TorchTransformerDecoder,
    *,
    prefix: str = "",
    allow_unused: Iterable[str] = (),
) -> dict[str, Any]:
    """Params for ``module`` from a ``torch.nn.TransformerDecoder`` state dict."""
    sd = _state_dict(state_dict, prefix, "TransformerDecoder state dict")
    flat = _stack_flat(sd, module, module.num_layers, module.norm, "", decoder=True)
    example = (_x(module.d_model), _x(module.d_model))
    return _finish(sd, flat, module, example, allow_unused, "decoder")


def params_from_torch_transformer(
    state_dict: Source,
    module: TorchTransformer,
    *,
    prefix: str = "",
    allow_unused: Iterable[str] = (),
) -> dict[str, Any]:
    """Params for ``module`` from a ``torch.nn.Transformer`` state dict."""
    sd = _state_dict(state_dict, prefix, "Transformer state dict")
    flat = {}
    for part, n, decoder in (
        ("encoder", module.num_encoder_layers, False),
        ("decoder", module.num_decoder_layers, True),
    ):
        stack = _stack_flat(sd, module, n, True, f"{part}.", decoder)
        flat.update({f"{part}/{k}": v for k, v in stack.items()})
    example = (_x(module.d_model), _x(module.d_model))
    return _finish(sd, flat, module, example, allow_unused, "Transformer")


__all__ = [
    "TorchMultiheadAttention",
    "TorchTransformer",
    "TorchTransformerDecoder",
    "TorchTransformerDecoderLayer",
    "TorchTransformerEncoder",
    "TorchTransformerEncoderLayer",
    "params_from_torch_decoder",
    "params_from_torch_decoder_layer",
    "params_from_torch_encoder",
    "params_from_torch_encoder_layer",
    "params_from_torch_mha",
    "params_from_torch_transformer",
    "square_subsequent_mask",
]

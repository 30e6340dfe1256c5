"""The encoder-decoder Transformer of Vaswani et al. (2017), "Attention Is All You Need".

* Section 3.1: ``N`` encoder and ``N`` decoder layers, each sub-layer post-LN,
  ``LayerNorm(x + Dropout(Sublayer(x)))``; no final LayerNorm. The final encoder output is the
  key/value input of the cross-attention of every decoder layer; decoder self-attention is
  causal.
* Section 3.2: scaled dot-product attention, ``h`` heads of ``d_model / h``.
* Section 3.3: position-wise feed-forward ``max(0, x W1 + b1) W2 + b2`` (``d_ff`` 2048 base,
  4096 big).
* Section 3.4: with a shared (source + target) vocabulary, one embedding matrix serves the
  source embedding, the target embedding and the pre-softmax projection; embeddings are
  multiplied by ``sqrt(d_model)``. With ``src_vocab_size`` set, the source gets its own table
  (target embedding and output projection stay tied).
* Section 3.5: fixed sinusoidal positions added to the embeddings.
* Section 5.4: dropout ``P_drop`` (0.1 base, 0.3 big) on each sub-layer output before the
  residual addition and on the sums of embeddings and positions; label smoothing
  ``eps_ls = 0.1`` (``common.losses.projected_cross_entropy(label_smoothing=...)``).
* Section 6.1: beam search with beam 4 and length penalty ``alpha = 0.6`` (Wu et al. 2016's
  ``lp(Y) = ((5 + |Y|) / 6) ** alpha``), maximum output length input length + 50 with early
  termination. The warmup + inverse-square-root learning rate (eq. 3) is
  ``common.optim``'s ``schedule="inverse_sqrt"``.

Where this deliberately differs or fills in details the paper leaves open: LayerNorm epsilon
1e-6 and embeddings initialised N(0, d_model^-0.5), other matrices xavier-uniform (as in
tensor2tensor, the paper's code); no dropout on attention weights by default
(``attn_dropout``); the length penalty counts generated tokens including EOS.

``Transformer`` uses ``setup`` because it exposes several methods: ``encode``, ``decode``
(with an explicit KV cache), ``init_cache`` and ``__call__``. Decoding (``greedy_decode``,
``beam_search``) is compiled: one ``lax.while_loop`` over target positions, the decoder
self-attention keys/values cached, the cross-attention keys/values computed once from the
encoder output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common import masks, presets, validation
from common import sharding as sh
from common.attention import IMPLEMENTATIONS, dot_product_attention
from common.layers import ACTIVATIONS, MLP, flat_dot_general, layer_norm
from common.losses import projected_cross_entropy
from common.positional import sinusoidal_table

Array = jax.Array
NEG_INF = -1.0e7  # score of impossible beam-search hypotheses (finite: no inf - inf NaNs)

_XAVIER = nn.initializers.xavier_uniform()


# --------------------------------------------------------------------------- layers


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (``[d_model, heads, head_dim]``
    kernels), so that keys/values can be projected once (``project_kv``) and reused."""

    num_heads: int
    d_model: int
    dropout: float = 0.0  # on the attention weights
    attention_impl: str | None = None  # see common.attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        h, d = self.num_heads, self.d_model // self.num_heads

        def proj(name):
            return nn.DenseGeneral(
                (h, d),
                dot_general=flat_dot_general,
                kernel_init=nn.with_logical_partitioning(_XAVIER, (sh.EMBED, sh.HEADS, sh.KV)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (sh.HEADS, sh.KV)),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        self.query, self.key, self.value = proj("query"), proj("key"), proj("value")
        self.out = nn.DenseGeneral(
            self.d_model,
            axis=(-2, -1),
            dot_general=flat_dot_general,
            kernel_init=nn.with_logical_partitioning(_XAVIER, (sh.HEADS, sh.KV, sh.EMBED)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (sh.EMBED,)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )

    def project_kv(self, x: Array) -> dict[str, Array]:
        """``x [batch, len, d_model]`` -> ``{"k", "v"}``, each ``[batch, len, heads, head_dim]``."""
        return {"k": self.key(x), "v": self.value(x)}

    def __call__(
        self,
        x: Array,  # [batch, q_len, d_model]
        kv: dict[str, Array] | None = None,  # projected keys/values; None: self-attention
        *,
        mask: Array | None = None,  # bool [b|1, 1, q_len, kv_len], True = may attend
        is_causal: bool = False,
        cache: dict[str, Array] | None = None,  # self-attention cache [b, max_len, h, d]
        cache_index: Array | int | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, dict[str, Array] | None]:
        q = self.query(x)  # [batch, q_len, heads, head_dim]
        if kv is None:
            kv = self.project_kv(x)
            if cache is not None:
                kv = {
                    n: jax.lax.dynamic_update_slice_in_dim(
                        cache[n], kv[n].astype(cache[n].dtype), cache_index, axis=1
                    )
                    for n in ("k", "v")
                }
                cache = kv
        rate = 0.0 if deterministic else self.dropout
        out = dot_product_attention(
            q,
            kv["k"].astype(self.dtype),
            kv["v"].astype(self.dtype),
            mask=mask,
            is_causal=is_causal,
            dropout_rate=rate,
            dropout_rng=self.make_rng("dropout") if rate > 0.0 else None,
            implementation=self.attention_impl,
        )  # [batch, q_len, heads, head_dim]
        return self.out(out), cache  # [batch, q_len, d_model]


class _LayerFields(nn.Module):
    """The fields an encoder or decoder layer takes from ``Transformer``."""

    num_heads: int
    d_model: int
    d_ff: int
    dropout: float
    attn_dropout: float
    layer_norm_eps: float
    activation: str
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32


def _layer_fields(m: Any) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(_LayerFields) if f.name not in ("parent", "name")]
    return {n: getattr(m, n) for n in names}


def _mlp(cfg: _LayerFields) -> MLP:
    return MLP(
        cfg.d_ff,
        activation=cfg.activation,
        dropout=cfg.dropout,
        kernel_init=_XAVIER,
        out_kernel_init=_XAVIER,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name="ffn",
    )


def _attention(cfg: _LayerFields, name: str) -> Attention:
    return Attention(
        cfg.num_heads,
        cfg.d_model,
        dropout=cfg.attn_dropout,
        attention_impl=cfg.attention_impl,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name=name,
    )


class EncoderLayer(_LayerFields):
    """``x = LN(x + Dropout(SelfAttn(x)));  x = LN(x + Dropout(FFN(x)))`` (section 3.1)."""

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, deterministic: bool) -> Array:
        cfg = self
        kw = dict(eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        drop = nn.Dropout(cfg.dropout)
        a, _ = _attention(cfg, "self_attn")(x, mask=mask, deterministic=deterministic)
        x = layer_norm("ln_1", **kw)(x + drop(a, deterministic=deterministic))
        x = layer_norm("ln_2", **kw)(x + _mlp(cfg)(x, deterministic=deterministic))
        return nn.with_logical_constraint(x, sh.ACTIVATIONS)


class DecoderLayer(_LayerFields):
    """Causal self-attention, cross-attention over the encoder output, feed-forward; each
    post-LN. ``cross_kv`` projects the encoder output once for all decoding steps."""

    def setup(self):
        cfg = self
        kw = dict(eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.self_attn = _attention(cfg, "self_attn")
        self.cross_attn = _attention(cfg, "cross_attn")
        self.ffn = _mlp(cfg)
        self.ln_1, self.ln_2, self.ln_3 = (layer_norm(f"ln_{i}", **kw) for i in (1, 2, 3))
        self.drop = nn.Dropout(cfg.dropout)

    def cross_kv(self, memory: Array) -> dict[str, Array]:
        """Keys/values of the cross-attention, ``[batch, src_len, heads, head_dim]`` each."""
        return self.cross_attn.project_kv(memory)

    def __call__(
        self,
        x: Array,  # [batch, tgt_len, d_model]
        memory_kv: dict[str, Array],  # from cross_kv
        *,
        self_mask: Array | None,
        cross_mask: Array | None,
        cache: dict[str, Array] | None,
        cache_index: Array | int | None,
        deterministic: bool,
    ) -> tuple[Array, dict[str, Array] | None]:
        a, cache = self.self_attn(
            x,
            mask=self_mask,
            is_causal=cache is None,
            cache=cache,
            cache_index=cache_index,
            deterministic=deterministic,
        )
        x = self.ln_1(x + self.drop(a, deterministic=deterministic))
        a, _ = self.cross_attn(x, memory_kv, mask=cross_mask, deterministic=deterministic)
        x = self.ln_2(x + self.drop(a, deterministic=deterministic))
        x = self.ln_3(x + self.ffn(x, deterministic=deterministic))
        return nn.with_logical_constraint(x, sh.ACTIVATIONS), cache


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Encoder-decoder Transformer (Vaswani et al. 2017). Presets live in ``PRESETS``.

    Token ids are ``[batch, len]`` int; masks ``src_mask`` are bool ``[batch, src_len]``, True
    for real tokens (None: no padding). Targets are right-padded; padding is excluded by the
    loss weights (causal attention keeps it from reaching real positions).
    """

    vocab_size: int = 37000  # target vocabulary; the shared one when src_vocab_size is None
    src_vocab_size: int | None = None  # None: one table for source, target and output (3.4)
    max_len: int = 1024  # longest source or target sequence accepted
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    d_model: int = 512
    d_ff: int = 2048
    dropout: float = 0.1  # P_drop: embeddings + positions and every sub-layer output
    attn_dropout: float = 0.0  # on attention weights (not in the paper)
    layer_norm_eps: float = 1e-6
    activation: str = "relu"
    attention_impl: str | None = None  # see common.attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        positive = ("vocab_size", "max_len", "num_encoder_layers", "num_decoder_layers")
        p = validation.positive_ints(self, *positive, "num_heads", "d_model", "d_ff")
        p += validation.optional_positive_ints(self, "src_vocab_size")
        p += validation.divides(self, "num_heads", "d_model")
        if validation.is_positive_int(self.d_model) and self.d_model % 2:
            p.append(f"d_model={self.d_model} must be even (sinusoidal positions)")
        p += validation.fractions(self, "dropout", "attn_dropout")
        p += validation.one_of(self, "activation", sorted(ACTIVATIONS))
        p += validation.one_of(self, "attention_impl", IMPLEMENTATIONS)
        validation.check(self, p)
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def setup(self):
        def embed(vocab, name):
            return nn.Embed(
                vocab,
                self.d_model,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(self.d_model**-0.5), (sh.VOCAB, sh.EMBED)
                ),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        self.embed = embed(self.vocab_size, "embed")  # target (+ source) + output
        if self.src_vocab_size is not None:
            self.src_embed = embed(self.src_vocab_size, "src_embed")
        kw = _layer_fields(self)
        self.encoder_layers = [
            EncoderLayer(**kw, name=f"encoder_{i}") for i in range(self.num_encoder_layers)
        ]
        self.decoder_layers = [
            DecoderLayer(**kw, name=f"decoder_{i}") for i in range(self.num_decoder_layers)
        ]
        self.drop = nn.Dropout(self.dropout)

    def _embed(self, table: nn.Embed, tokens: Array, positions: Array, deterministic: bool):
        pe = jnp.asarray(sinusoidal_table(self.max_len, self.d_model))  # [max_len, d_model]
        x = table(tokens) * jnp.asarray(math.sqrt(self.d_model), self.dtype)
        x = x + jnp.take(pe, positions, axis=0).astype(self.dtype)  # [batch, len, d_model]
        x = self.drop(x, deterministic=deterministic)
        return nn.with_logical_constraint(x, sh.ACTIVATIONS)

    def _check_tokens(self, tokens: Array, what: str) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"{what} tokens must be [batch, length], got shape {tokens.shape}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(
                f"{what} length {tokens.shape[1]} exceeds the model's max_len={self.max_len}"
            )

    def encode(self, src: Array, src_mask: Array | None = None, *, deterministic: bool = True):
        """Encoder output ``[batch, src_len, d_model]`` for ``src [batch, src_len]``."""
        self._check_tokens(src, "source")
        if src_mask is not None and src_mask.shape != src.shape:
            raise ValueError(f"src_mask has shape {src_mask.shape}, expected {src.shape}")
        table = self.embed if self.src_vocab_size is None else self.src_embed
        x = self._embed(table, src, jnp.arange(src.shape[1]), deterministic)
        mask = None if src_mask is None else masks.padding_mask(src_mask)  # [b, 1, 1, S]
        for layer in self.encoder_layers:
            x = layer(x, mask, deterministic)
        return x

    def init_cache(self, memory: Array, length: int) -> dict[str, Any]:
        """Decoding cache for ``length`` target positions: zeroed self-attention keys/values
        ``[batch, length, heads, head_dim]`` and the cross-attention keys/values of ``memory``
        (computed once here). Call with ``model.apply(params, memory, length,
        method=Transformer.init_cache)``."""
        if length > self.max_len:
            raise ValueError(f"target length {length} exceeds the model's max_len={self.max_len}")
        shape = (memory.shape[0], length, self.num_heads, self.head_dim)
        zeros = {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
        return {
            "self": {layer.name: dict(zeros) for layer in self.decoder_layers},
            "cross": {layer.name: layer.cross_kv(memory) for layer in self.decoder_layers},
        }

    def decode(
        self,
        tgt: Array,  # [batch, tgt_len] decoder input (BOS + shifted target)
        memory: Array | None = None,  # [batch, src_len, d_model]; unused with a cache
        src_mask: Array | None = None,  # [batch, src_len] bool, True = real token
        *,
        cache: dict[str, Any] | None = None,
        cache_index: Array | int = 0,  # absolute position of tgt[:, 0] when caching
        deterministic: bool = True,
        features_only: bool = False,
    ):
        """Logits ``[batch, tgt_len, vocab]`` (float32); with a cache ``(logits, new_cache)``.

        ``features_only``: the last decoder layer's output ``[batch, tgt_len, d_model]``
        instead of logits, for a loss that applies the tied projection itself
        (``translation_loss_fn``; the output projection is always tied to the target
        embedding).
        """
        self._check_tokens(tgt, "target")
        length = tgt.shape[1]
        positions = cache_index + jnp.arange(length)  # [tgt_len]
        x = self._embed(self.embed, tgt, positions, deterministic)
        cross_mask = None if src_mask is None else masks.padding_mask(src_mask)  # [b, 1, 1, S]
        if cache is None:
            if memory is None:
                raise ValueError("decode needs the encoder output (memory) or a cache")
            self_mask, new_cache = None, None  # causal via is_causal
        else:
            cache_len = cache["self"][self.decoder_layers[0].name]["k"].shape[1]
            self_mask = masks.causal_mask(positions, jnp.arange(cache_len))  # [1, 1, T, L]
            new_cache = {"self": {}, "cross": cache["cross"]}
        for layer in self.decoder_layers:
            if cache is None:
                memory_kv, layer_cache = layer.cross_kv(memory), None
            else:
                memory_kv, layer_cache = cache["cross"][layer.name], cache["self"][layer.name]
            x, layer_cache = layer(
                x,
                memory_kv,
                self_mask=self_mask,
                cross_mask=cross_mask,
                cache=layer_cache,
                cache_index=cache_index,
                deterministic=deterministic,
            )
            if cache is not None:
                new_cache["self"][layer.name] = layer_cache
        if features_only:
            return x if cache is None else (x, new_cache)
        logits = self.embed.attend(x).astype(jnp.float32)  # [batch, tgt_len, vocab]
        return logits if cache is None else (logits, new_cache)

    def __call__(
        self,
        src: Array,  # [batch, src_len]
        tgt: Array,  # [batch, tgt_len] decoder input
        src_mask: Array | None = None,  # [batch, src_len] bool, True = real token
        *,
        deterministic: bool = True,
        features_only: bool = False,
    ) -> Array:
        """Teacher-forced logits ``[batch, tgt_len, vocab]`` (float32); ``features_only``: the
        decoder's output ``[batch, tgt_len, d_model]`` instead (see ``decode``)."""
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(f"source batch {src.shape[0]} != target batch {tgt.shape[0]}")
        memory = self.encode(src, src_mask, deterministic=deterministic)
        return self.decode(
            tgt, memory, src_mask, deterministic=deterministic, features_only=features_only
        )


# Section 6.1 / table 3: base and big, with the 37000-token shared BPE vocabulary of WMT
# English-German.
PRESETS: dict[str, dict[str, Any]] = {
    "transformer-base": dict(
        vocab_size=37000, num_heads=8, d_model=512, d_ff=2048, dropout=0.1, max_len=1024
    ),
    "transformer-big": dict(
        vocab_size=37000, num_heads=16, d_model=1024, d_ff=4096, dropout=0.3, max_len=1024
    ),
    # Tiny preset for tests.
    "transformer-tiny": dict(
        vocab_size=96,
        max_len=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        d_model=32,
        d_ff=64,
        dropout=0.1,
    ),
}


def from_preset(name: str, **overrides: Any) -> Transformer:
    """``Transformer`` built from a named preset, with field overrides (unknown fields fail)."""
    return presets.build(Transformer, PRESETS, name, **overrides)


# --------------------------------------------------------------------------- loss


def translation_loss_fn(model: Transformer, label_smoothing: float = 0.1):
    """Loss for ``common.training``: ``(params, batch, rng) -> (mean smoothed loss, {"nll"})``.

    ``batch``: ``src`` ``[b, S]``, ``tgt_in`` / ``tgt_out`` ``[b, T]`` int, optional bool
    ``src_mask`` ``[b, S]`` and float ``tgt_weights`` ``[b, T]`` (0 on padding). Dropout is on.
    The tied output projection and the loss are one ``projected_cross_entropy`` (the same
    values as ``cross_entropy`` of the logits, a leaner backward pass over the vocab-sized
    arrays).
    """

    def loss_fn(params, batch, rng):
        x = model.apply(
            {"params": params},
            batch["src"],
            batch["tgt_in"],
            batch.get("src_mask"),
            deterministic=False,
            rngs={"dropout": rng},
            features_only=True,
        )  # [b, T, d_model]
        w = params["embed"]["embedding"].astype(model.dtype)  # [vocab, d_model]
        weights = batch.get("tgt_weights")
        if weights is None:
            weights = jnp.ones(batch["tgt_out"].shape, jnp.float32)
        total, count, nll = projected_cross_entropy(
            x, w, batch["tgt_out"], weights, label_smoothing
        )
        count = jnp.maximum(count, 1.0)
        return total / count, {"nll": nll / count}

    return loss_fn


# --------------------------------------------------------------------------- decoding


def length_penalty(length: Array | int, alpha: float) -> Array:
    """GNMT's ``lp(Y) = ((5 + |Y|) / 6) ** alpha`` (Wu et al. 2016, eq. 14)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _check_decode_args(model: Transformer, src: Array, src_mask, max_new_tokens, **ids):
    if src.ndim != 2:
        raise ValueError(f"src must be [batch, length], got shape {src.shape}")
    if src.shape[1] > model.max_len:
        raise ValueError(
            f"source length {src.shape[1]} exceeds the model's max_len={model.max_len}"
        )
    if src_mask is not None and src_mask.shape != src.shape:
        raise ValueError(f"src_mask has shape {src_mask.shape}, expected {src.shape}")
    if max_new_tokens is None:  # section 6.1: input length + 50, within the model's range
        max_new_tokens = min(src.shape[1] + 50, model.max_len)
    if not 1 <= max_new_tokens <= model.max_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} must be in [1, max_len={model.max_len}] (target "
            "length)"
        )
    for name, value in ids.items():
        if value is not None and not 0 <= value < model.vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {model.vocab_size})")
    return int(max_new_tokens)


def _decode_step(model, params, tok, src_mask, cache, index):
    logits, cache = model.apply(
        params, tok, None, src_mask, cache=cache, cache_index=index, method=Transformer.decode
    )
    return logits[:, -1], cache  # [batch, vocab]


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "bos_id", "eos_id", "pad_id")
)
def _greedy(model, params, src, src_mask, *, max_new_tokens, bos_id, eos_id, pad_id):
    b = src.shape[0]
    memory = model.apply(params, src, src_mask, method=Transformer.encode)
    cache = model.apply(params, memory, max_new_tokens, method=Transformer.init_cache)
    out = jnp.full((b, max_new_tokens + 1), pad_id, jnp.int32).at[:, 0].set(bos_id)

    def cond(carry):
        i, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, cache, done = carry  # out[:, : i + 1] is known
        tok = jax.lax.dynamic_slice_in_dim(out, i, 1, axis=1)  # [batch, 1]
        logits, cache = _decode_step(model, params, tok, src_mask, cache, i)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [batch]
        nxt = jnp.where(done, pad_id, nxt)
        if eos_id is not None:
            done = done | (nxt == eos_id)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i + 1, axis=1)
        return i + 1, out, cache, done

    done = jnp.zeros((b,), bool)
    _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), out, cache, done))
    return out[:, 1:]


def greedy_decode(
    model: Transformer,
    params: Any,
    src: Array,
    src_mask: Array | None = None,
    *,
    bos_id: int,
    eos_id: int | None = None,
    pad_id: int = 0,
    max_new_tokens: int | None = None,
) -> Array:
    """Greedy translation: ``[batch, max_new_tokens]`` tokens (without BOS).

    Each row ends at its first ``eos_id`` (kept), followed by ``pad_id``; the loop stops when
    every row has ended. ``max_new_tokens`` defaults to source length + 50 (section 6.1),
    capped by ``max_len``.
    """
    src = jnp.asarray(src, jnp.int32)
    n = _check_decode_args(
        model, src, src_mask, max_new_tokens, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id
    )
    return _greedy(
        model, params, src, src_mask, max_new_tokens=n, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id
    )


def _gather_beams(x: Array, beam_idx: Array) -> Array:
    """``x [b, k_in, ...]``, ``beam_idx [b, k_out]`` -> ``[b, k_out, ...]``."""
    return jax.vmap(lambda xi, idx: xi[idx])(x, beam_idx)


@functools.partial(
    jax.jit,
    static_argnames=("model", "beam_size", "alpha", "max_new_tokens", "bos_id", "eos_id", "pad_id"),
)
def _beam_search(
    model, params, src, src_mask, *, beam_size, alpha, max_new_tokens, bos_id, eos_id, pad_id
):
    b, k, n = src.shape[0], beam_size, max_new_tokens
    memory = model.apply(params, src, src_mask, method=Transformer.encode)
    memory = jnp.repeat(memory, k, axis=0)  # [b * k, S, d_model], beam-minor
    src_mask = None if src_mask is None else jnp.repeat(src_mask, k, axis=0)
    cache = model.apply(params, memory, n, method=Transformer.init_cache)

    seqs = jnp.full((b, k, n + 1), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
    live_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))  # [b, k]
    fin_seqs = seqs
    fin_scores = jnp.full((b, k), NEG_INF, jnp.float32)
    fin_flags = jnp.zeros((b, k), bool)
    max_lp = length_penalty(n, alpha)

    def cond(state):
        i, _, live_logp, _, _, fin_scores, fin_flags = state
        # A live hypothesis can at best keep its log-prob and reach the largest penalty.
        best_live = live_logp[:, 0] / max_lp  # [b] (live beams are sorted)
        worst_fin = jnp.where(fin_flags, fin_scores, NEG_INF).min(axis=1)  # [b]
        done = jnp.all(fin_flags, axis=1) & (worst_fin >= best_live)
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, seqs, live_logp, cache, fin_seqs, fin_scores, fin_flags = state
        tok = seqs[:, :, i].reshape(b * k, 1)
        logits, cache = _decode_step(model, params, tok, src_mask, cache, i)
        logp = jax.nn.log_softmax(logits).reshape(b, k, -1)  # [b, k, vocab]
        vocab = logp.shape[-1]
        cand = (live_logp[:, :, None] + logp).reshape(b, k * vocab)
        top_logp, top_idx = jax.lax.top_k(cand, 2 * k)  # [b, 2k]
        beam_idx, tok_id = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seqs = _gather_beams(seqs, beam_idx).at[:, :, i + 1].set(tok_id)  # [b, 2k, n + 1]
        valid = top_logp > NEG_INF / 2  # not grown from an empty beam
        if eos_id is None:
            is_eos = jnp.zeros_like(valid)
        else:
            is_eos = tok_id == eos_id
        # As fairseq: a hypothesis ends only if its EOS ranks among the k best candidates;
        # lower-ranked EOS candidates are dropped.
        ends = is_eos & valid & (jnp.arange(2 * k) < k)[None, :]  # [b, 2k]

        # Live: the k best candidates that did not end.
        live_logp, pick = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logp), k)
        seqs = _gather_beams(top_seqs, pick)
        src_beam = _gather_beams(beam_idx, pick)  # [b, k] which old beam each came from
        flat = (jnp.arange(b)[:, None] * k + src_beam).reshape(-1)
        cache = {"self": jax.tree.map(lambda x: x[flat], cache["self"]), "cross": cache["cross"]}

        # Finished: the k best of the old finished and the candidates that just ended.
        scores = jnp.where(ends, top_logp / length_penalty(i + 1, alpha), NEG_INF)
        all_scores = jnp.concatenate([fin_scores, scores], axis=1)  # [b, 3k]
        all_flags = jnp.concatenate([fin_flags, ends], axis=1)
        all_seqs = jnp.concatenate([fin_seqs, top_seqs], axis=1)
        fin_scores, pick = jax.lax.top_k(all_scores, k)
        fin_flags = _gather_beams(all_flags, pick)
        fin_seqs = _gather_beams(all_seqs, pick)
        return i + 1, seqs, live_logp, cache, fin_seqs, fin_scores, fin_flags

    state = (jnp.int32(0), seqs, live_logp, cache, fin_seqs, fin_scores, fin_flags)
    _, seqs, live_logp, _, fin_seqs, fin_scores, fin_flags = jax.lax.while_loop(cond, body, state)
    # Unfilled finished slots take the best live hypotheses, scored at full length. (They
    # can only get in when the loop ran to max_new_tokens: an early stop means every slot
    # holds a finished hypothesis that no live one beats.)
    scores = jnp.concatenate([jnp.where(fin_flags, fin_scores, NEG_INF), live_logp / max_lp], 1)
    scores, pick = jax.lax.top_k(scores, k)  # [b, k]
    seqs = _gather_beams(jnp.concatenate([fin_seqs, seqs], axis=1), pick)
    return seqs[:, :, 1:], scores


def beam_search(
    model: Transformer,
    params: Any,
    src: Array,
    src_mask: Array | None = None,
    *,
    bos_id: int,
    eos_id: int | None,
    pad_id: int = 0,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_new_tokens: int | None = None,
) -> tuple[Array, Array]:
    """Beam search (section 6.1): ``(tokens [batch, beam, max_new_tokens], scores [batch, beam])``
    sorted best first; ``tokens[:, 0]`` is the translation.

    Each step expands the ``beam_size`` live hypotheses to their ``2 * beam_size`` best
    continuations; those of the first ``beam_size`` ranks that end in ``eos_id`` are finished
    (as in fairseq; EOS is kept, then ``pad_id``), the best ``beam_size`` others stay live. A
    finished hypothesis scores its log-probability divided by ``length_penalty(length,
    alpha)``, the length counting EOS. A row stops once it holds ``beam_size`` finished
    hypotheses that no live one can beat any more (tensor2tensor's bound: log-probabilities
    only fall, the penalty at most reaches ``length_penalty(max_new_tokens)``), so stopping
    early never changes the result. Hypotheses still live at ``max_new_tokens`` (all of them
    when ``eos_id=None``) compete with the finished ones, scored at that length.

    ``beam_size=1`` equals ``greedy_decode`` when ``alpha == 0`` or no hypothesis ends early;
    with ``alpha > 0`` a longer hypothesis found after greedy's EOS may outscore it.
    """
    src = jnp.asarray(src, jnp.int32)
    n = _check_decode_args(
        model, src, src_mask, max_new_tokens, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id
    )
    if beam_size < 1 or 2 * beam_size > model.vocab_size:
        raise ValueError(
            f"beam_size={beam_size} must be in [1, vocab_size / 2 = {model.vocab_size // 2}]"
        )
    if alpha < 0:
        raise ValueError(f"length penalty alpha={alpha} must be >= 0")
    return _beam_search(
        model,
        params,
        src,
        src_mask,
        beam_size=int(beam_size),
        alpha=float(alpha),
        max_new_tokens=n,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
    )


def abstract_params(model: Transformer) -> Any:
    """The params tree of ``model`` as shapes (``jax.eval_shape``: no memory, no FLOPs), e.g.
    for ``common.training.param_count``: the shared embedding is one leaf and the sinusoidal
    positions are not parameters."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)["params"]

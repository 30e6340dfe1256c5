"""The GPT family: GPT-1, GPT-2 and GPT-3 as one decoder-only Transformer.

* GPT-1 (Radford et al. 2018, section 3.1 / 4.1): post-LN blocks (``LN(x + sublayer(x))``),
  learned positions, tanh-approximated GELU (as in the released code), dropout 0.1 on
  embeddings, residuals and attention weights, no final LayerNorm.
* GPT-2 (Radford et al. 2019, section 2.3): LayerNorm moved to the input of each sub-block
  plus a final LayerNorm; residual output projections initialised with std
  ``0.02 / sqrt(2 * n_layer)``; vocabulary 50257, context 1024; tanh-approximated GELU as in
  the released code.
* GPT-3 (Brown et al. 2020, section 2.1): GPT-2 with layers alternating dense and locally
  banded causal attention. The paper gives no band width; we use ``local_window = 256``
  tokens (each query sees itself and the 255 tokens before it) and put the banded layers at
  odd indices (layer 0 is dense). With the default ``attention_impl`` banded layers run
  cuDNN's sliding-window kernel on a GPU (half precision) and ``common.sparse_attention.
  banded_attention`` elsewhere, which scores only the band (O(n * window), not a masked
  n x n); see ``common.attention``.

Input and output embeddings are tied. ``__call__`` takes an optional explicit KV cache (see
``init_cache``) so that generation is a pure function (``nlp/decoding.py``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common import masks, presets, validation
from common import sharding as sh
from common.attention import IMPLEMENTATIONS, MultiHeadAttention
from common.layers import ACTIVATIONS, MLP, REMAT_POLICIES, layer_norm, remat
from common.losses import projected_cross_entropy
from common.positional import LearnedPositional

Array = jax.Array
ATTENTION_PATTERNS = ("dense", "alternating")


class Block(nn.Module):
    """One Transformer block; ``pre_norm`` picks GPT-2/3 (True) or GPT-1 (False) ordering."""

    num_heads: int
    d_ff: int
    pre_norm: bool
    local_window: int | None  # None: dense causal; else banded causal of this width
    dropout: float
    attn_dropout: float
    layer_norm_eps: float
    activation: str
    out_init_std: float  # std of the residual output projections
    deterministic: bool
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, cache=None, cache_index=None):
        # x: [batch, len, d_model]; positions: [len] absolute positions of x's tokens.
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d_model = x.shape[-1]
        attn = MultiHeadAttention(
            num_heads=self.num_heads,
            head_dim=d_model // self.num_heads,
            dropout=self.attn_dropout,
            attention_impl=self.attention_impl,
            out_kernel_init=nn.initializers.normal(self.out_init_std),
            name="attn",
            **kw,
        )
        mlp = MLP(
            self.d_ff,
            activation=self.activation,
            dropout=self.dropout,
            out_kernel_init=nn.initializers.normal(self.out_init_std),
            name="mlp",
            **kw,
        )
        ln_1 = layer_norm("ln_1", eps=self.layer_norm_eps, **kw)
        ln_2 = layer_norm("ln_2", eps=self.layer_norm_eps, **kw)
        drop = nn.Dropout(self.dropout)

        if cache is None:
            kv_positions = positions
        else:
            kv_positions = jnp.arange(cache["k"].shape[1])
        mask, is_causal, window = None, False, None
        if self.local_window is not None and cache is None:
            window = self.local_window  # a band, O(len * window) scores
        elif self.local_window is not None:  # decoding: queries against the whole cache
            mask = masks.band_mask(positions, kv_positions, self.local_window)
        elif cache is not None:
            mask = masks.causal_mask(positions, kv_positions)
        else:
            is_causal = True

        def attend(h):
            out, new_cache = attn(
                h,
                mask=mask,
                is_causal=is_causal,
                local_window=window,
                cache=cache,
                cache_index=cache_index,
                deterministic=self.deterministic,
            )
            return drop(out, deterministic=self.deterministic), new_cache

        if self.pre_norm:
            a, cache = attend(ln_1(x))
            x = x + a
            x = x + mlp(ln_2(x), deterministic=self.deterministic)
        else:
            a, cache = attend(x)
            x = ln_1(x + a)
            x = ln_2(x + mlp(x, deterministic=self.deterministic))
        return x, cache


class GPT(nn.Module):
    """Decoder-only Transformer LM with tied embeddings. Presets live in ``PRESETS``."""

    vocab_size: int = 50257
    max_len: int = 1024  # context length = size of the learned position table
    num_layers: int = 12
    num_heads: int = 12
    d_model: int = 768
    d_ff: int = 3072
    pre_norm: bool = True  # False: GPT-1's post-LN blocks and no final LayerNorm
    dropout: float = 0.1  # embeddings and residual branches
    attn_dropout: float = 0.1  # attention weights
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    scaled_residual_init: bool = True  # residual projections std 0.02/sqrt(2L) (GPT-2)
    attention: str = "dense"  # "dense" | "alternating" (GPT-3: odd layers banded)
    local_window: int = 256  # band width of GPT-3's banded layers
    remat_policy: str | None = None  # see common.layers.REMAT_POLICIES; None = no remat
    attention_impl: str | None = None  # see common.attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        positive = ("vocab_size", "max_len", "num_layers", "num_heads", "d_model", "d_ff")
        p = validation.positive_ints(self, *positive, "local_window")
        p += validation.divides(self, "num_heads", "d_model")
        p += validation.fractions(self, "dropout", "attn_dropout")
        p += validation.one_of(self, "attention", ATTENTION_PATTERNS)
        p += validation.one_of(self, "attention_impl", IMPLEMENTATIONS)
        p += validation.one_of(self, "remat_policy", REMAT_POLICIES)
        p += validation.one_of(self, "activation", sorted(ACTIVATIONS))
        validation.check(self, p)
        super().__post_init__()

    def layer_window(self, i: int) -> int | None:
        """Band width of layer ``i``, or None for a dense causal layer."""
        if self.attention == "alternating" and i % 2 == 1:
            return self.local_window
        return None

    def init_cache(self, batch_size: int, length: int | None = None) -> dict[str, Any]:
        """Zeroed KV cache for ``length`` (default ``max_len``) positions."""
        length = self.max_len if length is None else length
        shape = (batch_size, length, self.num_heads, self.d_model // self.num_heads)
        return {
            f"h_{i}": {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
            for i in range(self.num_layers)
        }

    @nn.compact
    def __call__(
        self,
        tokens: Array,  # [batch, len] int
        *,
        cache: dict[str, Any] | None = None,
        cache_index: Array | int = 0,  # absolute position of tokens[:, 0] when caching
        deterministic: bool = True,
        features_only: bool = False,
    ):
        """Logits ``[batch, len, vocab]`` (float32); with a cache, ``(logits, new_cache)``.

        ``features_only``: the final features ``[batch, len, d_model]`` instead of logits,
        for a loss that applies the tied projection itself (``lm_loss_fn``).
        """
        length = tokens.shape[1]
        if cache is None and length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the context max_len={self.max_len}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        wte = nn.Embed(
            self.vocab_size,
            self.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (sh.VOCAB, sh.EMBED)
            ),
            name="wte",
            **kw,
        )
        positions = cache_index + jnp.arange(length)  # [len]
        x = wte(tokens) + LearnedPositional(self.max_len, self.d_model, name="wpe", **kw)(positions)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)  # [batch, len, d_model]
        x = nn.with_logical_constraint(x, sh.ACTIVATIONS)

        out_std = 0.02 / math.sqrt(2 * self.num_layers) if self.scaled_residual_init else 0.02
        block_cls = remat(Block, self.remat_policy if cache is None else None)
        new_cache = {} if cache is not None else None
        for i in range(self.num_layers):
            block = block_cls(
                num_heads=self.num_heads,
                d_ff=self.d_ff,
                pre_norm=self.pre_norm,
                local_window=self.layer_window(i),
                dropout=self.dropout,
                attn_dropout=self.attn_dropout,
                layer_norm_eps=self.layer_norm_eps,
                activation=self.activation,
                out_init_std=out_std,
                deterministic=deterministic,
                attention_impl=self.attention_impl,
                name=f"h_{i}",
                **kw,
            )
            layer_cache = None if cache is None else cache[f"h_{i}"]
            x, layer_cache = block(x, positions, layer_cache, cache_index)
            x = nn.with_logical_constraint(x, sh.ACTIVATIONS)
            if cache is not None:
                new_cache[f"h_{i}"] = layer_cache
        if self.pre_norm:
            x = layer_norm("ln_f", eps=self.layer_norm_eps, **kw)(x)
        if features_only:
            return x if cache is None else (x, new_cache)
        logits = wte.attend(x).astype(jnp.float32)  # [batch, len, vocab]
        return logits if cache is None else (logits, new_cache)


# One table for the family. GPT-3 rows follow Brown et al. table 2.1, except two rows whose
# numbers disagree with each other: "XL" lists d_model 2048 with 24 heads of 128 (= 3072);
# we keep d_model 2048 and d_head 128, i.e. 16 heads. "13B" lists d_model 5140 with 40 heads
# of 128 (= 5120); we use d_model 5120.
_GPT2 = dict(vocab_size=50257, max_len=1024)
_GPT3 = dict(vocab_size=50257, max_len=2048, attention="alternating", local_window=256)
PRESETS: dict[str, dict[str, Any]] = {
    "gpt1": dict(
        vocab_size=40478,
        max_len=512,
        num_layers=12,
        num_heads=12,
        d_model=768,
        d_ff=3072,
        pre_norm=False,
        activation="gelu_tanh",
        scaled_residual_init=False,
    ),
    "gpt2-small": dict(**_GPT2, num_layers=12, num_heads=12, d_model=768, d_ff=3072),
    "gpt2-medium": dict(**_GPT2, num_layers=24, num_heads=16, d_model=1024, d_ff=4096),
    "gpt2-large": dict(**_GPT2, num_layers=36, num_heads=20, d_model=1280, d_ff=5120),
    "gpt2-xl": dict(**_GPT2, num_layers=48, num_heads=25, d_model=1600, d_ff=6400),
    "gpt3-small": dict(**_GPT3, num_layers=12, num_heads=12, d_model=768, d_ff=3072),
    "gpt3-medium": dict(**_GPT3, num_layers=24, num_heads=16, d_model=1024, d_ff=4096),
    "gpt3-large": dict(**_GPT3, num_layers=24, num_heads=16, d_model=1536, d_ff=6144),
    "gpt3-xl": dict(**_GPT3, num_layers=24, num_heads=16, d_model=2048, d_ff=8192),
    "gpt3-2.7b": dict(**_GPT3, num_layers=32, num_heads=32, d_model=2560, d_ff=10240),
    "gpt3-6.7b": dict(**_GPT3, num_layers=32, num_heads=32, d_model=4096, d_ff=16384),
    "gpt3-13b": dict(**_GPT3, num_layers=40, num_heads=40, d_model=5120, d_ff=20480),
    "gpt3-175b": dict(**_GPT3, num_layers=96, num_heads=96, d_model=12288, d_ff=49152),
    # Tiny presets for tests: every code path (post-LN, banded layers) at toy size.
    "gpt-tiny": dict(vocab_size=128, max_len=64, num_layers=2, num_heads=4, d_model=32, d_ff=128),
    "gpt3-tiny": dict(
        vocab_size=128,
        max_len=64,
        num_layers=4,
        num_heads=4,
        d_model=32,
        d_ff=128,
        attention="alternating",
        local_window=8,
    ),
    "gpt1-tiny": dict(
        vocab_size=128,
        max_len=64,
        num_layers=2,
        num_heads=4,
        d_model=32,
        d_ff=128,
        pre_norm=False,
        activation="gelu_tanh",
        scaled_residual_init=False,
    ),
}


def lm_loss_fn(model: GPT):
    """Next-token loss for ``common.training``: ``(params, batch, rng) -> (mean nats, {})``.

    ``batch``: ``inputs`` and ``targets``, int ``[batch, len]``; dropout is on. The tied
    output projection and the loss are one ``projected_cross_entropy`` (same value as
    ``cross_entropy`` of the logits, a leaner backward pass over the vocab-sized arrays).
    """

    def loss_fn(params, batch, rng):
        x = model.apply(
            {"params": params},
            batch["inputs"],
            deterministic=False,
            rngs={"dropout": rng},
            features_only=True,
        )
        w = params["wte"]["embedding"].astype(model.dtype)  # [vocab, d_model]
        weights = jnp.ones(batch["targets"].shape, jnp.float32)
        total, count, _ = projected_cross_entropy(x, w, batch["targets"], weights)
        return total / count, {}

    return loss_fn


def from_preset(name: str, **overrides: Any) -> GPT:
    """``GPT`` built from a named preset, with field overrides (unknown fields fail)."""
    return presets.build(GPT, PRESETS, name, **overrides)

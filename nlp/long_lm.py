"""Decoder-only Transformer for long inputs (Liu et al. 2018, "Generating Wikipedia by
summarizing long sequences", section 4.2).

* Section 4.2.2, "Transformer Decoder (T-D)": no encoder; the input and the output are one
  sequence ``input <delim> output`` (``make_batch``) modelled left to right, and the loss
  is taken only on the output part (after the delimiter, up to and including the
  end-of-sequence token). Generation feeds ``input <delim>`` and decodes (``greedy_decode``).
* Section 4.2.3, "Transformer Decoder with Memory-Compressed Attention (T-DMCA)": the layers
  mix two attentions, chosen per layer by ``layer_pattern`` (one letter per residual block):

  * ``L``: local attention, the sequence split into blocks of ``local_block`` tokens
    (b = 256 in the paper) attended independently and causally
    (``common.sparse_attention.local_attention``; ``local_look_back`` also lets each block
    see its predecessor, which the paper does not do);
  * ``M``: memory-compressed attention, K and V passed through a strided convolution
    (kernel ``compress_kernel`` = 3, stride ``compress_stride`` = 3) while the queries stay
    uncompressed (``common.sparse_attention.MemoryCompressedKV`` + ``compressed_attention``;
    causal: a query sees only compressed slots built entirely from its past);
  * ``D``: dense causal attention; ``"DDDDD"`` is T-D, ``"LMLML"`` the paper's T-DMCA.

Blocks are pre-norm with a final LayerNorm (tensor2tensor's ``layer_preprocess="n"``, which
the paper's models used) and the Sparse Transformer's ``Block``; positions are the fixed
sinusoids of Vaswani et al. (tensor2tensor's default timing signal); input and output
embeddings are tied. The paper's mixture-of-experts layers are not implemented.

Configuration errors (an unknown letter in ``layer_pattern``, a block or stride that does not
fit ``max_len`` or the heads, a sequence longer than ``max_len``) are ``ValueError``s naming the
field, raised in ``__post_init__`` or while tracing, before anything compiles.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import presets, validation
from common import sharding as sh
from common import sparse_attention as sa
from common.attention import dot_product_attention
from common.layers import (
    ACTIVATIONS,
    REMAT_POLICIES,
    StackedDense,
    flat_dot_general,
    layer_norm,
    remat,
)
from common.positional import sinusoidal_table
from nlp.sparse_transformer import Block

Array = jax.Array
LAYER_KINDS = {"D": "dense causal", "L": "local", "M": "memory-compressed"}


class LongAttention(nn.Module):
    """Causal self-attention of one kind (``"D"``, ``"L"``, ``"M"``), ``[b, n, d] -> [b, n, d]``."""

    num_heads: int
    kind: str  # one letter of LAYER_KINDS
    local_block: int = 256
    local_look_back: bool = False
    compress_kernel: int = 3
    compress_stride: int = 3
    attn_dropout: float = 0.0  # on the attention weights (every kind: D, L and M)
    deterministic: bool = True
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d_model = x.shape[-1]
        h, d = self.num_heads, d_model // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = StackedDense(
            3,
            (h, d),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(self.init_std), (sh.EMBED, None, sh.HEADS, sh.KV)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, sh.HEADS, sh.KV)),
            name="qkv",
            **kw,
        )(x)  # each [batch, len, heads, head_dim]
        rate = 0.0 if self.deterministic else self.attn_dropout
        rng = self.make_rng("dropout") if rate > 0.0 else None
        if self.kind == "D":
            out = dot_product_attention(q, k, v, is_causal=True, dropout_rate=rate, dropout_rng=rng)
        elif self.kind == "L":
            out = sa.local_attention(
                q,
                k,
                v,
                block=self.local_block,
                look_back=self.local_look_back,
                dropout_rate=rate,
                dropout_rng=rng,
            )
        else:  # "M"
            k_c, v_c = sa.MemoryCompressedKV(
                kernel_size=self.compress_kernel,
                stride=self.compress_stride,
                kernel_init=nn.initializers.normal(self.init_std),
                name="compress",
                **kw,
            )(k, v)  # each [batch, ceil(len / stride), heads, head_dim]
            out = sa.compressed_attention(
                q, k_c, v_c, stride=self.compress_stride, dropout_rate=rate, dropout_rng=rng
            )
        # out: [batch, len, heads, head_dim]
        return nn.DenseGeneral(
            d_model,
            axis=(-2, -1),
            dot_general=flat_dot_general,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(self.out_init_std), (sh.HEADS, sh.KV, sh.EMBED)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (sh.EMBED,)),
            name="out",
            **kw,
        )(out)  # [batch, len, d_model]


class LongLM(nn.Module):
    """T-D / T-DMCA decoder-only LM; one residual block per letter of ``layer_pattern``.

    ``__call__(tokens [b, n]) -> logits [b, n, vocab]`` (float32). Presets in ``PRESETS``.
    """

    vocab_size: int = 32000
    max_len: int = 11000  # longest sequence (sinusoidal positions: any length up to this)
    layer_pattern: str = "LMLML"  # one letter per block: D dense, L local, M compressed
    num_heads: int = 8
    d_model: int = 512
    d_ff: int = 2048
    local_block: int = 256  # b: tokens per local-attention block
    local_look_back: bool = False  # each local block also sees the previous one
    compress_kernel: int = 3  # memory-compressed attention: conv width over K and V
    compress_stride: int = 3  # ... and its stride (the compression factor)
    dropout: float = 0.0  # embeddings and residual branches
    attn_dropout: float = 0.0  # attention weights
    activation: str = "relu"
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02  # residual output projections: init_std / sqrt(2 * layers)
    remat_policy: str | None = None  # see common.layers.REMAT_POLICIES; None = no remat
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        validation.check(self, self.config_problems())
        super().__post_init__()

    def config_problems(self) -> list[str]:
        ints = ("vocab_size", "max_len", "num_heads", "d_model", "d_ff")
        ints += ("local_block", "compress_kernel", "compress_stride")
        p = validation.positive_ints(self, *ints)
        if p:
            return p
        if not isinstance(self.layer_pattern, str) or not self.layer_pattern:
            p.append(f"layer_pattern={self.layer_pattern!r} must be a non-empty string")
        else:
            unknown = sorted(set(self.layer_pattern) - set(LAYER_KINDS))
            if unknown:
                p.append(
                    f"layer_pattern={self.layer_pattern!r} has unknown letter(s) {unknown}; "
                    f"known: {', '.join(f'{k} = {v}' for k, v in LAYER_KINDS.items())}"
                )
        p += validation.divides(self, "num_heads", "d_model")
        if "L" in self.layer_pattern and self.local_block > self.max_len:
            p.append(
                f"local_block={self.local_block} does not fit the sequence (max_len={self.max_len})"
            )
        if "M" in self.layer_pattern and self.compress_stride > self.max_len:
            p.append(
                f"compress_stride={self.compress_stride} does not fit the sequence "
                f"(max_len={self.max_len})"
            )
        p += validation.one_of(self, "remat_policy", REMAT_POLICIES)
        if self.d_model % 2:
            p.append(f"d_model={self.d_model} must be even (sinusoidal positions)")
        p += validation.fractions(self, "dropout", "attn_dropout")
        p += validation.one_of(self, "activation", sorted(ACTIVATIONS))
        return p

    @property
    def num_layers(self) -> int:
        return len(self.layer_pattern)

    @nn.compact
    def __call__(
        self,
        tokens: Array,  # [batch, len] int
        *,
        deterministic: bool = True,
        logits_at: Array | None = None,  # [batch] int: only these positions' logits
    ) -> Array:
        """Logits ``[batch, len, vocab]`` (float32), or ``[batch, vocab]`` at ``logits_at``
        (decoding needs one position per row; the vocabulary projection is the costly part).
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} is longer than max_len={self.max_len}")
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
        # Tied embeddings at std 0.02 are small next to unit sinusoids: scale by sqrt(d) as
        # tensor2tensor does (multiply_embedding_mode="sqrt_depth").
        pos = jnp.asarray(sinusoidal_table(length, self.d_model), self.dtype)  # [len, d]
        x = wte(tokens) * math.sqrt(self.d_model) + pos  # [batch, len, d_model]
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, sh.ACTIVATIONS)
        out_std = self.init_std / math.sqrt(2 * self.num_layers)
        block_cls = remat(Block, self.remat_policy)
        for i, kind in enumerate(self.layer_pattern):
            attn = LongAttention(
                num_heads=self.num_heads,
                kind=kind,
                local_block=self.local_block,
                local_look_back=self.local_look_back,
                compress_kernel=self.compress_kernel,
                compress_stride=self.compress_stride,
                attn_dropout=self.attn_dropout,
                deterministic=deterministic,
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
                activation=self.activation,
                name=f"h_{i}",
                **kw,
            )(x)
            x = nn.with_logical_constraint(x, sh.ACTIVATIONS)
        x = layer_norm("ln_f", eps=self.layer_norm_eps, **kw)(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]  # [batch, d]
        return wte.attend(x).astype(jnp.float32)  # [batch, (len,) vocab]


PRESETS: dict[str, dict[str, Any]] = {
    # Section 4.2.3 / table 4: 5 layers, d = 512 (tensor2tensor transformer_base sizes),
    # local blocks of 256, memory compression 3; L = 11,000 input tokens.
    "t-dmca": dict(layer_pattern="LMLML", num_heads=8, d_model=512, d_ff=2048, max_len=11000),
    "t-d": dict(layer_pattern="DDDDD", num_heads=8, d_model=512, d_ff=2048, max_len=11000),
    # Tiny presets for tests.
    "t-dmca-tiny": dict(
        vocab_size=64,
        max_len=64,
        layer_pattern="LMLML",
        num_heads=2,
        d_model=32,
        d_ff=64,
        local_block=8,
    ),
    "t-d-tiny": dict(
        vocab_size=64, max_len=64, layer_pattern="DDDDD", num_heads=2, d_model=32, d_ff=64
    ),
}


def from_preset(name: str, **overrides: Any) -> LongLM:
    """``LongLM`` from a named preset with field overrides (unknown fields fail)."""
    return presets.build(LongLM, PRESETS, name, **overrides)


# ----------------------------------------------------------------------------- sequences


def make_sequence(
    source: Sequence[int], target: Sequence[int], *, delim_id: int, eos_id: int, seq_len: int
) -> tuple[list[int], int]:
    """``source <delim> target <eos>`` cut to ``seq_len + 1`` tokens; returns it and the
    index of the delimiter.

    The source is truncated first (its beginning kept, as Liu et al. truncate the input to
    its first L tokens); a target that fills ``seq_len - 1`` tokens alone is cut too.
    """
    room = seq_len + 1 - 2  # tokens left for source and target besides delimiter and eos
    if room < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for a source and a target")
    target = list(target)[:room]
    source = list(source)[: room - len(target)]
    return source + [delim_id] + target + [eos_id], len(source)


def make_batch(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    delim_id: int,
    eos_id: int,
    pad_id: int,
    seq_len: int,
) -> dict[str, np.ndarray]:
    """``{"inputs", "targets", "weights"}`` ``[len(pairs), seq_len]`` for the LM loss.

    Row ``r`` is ``make_sequence(*pairs[r])`` shifted by one; ``weights`` is 1 exactly where
    the target token belongs to the output part (the target tokens and the closing eos),
    0 on the source, the delimiter and the padding.
    """
    rows = len(pairs)
    inputs = np.full((rows, seq_len), pad_id, np.int32)
    targets = np.full((rows, seq_len), pad_id, np.int32)
    weights = np.zeros((rows, seq_len), np.float32)
    for r, (src, tgt) in enumerate(pairs):
        seq, delim = make_sequence(src, tgt, delim_id=delim_id, eos_id=eos_id, seq_len=seq_len)
        n = len(seq) - 1
        inputs[r, :n] = seq[:-1]
        targets[r, :n] = seq[1:]
        weights[r, delim:n] = 1.0  # input position p predicts seq[p + 1]; p >= delim
    return {"inputs": inputs, "targets": targets, "weights": weights}


def greedy_decode(
    model: nn.Module,
    variables: Any,
    prompts: Sequence[Sequence[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    seq_len: int,
) -> list[list[int]]:
    """Greedy continuation of each prompt (``source <delim>``), up to ``eos`` or
    ``max_new_tokens`` or ``seq_len`` tokens; returns the new tokens without the eos.
    ``variables`` is ``{"params": ...}``.

    Every step runs the full forward pass on a fixed ``[rows, seq_len]`` buffer (one
    compilation; causality makes the padding after each row's end invisible) and projects
    only each row's last position onto the vocabulary. The local and memory-compressed
    layers have no KV cache here: decoding costs one forward pass per new token, and stops
    once every row has produced its eos.
    """
    rows = len(prompts)
    if rows == 0:
        return []
    tokens = np.full((rows, seq_len), pad_id, np.int32)
    lengths = np.zeros(rows, np.int32)
    for r, p in enumerate(prompts):
        if not 0 < len(p) < seq_len:
            raise ValueError(f"prompt {r} has {len(p)} tokens; it must be in [1, {seq_len})")
        tokens[r, : len(p)] = p
        lengths[r] = len(p)
    out, new_lengths = _greedy(
        model, variables, jnp.asarray(tokens), jnp.asarray(lengths), max_new_tokens, eos_id
    )
    out, new_lengths = np.asarray(out), np.asarray(new_lengths)
    result = []
    for r in range(rows):
        new = out[r, lengths[r] : new_lengths[r]].tolist()
        result.append(new[: new.index(eos_id)] if eos_id in new else new)
    return result


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _greedy(model, variables, tokens, lengths, max_new_tokens, eos_id):
    rows, seq_len = tokens.shape
    idx = jnp.arange(rows)

    def body(carry):
        step, tokens, lengths, done = carry
        last = model.apply(variables, tokens, logits_at=lengths - 1)  # [rows, vocab]
        nxt = jnp.argmax(last, axis=-1).astype(tokens.dtype)
        write = ~done & (lengths < seq_len)
        pos = jnp.minimum(lengths, seq_len - 1)
        tokens = tokens.at[idx, pos].set(jnp.where(write, nxt, tokens[idx, pos]))
        lengths = lengths + write.astype(lengths.dtype)
        done = done | (write & (nxt == eos_id)) | (lengths >= seq_len)
        return step + 1, tokens, lengths, done

    def cond(carry):  # stop after max_new_tokens steps or once every row has ended
        step, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    done = lengths >= seq_len
    _, tokens, lengths, _ = jax.lax.while_loop(cond, body, (0, tokens, lengths, done))
    return tokens, lengths

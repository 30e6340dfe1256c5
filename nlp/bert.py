"""BERT (Devlin et al. 2019): a post-LN Transformer encoder pre-trained with MLM and NSP.

* Input (section 3, figure 2): token + learned position + segment embeddings, summed, then
  LayerNorm and dropout. The first token is ``[CLS]``; segments A and B are separated (and
  ended) by ``[SEP]``.
* Encoder (section 3, "Model Architecture"): the Transformer encoder of Vaswani et al.,
  post-LN (``LN(x + sublayer(x))``), exact (erf) GELU, as the released code; keys at padding
  positions are masked out.
* Pooler: ``tanh(Dense([CLS] state))``, the input of the NSP and classification heads.
* Masked LM head (section 3.1, task #1; appendix A.1): ``Dense -> GELU -> LayerNorm`` then
  the output projection tied to the token embeddings plus a per-token bias.
* Next-sentence head (section 3.1, task #2): ``Dense(2)`` on the pooled ``[CLS]``; class 0 is
  "B follows A" (IsNext), 1 is NotNext, as in the released code and Hugging Face.
* Sequence classification (section 4.1): dropout then ``Dense(num_labels)`` on the pooled
  ``[CLS]`` (``num_labels=0``: no such head, the parameters of ``BertForPreTraining``).

Methods: ``__call__`` (all heads, full-length MLM logits; what ``init`` and the Hugging Face
parity test use), ``encode`` (sequence and pooled states), ``pretrain`` (MLM logits at the
masked positions only, NSP logits) and ``classify`` (class logits).
Presets: ``bert-base`` / ``bert-large`` (section 3: 110M / 340M; exact counts equal Hugging
Face's ``BertForPreTraining``) and ``bert-tiny``, a toy size for tests (not the BERT-Tiny of
Turc et al. 2019).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common import masks, presets, validation
from common import sharding as sh
from common.attention import IMPLEMENTATIONS, MultiHeadAttention
from common.layers import MLP, activation, dense, layer_norm
from common.losses import cross_entropy
from common.positional import LearnedPositional

Array = jax.Array


class EncoderLayer(nn.Module):
    """One post-LN encoder layer: ``x = LN(x + Drop(Attn(x))); x = LN(x + Drop(FFN(x)))``."""

    num_heads: int
    d_ff: int
    dropout: float  # on the residual branches
    attn_dropout: float  # on the attention weights
    layer_norm_eps: float
    activation: str
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, *, deterministic: bool) -> Array:
        # x: [batch, len, d_model]; mask: bool [batch, 1, 1, len], True = real key.
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d_model = x.shape[-1]
        a, _ = MultiHeadAttention(
            num_heads=self.num_heads,
            head_dim=d_model // self.num_heads,
            dropout=self.attn_dropout,
            attention_impl=self.attention_impl,
            name="attn",
            **kw,
        )(x, mask=mask, deterministic=deterministic)  # [batch, len, d_model]
        a = nn.Dropout(self.dropout)(a, deterministic=deterministic)
        x = layer_norm("ln_1", eps=self.layer_norm_eps, **kw)(x + a)
        h = MLP(self.d_ff, activation=self.activation, dropout=self.dropout, name="mlp", **kw)(
            x, deterministic=deterministic
        )  # [batch, len, d_model]
        return layer_norm("ln_2", eps=self.layer_norm_eps, **kw)(x + h)


class Bert(nn.Module):
    """BERT encoder with the pre-training heads (MLM, NSP) and an optional classifier."""

    vocab_size: int = 30522
    max_len: int = 512  # size of the learned position table
    type_vocab_size: int = 2  # segments A and B
    num_layers: int = 12
    num_heads: int = 12
    d_model: int = 768
    d_ff: int = 3072
    dropout: float = 0.1  # embeddings, residual branches and the classifier input
    attn_dropout: float = 0.1  # attention weights
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"  # exact erf GELU, as the released BERT
    num_labels: int = 0  # sequence-classification head on the pooled [CLS]; 0 = none
    attention_impl: str | None = None  # see common.attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        positive = ("vocab_size", "max_len", "type_vocab_size", "num_layers", "num_heads")
        p = validation.positive_ints(self, *positive, "d_model", "d_ff")
        p += validation.divides(self, "num_heads", "d_model")
        p += validation.non_negative_ints(self, "num_labels")
        p += validation.fractions(self, "dropout", "attn_dropout")
        p += validation.one_of(self, "attention_impl", IMPLEMENTATIONS)
        validation.check(self, p)
        activation(self.activation)  # unknown names fail here, not at the first call
        super().__post_init__()

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(0.02)
        self.word_embeddings = nn.Embed(
            self.vocab_size,
            self.d_model,
            embedding_init=nn.with_logical_partitioning(init, (sh.VOCAB, sh.EMBED)),
            **kw,
        )
        self.position_embeddings = LearnedPositional(self.max_len, self.d_model, **kw)
        self.segment_embeddings = nn.Embed(
            self.type_vocab_size,
            self.d_model,
            embedding_init=nn.with_logical_partitioning(init, (None, sh.EMBED)),
            **kw,
        )
        self.embed_ln = layer_norm("embed_ln", eps=self.layer_norm_eps, **kw)
        self.layers = [
            EncoderLayer(
                num_heads=self.num_heads,
                d_ff=self.d_ff,
                dropout=self.dropout,
                attn_dropout=self.attn_dropout,
                layer_norm_eps=self.layer_norm_eps,
                activation=self.activation,
                attention_impl=self.attention_impl,
                name=f"layer_{i}",
                **kw,
            )
            for i in range(self.num_layers)
        ]
        self.pooler = dense(self.d_model, (sh.EMBED, sh.MLP), name="pooler", **kw)
        self.mlm_dense = dense(self.d_model, (sh.EMBED, sh.MLP), name="mlm_dense", **kw)
        self.mlm_ln = layer_norm("mlm_ln", eps=self.layer_norm_eps, **kw)
        self.mlm_bias = self.param(
            "mlm_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (sh.VOCAB,)),
            (self.vocab_size,),
            self.param_dtype,
        )
        self.nsp = dense(2, (sh.EMBED, None), name="nsp", **kw)
        if self.num_labels:
            self.classifier = dense(self.num_labels, (sh.EMBED, None), name="classifier", **kw)
        self.drop = nn.Dropout(self.dropout)

    def encode(
        self,
        tokens: Array,  # [batch, len] int
        segments: Array | None = None,  # [batch, len] int in [0, type_vocab_size); None = 0
        valid: Array | None = None,  # [batch, len] bool/int, 1 = real token; None = all
        *,
        deterministic: bool = True,
    ) -> tuple[Array, Array]:
        """Final hidden states ``[batch, len, d_model]`` and pooled ``[CLS]`` ``[batch, d]``."""
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the model's max_len={self.max_len}")
        if segments is None:
            segments = jnp.zeros_like(tokens)
        x = (
            self.word_embeddings(tokens)
            + self.position_embeddings(jnp.arange(length))
            + self.segment_embeddings(segments)
        )  # [batch, len, d_model]
        x = self.drop(self.embed_ln(x), deterministic=deterministic)
        x = nn.with_logical_constraint(x, sh.ACTIVATIONS)
        mask = None if valid is None else masks.padding_mask(valid.astype(bool))  # [b,1,1,len]
        for layer in self.layers:
            x = layer(x, mask, deterministic=deterministic)
            x = nn.with_logical_constraint(x, sh.ACTIVATIONS)
        pooled = jnp.tanh(self.pooler(x[:, 0]))  # [batch, d_model]
        return x, pooled

    def mlm_logits(self, hidden: Array) -> Array:
        """MLM logits (float32) ``[..., vocab]`` from final hidden states ``[..., d_model]``."""
        h = self.mlm_ln(activation(self.activation)(self.mlm_dense(hidden)))
        logits = self.word_embeddings.attend(h)  # tied output projection
        return logits.astype(jnp.float32) + self.mlm_bias.astype(jnp.float32)

    def __call__(
        self,
        tokens: Array,
        segments: Array | None = None,
        valid: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        """All heads: ``mlm_logits [b, len, vocab]``, ``nsp_logits [b, 2]`` (and
        ``class_logits [b, num_labels]`` when ``num_labels > 0``), all float32."""
        hidden, pooled = self.encode(tokens, segments, valid, deterministic=deterministic)
        out = {
            "mlm_logits": self.mlm_logits(hidden),
            "nsp_logits": self.nsp(pooled).astype(jnp.float32),
        }
        if self.num_labels:
            out["class_logits"] = self._classify_pooled(pooled, deterministic)
        return out

    def pretrain(
        self,
        tokens: Array,
        segments: Array,
        valid: Array,
        mlm_positions: Array,  # [batch, num_predictions] int positions to predict
        *,
        deterministic: bool = True,
    ) -> tuple[Array, Array]:
        """MLM logits at ``mlm_positions`` ``[b, P, vocab]`` and NSP logits ``[b, 2]``.

        Scoring only the chosen positions (as the released code's ``gather_indexes``) saves
        the ``[len, vocab]`` output projection at the 85% of positions that have no target.
        """
        hidden, pooled = self.encode(tokens, segments, valid, deterministic=deterministic)
        picked = jnp.take_along_axis(hidden, mlm_positions[..., None], axis=1)  # [b, P, d]
        return self.mlm_logits(picked), self.nsp(pooled).astype(jnp.float32)

    def classify(
        self,
        tokens: Array,
        segments: Array | None = None,
        valid: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> Array:
        """Class logits ``[batch, num_labels]`` (float32) from the pooled ``[CLS]`` state."""
        if not self.num_labels:
            raise ValueError("classify needs a Bert with num_labels > 0")
        _, pooled = self.encode(tokens, segments, valid, deterministic=deterministic)
        return self._classify_pooled(pooled, deterministic)

    def _classify_pooled(self, pooled: Array, deterministic: bool) -> Array:
        return self.classifier(self.drop(pooled, deterministic=deterministic)).astype(jnp.float32)


_BASE = dict(vocab_size=30522, max_len=512, type_vocab_size=2)
PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": dict(**_BASE, num_layers=12, num_heads=12, d_model=768, d_ff=3072),
    "bert-large": dict(**_BASE, num_layers=24, num_heads=16, d_model=1024, d_ff=4096),
    # Toy size for tests: every code path, seconds to build.
    "bert-tiny": dict(
        vocab_size=128,
        max_len=64,
        type_vocab_size=2,
        num_layers=2,
        num_heads=4,
        d_model=32,
        d_ff=128,
    ),
}


def from_preset(name: str, **overrides: Any) -> Bert:
    """``Bert`` built from a named preset, with field overrides (unknown fields fail)."""
    return presets.build(Bert, PRESETS, name, **overrides)


def example_inputs(batch: int = 1, length: int = 8) -> tuple[Array, Array, Array]:
    """Zero ``(tokens, segments, valid)`` of the given shape, for ``init``."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    return tokens, tokens, jnp.ones((batch, length), jnp.int32)


def pretraining_loss_fn(model: Bert):
    """MLM + NSP loss for ``common.training`` (section 3.1: the sum of the two mean losses).

    ``batch``: ``tokens``, ``segments``, ``valid`` ``[b, len]``; ``mlm_positions``,
    ``mlm_targets``, ``mlm_weights`` ``[b, P]`` (weight 0 = padding slot); ``nsp_labels``
    ``[b]`` (0 = IsNext). Dropout is on. Aux metrics: both losses and both accuracies.
    """

    def loss_fn(params, batch, rng):
        mlm, nsp = model.apply(
            {"params": params},
            batch["tokens"],
            batch["segments"],
            batch["valid"],
            batch["mlm_positions"],
            deterministic=False,
            rngs={"dropout": rng},
            method=Bert.pretrain,
        )
        total, count = cross_entropy(mlm, batch["mlm_targets"], batch["mlm_weights"])
        mlm_loss = total / jnp.maximum(count, 1.0)
        nsp_total, n = cross_entropy(nsp, batch["nsp_labels"])
        nsp_loss = nsp_total / n
        w = batch["mlm_weights"].astype(jnp.float32)
        mlm_acc = jnp.sum((jnp.argmax(mlm, -1) == batch["mlm_targets"]) * w) / jnp.maximum(
            jnp.sum(w), 1.0
        )
        nsp_acc = jnp.mean(jnp.argmax(nsp, -1) == batch["nsp_labels"])
        aux = {"mlm_loss": mlm_loss, "nsp_loss": nsp_loss, "mlm_acc": mlm_acc, "nsp_acc": nsp_acc}
        return mlm_loss + nsp_loss, aux

    return loss_fn


def classification_loss_fn(model: Bert):
    """Cross-entropy of ``classify`` for fine-tuning (section 4.1): ``batch`` has ``tokens``,
    ``segments``, ``valid`` ``[b, len]`` and ``labels`` ``[b]``. Aux metric: accuracy."""

    def loss_fn(params, batch, rng):
        logits = model.apply(
            {"params": params},
            batch["tokens"],
            batch["segments"],
            batch["valid"],
            deterministic=False,
            rngs={"dropout": rng},
            method=Bert.classify,
        )
        total, n = cross_entropy(logits, batch["labels"])
        return total / n, {"acc": jnp.mean(jnp.argmax(logits, -1) == batch["labels"])}

    return loss_fn

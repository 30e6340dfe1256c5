"""Hugging Face BERT checkpoints -> ``nlp.bert.Bert`` params and config.

Supported sources: state dicts of ``BertForPreTraining`` (``bert.*`` + ``cls.predictions.*``
+ ``cls.seq_relationship.*``), and of ``BertModel`` (no ``bert.`` prefix, no heads; the MLM
and NSP heads are then missing, so pass ``heads=False`` and use ``Bert.encode``), including
legacy checkpoints that name LayerNorm parameters ``gamma`` / ``beta``.
torch ``nn.Linear`` stores ``weight`` as ``[out, in]``; our Dense kernels are ``[in, out]``,
and our fused attention kernel is ``[d_model, 3 (q|k|v), heads, head_dim]``.

Usage::

    model = Bert(**bert_config_from_hf(hf_config))        # or a config.json dict
    params = bert_params_from_torch("bert/model.safetensors", model)
    out = model.apply(params, tokens, segments, valid)    # mlm_logits, nsp_logits

The returned params are ``{"params": {...}}`` of numpy arrays in the model's param_dtype.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from common import convert
from nlp.bert import Bert, example_inputs

# Non-persistent buffers some checkpoints carry.
BUFFER_KEYS = (r"(^|\.)position_ids$", r"(^|\.)token_type_ids$")


def bert_config_from_hf(hf_config: Any) -> dict[str, Any]:
    """``Bert`` field values for a ``BertConfig`` (or its config.json dict).

    Raises ``ValueError`` for options ``Bert`` does not implement: relative position
    embeddings, decoder / cross-attention use, activations we lack, untied word embeddings.
    """
    model_type = convert.config_get(hf_config, "model_type")
    if model_type != "bert":
        raise ValueError(f"unsupported model_type {model_type!r}: expected 'bert'")
    problems = []
    act = convert.config_get(hf_config, "hidden_act", "gelu")
    if act not in convert.HF_ACTIVATIONS:
        problems.append(f"hidden_act {act!r} (supported: {sorted(convert.HF_ACTIVATIONS)})")
    pos = convert.config_get(hf_config, "position_embedding_type", "absolute")
    if pos != "absolute":
        problems.append(f"position_embedding_type={pos!r}")
    for name in ("is_decoder", "add_cross_attention"):
        if convert.config_get(hf_config, name, False):
            problems.append(f"{name}=True")
    if not convert.config_get(hf_config, "tie_word_embeddings", True):
        problems.append("tie_word_embeddings=False")
    if problems:
        raise ValueError("unsupported bert config: " + "; ".join(problems))
    return dict(
        vocab_size=convert.config_get(hf_config, "vocab_size"),
        max_len=convert.config_get(hf_config, "max_position_embeddings"),
        type_vocab_size=convert.config_get(hf_config, "type_vocab_size", 2),
        num_layers=convert.config_get(hf_config, "num_hidden_layers"),
        num_heads=convert.config_get(hf_config, "num_attention_heads"),
        d_model=convert.config_get(hf_config, "hidden_size"),
        d_ff=convert.config_get(hf_config, "intermediate_size"),
        dropout=convert.config_get(hf_config, "hidden_dropout_prob", 0.1),
        attn_dropout=convert.config_get(hf_config, "attention_probs_dropout_prob", 0.1),
        layer_norm_eps=convert.config_get(hf_config, "layer_norm_eps", 1e-12),
        activation=convert.HF_ACTIVATIONS[act],
    )


def _legacy_renamed(key: str) -> str:
    """``LayerNorm.gamma`` / ``LayerNorm.beta`` (the original Google checkpoints, e.g. the
    first bert-base-uncased pytorch_model.bin) -> ``weight`` / ``bias``, as HF renames on load."""
    for old, new in (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")):
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def bert_params_from_torch(
    state_dict: str | os.PathLike | Mapping[str, Any],
    model: Bert,
    *,
    heads: bool = True,
    allow_unused: Iterable[str] = (),
) -> dict[str, Any]:
    """Params for ``model`` from a HF ``BertForPreTraining`` (or ``BertModel``) state dict.

    ``heads=False`` converts only the encoder and pooler (a ``BertModel`` checkpoint, whose
    keys get the ``bert.`` prefix when none has it); the result then lacks the MLM / NSP
    leaves, so it is checked against the encoder's leaves only (from a ``BertForPreTraining``
    dict, pass ``allow_unused=(r"^cls\\.",)``). Legacy ``LayerNorm.gamma`` / ``beta`` names
    are read as ``weight`` / ``bias``, as Hugging Face does. A ``model`` with
    ``num_labels > 0`` gets no classifier from here: initialise it and merge. Unused keys
    raise unless they are buffers or match ``allow_unused``.
    """
    if model.num_labels:
        raise ValueError(
            "convert into a Bert with num_labels=0 (the checkpoint has no classifier), then "
            "add the freshly initialised classifier params"
        )
    sd = {_legacy_renamed(k): v for k, v in convert.load_state_dict(source=state_dict).items()}
    if not heads and not any(k.startswith("bert.") for k in sd):  # a bare BertModel dict
        sd = {f"bert.{k}": v for k, v in sd.items()}
    sd = convert.StateDict(sd, what="bert state dict")
    d, h, ff, L, V = model.d_model, model.num_heads, model.d_ff, model.num_layers, model.vocab_size
    e, enc = "bert.embeddings.", "bert.encoder.layer."

    layer_parts = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    ]
    needed = [
        e + n
        for n in (
            "word_embeddings.weight",
            "position_embeddings.weight",
            "token_type_embeddings.weight",
            "LayerNorm.weight",
            "LayerNorm.bias",
        )
    ]
    needed += [
        f"{enc}{i}.{p}.{w}" for i in range(L) for p in layer_parts for w in ("weight", "bias")
    ]
    needed += ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    if heads:
        needed += [
            "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.bias",
            "cls.seq_relationship.weight",
            "cls.seq_relationship.bias",
        ]
    sd.require(needed)

    wte = sd.take(e + "word_embeddings.weight", (V, d))
    flat: dict[str, Any] = {
        "word_embeddings/embedding": wte,
        "position_embeddings/embedding": sd.take(
            e + "position_embeddings.weight", (model.max_len, d)
        ),
        "segment_embeddings/embedding": sd.take(
            e + "token_type_embeddings.weight", (model.type_vocab_size, d)
        ),
    }
    flat.update({f"embed_ln/{k}": v for k, v in sd.layer_norm(e + "LayerNorm", d).items()})
    for i in range(L):
        p = f"{enc}{i}."
        q, k, v = (sd.linear(p + f"attention.self.{n}", d, d) for n in ("query", "key", "value"))
        out = sd.linear(p + "attention.output.dense", d, d)
        layer = {
            "attn": convert.attention_params(q, k, v, out, h),
            "ln_1": sd.layer_norm(p + "attention.output.LayerNorm", d),
            "mlp": {
                "fc": sd.linear(p + "intermediate.dense", d, ff),
                "proj": sd.linear(p + "output.dense", ff, d),
            },
            "ln_2": sd.layer_norm(p + "output.LayerNorm", d),
        }
        flat.update({f"layer_{i}/{k}": v for k, v in convert.flatten(layer).items()})
    flat.update({f"pooler/{k}": v for k, v in sd.linear("bert.pooler.dense", d, d).items()})

    if heads:
        flat.update(
            {
                f"mlm_dense/{k}": v
                for k, v in sd.linear("cls.predictions.transform.dense", d, d).items()
            }
        )
        mlm_ln = sd.layer_norm("cls.predictions.transform.LayerNorm", d)
        flat.update({f"mlm_ln/{k}": v for k, v in mlm_ln.items()})
        bias = sd.take("cls.predictions.bias", (V,))
        flat["mlm_bias"] = bias
        flat.update({f"nsp/{k}": v for k, v in sd.linear("cls.seq_relationship", d, 2).items()})
        # The decoder is tied to the word embeddings (and its bias to cls.predictions.bias)
        # in every released checkpoint; an untied copy cannot be represented, so refuse it.
        for key, tied in (
            ("cls.predictions.decoder.weight", wte),
            ("cls.predictions.decoder.bias", bias),
        ):
            if key in sd and not np.array_equal(sd.take(key, tied.shape), tied):
                raise ValueError(f"bert state dict has a {key} that differs from its tied tensor")
    sd.check_all_used([*BUFFER_KEYS, *allow_unused])

    expected = convert.abstract_params(model.init, jax.random.key(0), *example_inputs())
    if not heads:
        head_leaves = ("mlm_dense/", "mlm_ln/", "mlm_bias", "nsp/")
        expected = {k: s for k, s in expected.items() if not k.startswith(head_leaves)}
    convert.check_params(flat, expected, what="params converted from the bert state dict")
    return {"params": convert.unflatten(convert.cast_like(flat, expected))}

"""Hugging Face GPT-1 / GPT-2 checkpoints -> ``nlp.gpt.GPT`` params and config.

Supported sources: state dicts of ``GPT2LMHeadModel`` / ``GPT2Model`` (keys with or without
the ``transformer.`` prefix, i.e. also the original ``gpt2`` hub files) and of
``OpenAIGPTLMHeadModel`` / ``OpenAIGPTModel``. Both use ``Conv1D`` layers whose weight is
``[in, out]`` (the layout of our Dense kernels), and pack q|k|v along the output axis of
``c_attn``, each part split into heads as ``[head, head_dim]``.

Usage::

    model = GPT(**gpt_config_from_hf(hf_config))          # or a config.json dict
    params = gpt2_params_from_torch("gpt2/model.safetensors", model)
    logits = model.apply(params, tokens)

The returned params are ``{"params": {...}}`` of plain numpy arrays in the model's
``param_dtype`` (place them with ``jax.device_put`` and a sharding as needed).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import convert
from nlp.gpt import GPT

# Non-persistent buffers that old checkpoints still carry: the causal-mask table
# (``attn.bias``), GPT-2's ``attn.masked_bias`` constant and ``position_ids``.
BUFFER_KEYS = (r"(^|\.)attn\.bias$", r"(^|\.)attn\.masked_bias$", r"(^|\.)position_ids$")

# Names of the HF modules, per family. Layer ``i`` lives under ``h.{i}.``.
_NAMES = {
    "gpt2": dict(wte="wte", wpe="wpe", ln_f="ln_f"),
    "openai-gpt": dict(wte="tokens_embed", wpe="positions_embed", ln_f=None),
}

# OpenAI GPT uses its own ACT_FNS, where "gelu" is the tanh approximation (``gelu_new``),
# as in the original GPT-1 code; GPT-2 uses transformers' ACT2FN (``convert.HF_ACTIVATIONS``).
_OPENAI_GPT_ACTIVATIONS = {"gelu": "gelu_tanh", "relu": "relu"}


def gpt_config_from_hf(hf_config: Any) -> dict[str, Any]:
    """``GPT`` field values for a ``GPT2Config`` / ``OpenAIGPTConfig`` (or config.json dict).

    Raises ``ValueError`` naming the missing size fields (``vocab_size``, ``n_positions``,
    ``n_layer``, ``n_head``, ``n_embd``) of an incomplete config, and for options our GPT
    does not implement (unscaled or layer-scaled
    attention, reordered/upcast attention, cross-attention, untied output embeddings,
    activations we lack). Dropout rates are mapped but only matter for training; GPT uses one
    rate for embeddings and residual branches (``resid_pdrop``).
    """
    model_type = convert.config_get(hf_config, "model_type")
    if model_type not in _NAMES:
        raise ValueError(f"unsupported model_type {model_type!r}: expected 'gpt2' or 'openai-gpt'")
    sizes = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")
    missing = [k for k in sizes if convert.config_get(hf_config, k) is None]
    if missing:
        raise ValueError(f"{model_type} config lacks the size field(s) {', '.join(missing)}")
    d_model = convert.config_get(hf_config, "n_embd")
    problems = []
    if model_type == "gpt2":
        for name, bad in (
            ("scale_attn_weights", False),
            ("scale_attn_by_inverse_layer_idx", True),
            ("reorder_and_upcast_attn", True),
            ("add_cross_attention", True),
        ):
            if convert.config_get(hf_config, name, not bad) == bad:
                problems.append(f"{name}={bad}")
        act_name, table = (
            convert.config_get(hf_config, "activation_function", "gelu_new"),
            convert.HF_ACTIVATIONS,
        )
        d_ff = convert.config_get(hf_config, "n_inner") or 4 * d_model
    else:
        act_name, table = convert.config_get(hf_config, "afn", "gelu"), _OPENAI_GPT_ACTIVATIONS
        d_ff = 4 * d_model
    if act_name not in table:
        problems.append(f"activation {act_name!r} (supported: {sorted(table)})")
    if not convert.config_get(hf_config, "tie_word_embeddings", True):
        problems.append("tie_word_embeddings=False")
    if problems:
        raise ValueError(f"unsupported {model_type} config: " + "; ".join(problems))
    return dict(
        vocab_size=convert.config_get(hf_config, "vocab_size"),
        max_len=convert.config_get(hf_config, "n_positions"),
        num_layers=convert.config_get(hf_config, "n_layer"),
        num_heads=convert.config_get(hf_config, "n_head"),
        d_model=d_model,
        d_ff=d_ff,
        pre_norm=model_type == "gpt2",
        dropout=convert.config_get(hf_config, "resid_pdrop", 0.1),
        attn_dropout=convert.config_get(hf_config, "attn_pdrop", 0.1),
        layer_norm_eps=convert.config_get(hf_config, "layer_norm_epsilon", 1e-5),
        activation=table[act_name],
        scaled_residual_init=model_type == "gpt2",
        attention="dense",
    )


def gpt2_params_from_torch(
    state_dict: str | os.PathLike | Mapping[str, Any],
    model: GPT,
    *,
    allow_unused: Iterable[str] = (),
) -> dict[str, Any]:
    """Params for ``model`` (pre-LN, dense) from a HF ``GPT2LMHeadModel``/``GPT2Model`` dict.

    ``state_dict`` is a mapping of numpy arrays / torch tensors or a checkpoint path (see
    ``common.convert.load_state_dict``). Keys the conversion does not use raise a
    ``ValueError`` unless they are mask buffers or match an ``allow_unused`` regex.
    """
    return _convert(state_dict, model, "gpt2", allow_unused)


def openai_gpt_params_from_torch(
    state_dict: str | os.PathLike | Mapping[str, Any],
    model: GPT,
    *,
    allow_unused: Iterable[str] = (),
) -> dict[str, Any]:
    """Params for ``model`` (post-LN, ``pre_norm=False``) from a HF ``OpenAIGPTLMHeadModel``."""
    return _convert(state_dict, model, "openai-gpt", allow_unused)


def _convert(source: Any, model: GPT, family: str, allow_unused: Iterable[str]) -> dict:
    pre_norm = family == "gpt2"
    if model.pre_norm != pre_norm or model.attention != "dense":
        raise ValueError(
            f"a {family} checkpoint needs GPT(pre_norm={pre_norm}, attention='dense'); got "
            f"pre_norm={model.pre_norm}, attention={model.attention!r}"
        )
    names = _NAMES[family]
    sd = convert.load_state_dict(source)
    sd = convert.StateDict(convert.strip_prefix(sd, "transformer."), what=f"{family} state dict")
    d, h, ff, L = model.d_model, model.num_heads, model.d_ff, model.num_layers
    dh = d // h

    needed = [f"{names['wte']}.weight", f"{names['wpe']}.weight"]
    layer_parts = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    needed += [f"h.{i}.{p}.{w}" for i in range(L) for p in layer_parts for w in ("weight", "bias")]
    if names["ln_f"]:
        needed += [f"{names['ln_f']}.weight", f"{names['ln_f']}.bias"]
    sd.require(needed)

    wte = sd.take(f"{names['wte']}.weight", (model.vocab_size, d))
    flat: dict[str, Any] = {
        "wte/embedding": wte,
        "wpe/embedding": sd.take(f"{names['wpe']}.weight", (model.max_len, d)),
    }
    for i in range(L):
        p = f"h.{i}."
        layer = {
            "ln_1": sd.layer_norm(p + "ln_1", d),
            "ln_2": sd.layer_norm(p + "ln_2", d),
            "attn": {
                "qkv": {
                    # Conv1D [d, 3d], output = q | k | v, each [heads, head_dim].
                    "kernel": sd.take(p + "attn.c_attn.weight", (d, 3 * d)).reshape(d, 3, h, dh),
                    "bias": sd.take(p + "attn.c_attn.bias", (3 * d,)).reshape(3, h, dh),
                },
                "out": {
                    # Conv1D [d, d], input = merged heads [heads, head_dim].
                    "kernel": sd.take(p + "attn.c_proj.weight", (d, d)).reshape(h, dh, d),
                    "bias": sd.take(p + "attn.c_proj.bias", (d,)),
                },
            },
            "mlp": {
                "fc": {
                    "kernel": sd.take(p + "mlp.c_fc.weight", (d, ff)),
                    "bias": sd.take(p + "mlp.c_fc.bias", (ff,)),
                },
                "proj": {
                    "kernel": sd.take(p + "mlp.c_proj.weight", (ff, d)),
                    "bias": sd.take(p + "mlp.c_proj.bias", (d,)),
                },
            },
        }
        flat.update({f"h_{i}/{k}": v for k, v in convert.flatten(layer).items()})
    if names["ln_f"]:
        flat.update({f"ln_f/{k}": v for k, v in sd.layer_norm(names["ln_f"], d).items()})

    # The LM head is tied to the token embedding in our GPT (and in every released
    # checkpoint); an untied head cannot be represented, so refuse it instead of dropping it.
    if "lm_head.weight" in sd:
        head = sd.take("lm_head.weight", (model.vocab_size, d))
        if not np.array_equal(head, wte):
            raise ValueError(
                f"{family} state dict has an lm_head.weight that differs from "
                f"{names['wte']}.weight; GPT ties its output embedding"
            )
    sd.check_all_used([*BUFFER_KEYS, *allow_unused])

    expected = convert.abstract_params(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    convert.check_params(flat, expected, what=f"params converted from the {family} state dict")
    return {"params": convert.unflatten(convert.cast_like(flat, expected))}

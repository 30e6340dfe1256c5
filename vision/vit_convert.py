"""Hugging Face ViT checkpoints -> ``vision.vit.ViT`` params and config.

Supported sources: state dicts of ``ViTForImageClassification`` (keys under ``vit.`` plus
``classifier.``) and ``ViTModel`` (no prefix, optional ``pooler.dense``), in both key
layouts: transformers 5 (``layers.{i}.attention.q_proj``, ``mlp.fc1`` ...) and the layout
of the checkpoints on the hub / transformers 4 (``encoder.layer.{i}.attention.attention.query``,
``intermediate.dense`` ...), which is renamed to the first one here as transformers 5 does
on load.

Usage::

    model = ViT(**vit_config_from_hf(hf_model.config))   # ViTForImageClassification
    params = vit_params_from_torch(hf_model.state_dict(), model)
    logits = model.apply(params, images_nhwc)

The returned params are ``{"params": {...}}`` of plain numpy arrays in the model's
``param_dtype``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from common import convert
from vision.vit import ViT, example_images

# transformers 4 / hub key layout -> transformers 5 (applied in order, like HF's own mapping).
LEGACY_RENAMES = (
    (r"(^|\.)encoder\.layer\.", r"\1layers."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)


def rename_legacy_keys(state_dict: Mapping[str, Any], renames=LEGACY_RENAMES) -> dict[str, Any]:
    """Keys in the hub / transformers 4 layout renamed to the transformers 5 layout."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def vit_config_from_hf(
    hf_config: Any, *, with_head: bool = True, with_pooler: bool = False
) -> dict[str, Any]:
    """``ViT`` field values for a ``ViTConfig`` (or config.json dict).

    ``with_head``: a ``ViTForImageClassification`` (``num_classes = num_labels``), else a
    headless ``ViTModel`` (``num_classes = 0``). ``with_pooler``: keep ``ViTModel``'s pooler
    (dense + tanh on the class token) as ``representation_size``.
    """
    problems = []
    act = convert.config_get(hf_config, "hidden_act", "gelu")
    if act not in convert.HF_ACTIVATIONS:
        problems.append(f"hidden_act {act!r} (supported: {sorted(convert.HF_ACTIVATIONS)})")
    if not convert.config_get(hf_config, "qkv_bias", True):
        problems.append("qkv_bias=False")
    if with_pooler and convert.config_get(hf_config, "pooler_act", "tanh") != "tanh":
        problems.append(f"pooler_act={convert.config_get(hf_config, 'pooler_act')!r}")
    d_model = convert.config_get(hf_config, "hidden_size", 768)
    heads = convert.config_get(hf_config, "num_attention_heads", 12)
    head_dim = convert.config_get(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * heads != d_model:
        problems.append(f"head_dim={head_dim} x {heads} heads != hidden_size={d_model}")
    if problems:
        raise ValueError("unsupported ViT config: " + "; ".join(problems))
    image_size = convert.config_get(hf_config, "image_size", 224)
    patch = convert.config_get(hf_config, "patch_size", 16)
    if not isinstance(patch, int):
        if patch[0] != patch[1]:
            raise ValueError(f"unsupported ViT config: non-square patch_size {patch}")
        patch = patch[0]
    return dict(
        num_classes=convert.config_get(hf_config, "num_labels", 2) if with_head else 0,
        image_size=image_size if isinstance(image_size, int) else tuple(image_size),
        patch_size=patch,
        num_channels=convert.config_get(hf_config, "num_channels", 3),
        num_layers=convert.config_get(hf_config, "num_hidden_layers", 12),
        num_heads=heads,
        d_model=d_model,
        d_ff=convert.config_get(hf_config, "intermediate_size", 3072),
        pool="token",
        representation_size=(
            (convert.config_get(hf_config, "pooler_output_size", None) or d_model)
            if with_pooler
            else None
        ),
        dropout=convert.config_get(hf_config, "hidden_dropout_prob", 0.0),
        attn_dropout=convert.config_get(hf_config, "attention_probs_dropout_prob", 0.0),
        layer_norm_eps=convert.config_get(hf_config, "layer_norm_eps", 1e-12),
        activation=convert.HF_ACTIVATIONS[act],
    )


def vit_params_from_torch(
    state_dict: str | os.PathLike | Mapping[str, Any],
    model: ViT,
    *,
    allow_unused: Iterable[str] = (),
) -> dict[str, Any]:
    """Params for ``model`` from a HF ``ViTForImageClassification`` / ``ViTModel`` state dict.

    ``state_dict`` is a mapping of numpy arrays / torch tensors or a checkpoint path (see
    ``common.convert.load_state_dict``). The model's head must match the checkpoint:
    ``num_classes > 0`` needs ``classifier.*``; ``representation_size`` needs
    ``pooler.dense.*``. Keys the conversion does not use (a pooler the model lacks, a mask
    token) raise a ``ValueError`` unless they match an ``allow_unused`` regex.
    """
    if model.pool != "token":
        raise ValueError(f"a HF ViT checkpoint needs ViT(pool='token'), got pool={model.pool!r}")
    sd = convert.load_state_dict(state_dict)
    sd = convert.strip_prefix(rename_legacy_keys(sd), "vit.")
    sd = convert.StateDict(sd, what="ViT state dict")
    d, h, ff, L = model.d_model, model.num_heads, model.d_ff, model.num_layers
    p, c = model.patch_size, model.num_channels
    gh, gw = model.grid_size

    needed = [
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias",
        "layernorm.weight",
        "layernorm.bias",
    ]
    parts = [
        "layernorm_before",
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.o_proj",
        "layernorm_after",
        "mlp.fc1",
        "mlp.fc2",
    ]
    needed += [f"layers.{i}.{q}.{w}" for i in range(L) for q in parts for w in ("weight", "bias")]
    if model.representation_size is not None:
        needed += ["pooler.dense.weight", "pooler.dense.bias"]
    if model.num_classes:
        needed += ["classifier.weight", "classifier.bias"]
    sd.require(needed)

    proj = sd.take("embeddings.patch_embeddings.projection.weight", (d, c, p, p))
    flat: dict[str, Any] = {
        "cls": sd.take("embeddings.cls_token", (1, 1, d)),
        "pos_embedding": sd.take("embeddings.position_embeddings", (1, 1 + gh * gw, d)),
        # torch conv [out, in, kh, kw] -> flax [kh, kw, in, out]
        "patch_embed/kernel": proj.transpose(2, 3, 1, 0),
        "patch_embed/bias": sd.take("embeddings.patch_embeddings.projection.bias", (d,)),
    }
    flat.update({f"norm/{k}": v for k, v in sd.layer_norm("layernorm", d).items()})
    for i in range(L):
        pre = f"layers.{i}."
        q, k, v, o = (sd.linear(pre + f"attention.{n}_proj", d, d) for n in "qkvo")
        layer = {
            "ln_1": sd.layer_norm(pre + "layernorm_before", d),
            "ln_2": sd.layer_norm(pre + "layernorm_after", d),
            "attn": convert.attention_params(q, k, v, o, h),
            "mlp": {
                "fc": sd.linear(pre + "mlp.fc1", d, ff),
                "proj": sd.linear(pre + "mlp.fc2", ff, d),
            },
        }
        flat.update({f"block_{i}/{k}": v for k, v in convert.flatten(layer).items()})
    head_in = d
    if model.representation_size is not None:
        r = model.representation_size
        flat.update({f"pre_logits/{k}": v for k, v in sd.linear("pooler.dense", d, r).items()})
        head_in = r
    if model.num_classes:
        cls_head = sd.linear("classifier", head_in, model.num_classes)
        flat.update({f"head/{k}": v for k, v in cls_head.items()})
    sd.check_all_used(allow_unused)

    expected = convert.abstract_params(
        model.init, jax.random.key(0), jnp.zeros(example_images(model).shape, jnp.float32)
    )
    convert.check_params(flat, expected, what="params converted from the ViT state dict")
    return {"params": convert.unflatten(convert.cast_like(flat, expected))}

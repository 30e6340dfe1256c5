"""Hugging Face CLIP checkpoints -> ``vision.clip.CLIP`` params and config.

Supported source: the state dict of ``transformers.CLIPModel`` (keys ``vision_model.*``,
``text_model.*``, ``visual_projection.weight``, ``text_projection.weight``,
``logit_scale``), the same layout as the ``openai/clip-vit-*`` checkpoints on the hub, in a
``.safetensors`` / torch file, a model directory or an in-memory mapping. The
``position_ids`` buffers older checkpoints saved are ignored.

Usage::

    model = CLIP(**clip_config_from_hf(hf_model.config))
    params = clip_params_from_torch(hf_model.state_dict(), model)
    out = model.apply(params, images_nhwc, input_ids)   # logits_per_image, ...

The returned params are ``{"params": {...}}`` of plain numpy arrays in the model's
``param_dtype``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import convert
from vision.clip import CLIP, example_inputs

DEFAULT_ALLOW_UNUSED = (r"(^|\.)position_ids$",)  # non-persistent buffers of old checkpoints


def clip_config_from_hf(hf_config: Any) -> dict[str, Any]:
    """``CLIP`` field values for a ``CLIPConfig`` (or its config.json dict).

    HF's text pooling rule is kept: ``eos_token_id == 2`` (configs written before
    transformers PR #24773) means "position of the largest id" (our ``eos_token_id=None``).
    Raises ``ValueError`` for what ``CLIP`` cannot express (different activations or
    LayerNorm epsilons in the two towers, an unknown activation, non-square images).
    """
    text = convert.config_get(hf_config, "text_config")
    vision = convert.config_get(hf_config, "vision_config")
    if text is None or vision is None:
        raise ValueError("a CLIPConfig needs text_config and vision_config")
    get_t = lambda name, default=None: convert.config_get(text, name, default)
    get_v = lambda name, default=None: convert.config_get(vision, name, default)
    problems = []
    act_t, act_v = get_t("hidden_act", "quick_gelu"), get_v("hidden_act", "quick_gelu")
    if act_t != act_v:
        problems.append(f"hidden_act differs between text ({act_t!r}) and vision ({act_v!r})")
    if act_t not in convert.HF_ACTIVATIONS:
        problems.append(f"hidden_act {act_t!r} (supported: {sorted(convert.HF_ACTIVATIONS)})")
    eps_t, eps_v = get_t("layer_norm_eps", 1e-5), get_v("layer_norm_eps", 1e-5)
    if eps_t != eps_v:
        problems.append(f"layer_norm_eps differs between text ({eps_t}) and vision ({eps_v})")
    image_size = get_v("image_size", 224)
    if not isinstance(image_size, int):
        problems.append(f"image_size {image_size!r} is not one square side")
    if problems:
        raise ValueError("CLIP cannot represent this Hugging Face config: " + "; ".join(problems))
    eos = get_t("eos_token_id", 49407)
    return dict(
        image_size=image_size,
        patch_size=get_v("patch_size", 32),
        num_channels=get_v("num_channels", 3),
        vision_layers=get_v("num_hidden_layers", 12),
        vision_heads=get_v("num_attention_heads", 12),
        vision_d_model=get_v("hidden_size", 768),
        vision_d_ff=get_v("intermediate_size", 3072),
        vocab_size=get_t("vocab_size", 49408),
        context_length=get_t("max_position_embeddings", 77),
        text_layers=get_t("num_hidden_layers", 12),
        text_heads=get_t("num_attention_heads", 8),
        text_d_model=get_t("hidden_size", 512),
        text_d_ff=get_t("intermediate_size", 2048),
        eos_token_id=None if eos == 2 else eos,
        projection_dim=convert.config_get(hf_config, "projection_dim", 512),
        activation=convert.HF_ACTIVATIONS[act_t],
        layer_norm_eps=eps_t,
        logit_scale_init=convert.config_get(hf_config, "logit_scale_init_value", 2.6592),
    )


def clip_params_from_torch(
    source: str | os.PathLike | Mapping[str, Any],
    model: CLIP,
    *,
    allow_unused: Iterable[str] = DEFAULT_ALLOW_UNUSED,
) -> dict[str, Any]:
    """Converts a ``CLIPModel`` state dict (or checkpoint path) for ``model``.

    Raises ``ValueError`` naming missing keys, wrongly shaped tensors and keys the
    conversion does not use (``allow_unused``: regular expressions of keys to ignore).
    """
    sd = convert.StateDict(convert.load_state_dict(source), what="CLIP state dict")
    proj = model.projection_dim
    L_v, L_t = model.vision_layers, model.text_layers
    dv, dt = model.vision_d_model, model.text_d_model
    p, c = model.patch_size, model.num_channels
    n_pos = 1 + (model.image_size // p) ** 2

    parts = [
        "layer_norm1",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    ]
    needed = [
        "logit_scale",
        "visual_projection.weight",
        "text_projection.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.pre_layrnorm.weight",
        "vision_model.pre_layrnorm.bias",
        "vision_model.post_layernorm.weight",
        "vision_model.post_layernorm.bias",
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    ]
    for tower, n in (("vision_model", L_v), ("text_model", L_t)):
        needed += [
            f"{tower}.encoder.layers.{i}.{q}.{w}"
            for i in range(n)
            for q in parts
            for w in ("weight", "bias")
        ]
    sd.require(needed)

    def blocks(tower: str, n: int, d: int, h: int, ff: int) -> dict[str, np.ndarray]:
        out = {}
        for i in range(n):
            pre = f"{tower}.encoder.layers.{i}."
            q, k, v = (sd.linear(pre + f"self_attn.{x}_proj", d, d) for x in "qkv")
            o = sd.linear(pre + "self_attn.out_proj", d, d)
            layer = {
                "ln_1": sd.layer_norm(pre + "layer_norm1", d),
                "ln_2": sd.layer_norm(pre + "layer_norm2", d),
                "attn": convert.attention_params(q, k, v, o, h),
                "mlp": {
                    "fc": sd.linear(pre + "mlp.fc1", d, ff),
                    "proj": sd.linear(pre + "mlp.fc2", ff, d),
                },
            }
            out.update({f"block_{i}/{key}": val for key, val in convert.flatten(layer).items()})
        return out

    patch = sd.take("vision_model.embeddings.patch_embedding.weight", (dv, c, p, p))
    vision: dict[str, Any] = {
        # torch conv [out, in, kh, kw] -> flax [kh, kw, in, out]
        "patch_embed/kernel": patch.transpose(2, 3, 1, 0),
        "cls": sd.take("vision_model.embeddings.class_embedding", (dv,)),
        "pos_embedding": sd.take("vision_model.embeddings.position_embedding.weight", (n_pos, dv)),
        **{f"ln_pre/{k}": v for k, v in sd.layer_norm("vision_model.pre_layrnorm", dv).items()},
        **{f"ln_post/{k}": v for k, v in sd.layer_norm("vision_model.post_layernorm", dv).items()},
        **blocks("vision_model", L_v, dv, model.vision_heads, model.vision_d_ff),
    }
    text: dict[str, Any] = {
        "token_embed/embedding": sd.take(
            "text_model.embeddings.token_embedding.weight", (model.vocab_size, dt)
        ),
        "pos_embedding": sd.take(
            "text_model.embeddings.position_embedding.weight", (model.context_length, dt)
        ),
        **{f"ln_final/{k}": v for k, v in sd.layer_norm("text_model.final_layer_norm", dt).items()},
        **blocks("text_model", L_t, dt, model.text_heads, model.text_d_ff),
    }
    flat: dict[str, Any] = {
        **{f"vision/{k}": v for k, v in vision.items()},
        **{f"text/{k}": v for k, v in text.items()},
        "visual_projection/kernel": sd.take("visual_projection.weight", (proj, dv)).T,
        "text_projection/kernel": sd.take("text_projection.weight", (proj, dt)).T,
        "logit_scale": sd.take("logit_scale", ()),
    }
    sd.check_all_used(allow_unused)

    images, tokens = example_inputs(model)
    expected = convert.abstract_params(
        model.init,
        jax.random.key(0),
        jnp.zeros(images.shape, jnp.float32),
        jnp.zeros(tokens.shape, jnp.int32),
    )
    convert.check_params(flat, expected, what="params converted from the CLIP state dict")
    return {"params": convert.unflatten(convert.cast_like(flat, expected))}

"""Hugging Face Swin checkpoints -> ``vision.swin.Swin`` params and config.

Supported sources: state dicts of ``SwinForImageClassification`` (keys under ``swin.`` plus
``classifier.``) and ``SwinModel`` (no prefix), in both key layouts: transformers 5
(``attention.q_proj``, ``attention.relative_position_bias.relative_position_bias_table``,
``mlp.fc1`` ...) and the layout of the checkpoints on the hub / transformers 4
(``attention.self.query``, ``attention.self.relative_position_bias_table``,
``intermediate.dense`` ...; their persistent ``relative_position_index`` buffers are checked
against ours and dropped).

Usage::

    model = Swin(**swin_config_from_hf(hf_model.config))  # SwinForImageClassification
    params = swin_params_from_torch(hf_model.state_dict(), model)
    logits = model.apply(params, images_nhwc)

Hugging Face's embedding and patch-merging LayerNorms always use eps 1e-5 whatever
``layer_norm_eps`` says; ``Swin`` uses one eps everywhere, so configs with another eps are
refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import convert
from vision.swin import Swin, example_images, relative_position_index
from vision.vit_convert import rename_legacy_keys

# transformers 4 / hub key layout -> transformers 5 (the renames transformers 5 applies).
LEGACY_RENAMES = (
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (
        r"\.attention\.self\.relative_position_bias_table$",
        ".attention.relative_position_bias.relative_position_bias_table",
    ),
    (
        r"\.attention\.self\.relative_position_index$",
        ".attention.relative_position_bias.relative_position_index",
    ),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)


def swin_config_from_hf(hf_config: Any, *, with_head: bool = True) -> dict[str, Any]:
    """``Swin`` field values for a ``SwinConfig`` (or config.json dict).

    ``with_head``: a ``SwinForImageClassification`` (``num_classes = num_labels``), else a
    headless ``SwinModel`` (``num_classes = 0``).
    """
    problems = []
    act = convert.config_get(hf_config, "hidden_act", "gelu")
    if act not in convert.HF_ACTIVATIONS:
        problems.append(f"hidden_act {act!r} (supported: {sorted(convert.HF_ACTIVATIONS)})")
    if not convert.config_get(hf_config, "qkv_bias", True):
        problems.append("qkv_bias=False")
    if convert.config_get(hf_config, "use_absolute_embeddings", False):
        problems.append("use_absolute_embeddings=True")
    eps = convert.config_get(hf_config, "layer_norm_eps", 1e-5)
    if eps != 1e-5:
        problems.append(f"layer_norm_eps={eps} (HF's patch/merge norms use 1e-5)")
    patch = convert.config_get(hf_config, "patch_size", 4)
    if not isinstance(patch, int):
        if patch[0] != patch[1]:
            problems.append(f"non-square patch_size {patch}")
        patch = patch[0]
    image_size = convert.config_get(hf_config, "image_size", 224)
    if not isinstance(image_size, int):
        image_size = image_size[0]
    if problems:
        raise ValueError("unsupported Swin config: " + "; ".join(problems))
    return dict(
        num_classes=convert.config_get(hf_config, "num_labels", 2) if with_head else 0,
        image_size=image_size,
        patch_size=patch,
        num_channels=convert.config_get(hf_config, "num_channels", 3),
        embed_dim=convert.config_get(hf_config, "embed_dim", 96),
        depths=tuple(convert.config_get(hf_config, "depths", (2, 2, 6, 2))),
        num_heads=tuple(convert.config_get(hf_config, "num_heads", (3, 6, 12, 24))),
        window_size=convert.config_get(hf_config, "window_size", 7),
        mlp_ratio=float(convert.config_get(hf_config, "mlp_ratio", 4.0)),
        dropout=convert.config_get(hf_config, "hidden_dropout_prob", 0.0),
        attn_dropout=convert.config_get(hf_config, "attention_probs_dropout_prob", 0.0),
        drop_path_rate=convert.config_get(hf_config, "drop_path_rate", 0.1),
        layer_norm_eps=eps,
        activation=convert.HF_ACTIVATIONS[act],
    )


def swin_params_from_torch(
    state_dict: str | os.PathLike | Mapping[str, Any],
    model: Swin,
    *,
    allow_unused: Iterable[str] = (),
) -> dict[str, Any]:
    """Params for ``model`` from a HF ``SwinForImageClassification`` / ``SwinModel`` dict.

    ``state_dict`` is a mapping of numpy arrays / torch tensors or a checkpoint path (see
    ``common.convert.load_state_dict``). ``num_classes > 0`` needs ``classifier.*``. Keys
    the conversion does not use raise a ``ValueError`` unless they match ``allow_unused``.
    """
    sd = convert.load_state_dict(state_dict)
    sd = convert.strip_prefix(rename_legacy_keys(sd, LEGACY_RENAMES), "swin.")
    sd = convert.StateDict(sd, what="Swin state dict")
    c, p, ch, M = model.embed_dim, model.patch_size, model.num_channels, model.window_size

    needed = [
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias",
        "embeddings.norm.weight",
        "embeddings.norm.bias",
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
    for s, depth in enumerate(model.depths):
        for i in range(depth):
            pre = f"encoder.layers.{s}.blocks.{i}."
            needed += [f"{pre}{q}.{w}" for q in parts for w in ("weight", "bias")]
            needed.append(pre + "attention.relative_position_bias.relative_position_bias_table")
        if s < len(model.depths) - 1:
            pre = f"encoder.layers.{s}.downsample."
            needed += [pre + "reduction.weight", pre + "norm.weight", pre + "norm.bias"]
    if model.num_classes:
        needed += ["classifier.weight", "classifier.bias"]
    sd.require(needed)

    proj = sd.take("embeddings.patch_embeddings.projection.weight", (c, ch, p, p))
    flat: dict[str, Any] = {
        "patch_embed/kernel": proj.transpose(2, 3, 1, 0),  # [out, in, kh, kw] -> [kh, kw, in, out]
        "patch_embed/bias": sd.take("embeddings.patch_embeddings.projection.bias", (c,)),
    }
    flat.update({f"patch_norm/{k}": v for k, v in sd.layer_norm("embeddings.norm", c).items()})
    expected_index = relative_position_index(M).reshape(-1)
    for s, depth in enumerate(model.depths):
        d = c * 2**s
        h = model.num_heads[s]
        ff = int(model.mlp_ratio * d)
        for i in range(depth):
            pre = f"encoder.layers.{s}.blocks.{i}."
            q, k, v, o = (sd.linear(pre + f"attention.{n}_proj", d, d) for n in "qkvo")
            rpb = pre + "attention.relative_position_bias."
            if rpb + "relative_position_index" in sd:  # old checkpoints store the buffer
                index = sd.take(rpb + "relative_position_index").reshape(-1)
                if not np.array_equal(index, expected_index):
                    raise ValueError(
                        f"Swin state dict key {rpb}relative_position_index differs from the "
                        f"index of window {M}"
                    )
            layer = {
                "ln_1": sd.layer_norm(pre + "layernorm_before", d),
                "ln_2": sd.layer_norm(pre + "layernorm_after", d),
                "attn": {
                    **convert.attention_params(q, k, v, o, h),
                    "relative_position_bias_table": sd.take(
                        rpb + "relative_position_bias_table", ((2 * M - 1) ** 2, h)
                    ),
                },
                "mlp": {
                    "fc": sd.linear(pre + "mlp.fc1", d, ff),
                    "proj": sd.linear(pre + "mlp.fc2", ff, d),
                },
            }
            flat.update({f"stage_{s}_block_{i}/{k}": v for k, v in convert.flatten(layer).items()})
        if s < len(model.depths) - 1:
            pre = f"encoder.layers.{s}.downsample."
            norm = sd.layer_norm(pre + "norm", 4 * d)
            flat.update({f"stage_{s}_merge/norm/{k}": v for k, v in norm.items()})
            red = sd.linear(pre + "reduction", 4 * d, 2 * d, bias=False)
            flat[f"stage_{s}_merge/reduction/kernel"] = red["kernel"]
    flat.update({f"norm/{k}": v for k, v in sd.layer_norm("layernorm", model.num_features).items()})
    if model.num_classes:
        head = sd.linear("classifier", model.num_features, model.num_classes)
        flat.update({f"head/{k}": v for k, v in head.items()})
    sd.check_all_used(allow_unused)

    expected = convert.abstract_params(
        model.init, jax.random.key(0), jnp.zeros(example_images(model).shape, jnp.float32)
    )
    convert.check_params(flat, expected, what="params converted from the Swin state dict")
    return {"params": convert.unflatten(convert.cast_like(flat, expected))}

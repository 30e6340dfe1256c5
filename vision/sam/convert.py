"""Loading Segment Anything checkpoints: the original ``.pth`` files and Hugging Face ``SamModel``.

Both sources hold the same tensors under different names; ``sam_variables_from_torch`` (the
original ``segment_anything`` names: ``image_encoder.blocks.0.attn.qkv.weight`` ...) and
``sam_variables_from_hf`` (``vision_encoder.layers.0.attn.qkv.weight`` ...) map them onto
``vision.sam.model.Sam``'s ``{"params", "buffers"}``. The prompt encoder's random Fourier
matrix is a buffer in the original checkpoints and a (tied, untrained) parameter in HF's;
it lands in ``buffers`` either way.

A checkpoint is read with ``common.convert.load_state_dict`` (``torch.load(weights_only=
True)`` for ``.pth``, never unpickling objects; safetensors; an HF folder; or a mapping).
Before any tensor is mapped, the checkpoint's encoder width, depth and grid are compared
with the model's, so a ViT-H checkpoint given to a ``sam-vit-b`` model fails with a message
naming both sizes (``preset_for_state_dict`` names the preset a checkpoint fits).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from common import convert
from vision.sam import model as sam_model

# Key prefixes of the two layouts.
_TORCH = dict(
    encoder="image_encoder.",
    patch="image_encoder.patch_embed.proj",
    pos="image_encoder.pos_embed",
    block="image_encoder.blocks.{i}.",
    ln1="norm1",
    ln2="norm2",
    neck=("image_encoder.neck.0", "image_encoder.neck.1", "image_encoder.neck.2",
          "image_encoder.neck.3"),
    gaussian="prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    point="prompt_encoder.point_embeddings.{i}.weight",
    not_a_point="prompt_encoder.not_a_point_embed.weight",
    no_mask="prompt_encoder.no_mask_embed.weight",
    mask_convs=("prompt_encoder.mask_downscaling.0", "prompt_encoder.mask_downscaling.3",
                "prompt_encoder.mask_downscaling.6"),
    mask_lns=("prompt_encoder.mask_downscaling.1", "prompt_encoder.mask_downscaling.4"),
    layer="mask_decoder.transformer.layers.{i}.",
    lns=("norm1", "norm2", "norm3", "norm4"),
    final_attn="mask_decoder.transformer.final_attn_token_to_image",
    final_ln="mask_decoder.transformer.norm_final_attn",
    upscale=("mask_decoder.output_upscaling.0", "mask_decoder.output_upscaling.1",
             "mask_decoder.output_upscaling.3"),
    hyper="mask_decoder.output_hypernetworks_mlps.{i}",
    iou_head="mask_decoder.iou_prediction_head",
)  # fmt: skip
_HF = dict(
    encoder="vision_encoder.",
    patch="vision_encoder.patch_embed.projection",
    pos="vision_encoder.pos_embed",
    block="vision_encoder.layers.{i}.",
    ln1="layer_norm1",
    ln2="layer_norm2",
    neck=("vision_encoder.neck.conv1", "vision_encoder.neck.layer_norm1",
          "vision_encoder.neck.conv2", "vision_encoder.neck.layer_norm2"),
    gaussian="shared_image_embedding.positional_embedding",
    point="prompt_encoder.point_embed.{i}.weight",
    not_a_point="prompt_encoder.not_a_point_embed.weight",
    no_mask="prompt_encoder.no_mask_embed.weight",
    mask_convs=("prompt_encoder.mask_embed.conv1", "prompt_encoder.mask_embed.conv2",
                "prompt_encoder.mask_embed.conv3"),
    mask_lns=("prompt_encoder.mask_embed.layer_norm1", "prompt_encoder.mask_embed.layer_norm2"),
    layer="mask_decoder.transformer.layers.{i}.",
    lns=("layer_norm1", "layer_norm2", "layer_norm3", "layer_norm4"),
    final_attn="mask_decoder.transformer.final_attn_token_to_image",
    final_ln="mask_decoder.transformer.layer_norm_final_attn",
    upscale=("mask_decoder.upscale_conv1", "mask_decoder.upscale_layer_norm",
             "mask_decoder.upscale_conv2"),
    hyper="mask_decoder.output_hypernetworks_mlps.{i}",
    iou_head="mask_decoder.iou_prediction_head",
)  # fmt: skip


def _conv(sd: convert.StateDict, prefix: str, shape: tuple[int, ...], bias: bool = True):
    """A torch ``Conv2d`` ``[out, in, kh, kw]`` as flax ``Conv`` params ``[kh, kw, in, out]``."""
    out = {"kernel": sd.take(f"{prefix}.weight", shape).transpose(2, 3, 1, 0)}
    if bias:
        out["bias"] = sd.take(f"{prefix}.bias", shape[:1])
    return out


def _deconv(sd: convert.StateDict, prefix: str, c_in: int, c_out: int):
    """A torch ``ConvTranspose2d(k=2, s=2)`` ``[in, out, 2, 2]`` as ``Upsample2x`` params."""
    w = sd.take(f"{prefix}.weight", (c_in, c_out, 2, 2))
    return {"kernel": w.transpose(2, 3, 0, 1), "bias": sd.take(f"{prefix}.bias", (c_out,))}


def _attention(sd: convert.StateDict, prefix: str, d: int, inner: int):
    return {
        "q": sd.linear(f"{prefix}.q_proj", d, inner),
        "k": sd.linear(f"{prefix}.k_proj", d, inner),
        "v": sd.linear(f"{prefix}.v_proj", d, inner),
        "out": sd.linear(f"{prefix}.out_proj", inner, d),
    }


def _head_mlp(sd: convert.StateDict, prefix: str, sizes: list[int], hf: bool):
    """The reference ``MLP`` (``layers.j``) or HF's ``SamFeedForward`` (``proj_in``,
    ``layers.j``, ``proj_out``) as ``HeadMLP`` params."""
    n = len(sizes) - 1
    if hf:
        names = ["proj_in"] + [f"layers.{j}" for j in range(n - 2)] + ["proj_out"]
    else:
        names = [f"layers.{j}" for j in range(n)]
    return {
        f"layer_{j}": sd.linear(f"{prefix}.{name}", sizes[j], sizes[j + 1])
        for j, name in enumerate(names)
    }


def checkpoint_sizes(state_dict: Mapping[str, Any]) -> dict[str, int]:
    """Encoder width, depth, patch and grid of a state dict in either layout."""
    for names in (_TORCH, _HF):
        patch = names["patch"] + ".weight"
        if patch in state_dict and names["pos"] in state_dict:
            d, _, p, _ = np.shape(state_dict[patch])
            grid = np.shape(state_dict[names["pos"]])[1]
            prefix = names["block"].split("{")[0]
            depth = len(
                {k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)}
            )
            return dict(encoder_dim=int(d), encoder_layers=depth, patch_size=int(p), grid=int(grid))
    raise ValueError(
        "not a Segment Anything state dict: found neither "
        f"{_TORCH['patch']}.weight (segment_anything) nor {_HF['patch']}.weight (HF SamModel)"
    )


def preset_for_state_dict(state_dict: Mapping[str, Any]) -> str | None:
    """The ``PRESETS`` name whose encoder matches the checkpoint's, or ``None``."""
    sizes = checkpoint_sizes(state_dict)
    for name, cfg in sam_model.PRESETS.items():
        grid = cfg["image_size"] // cfg["patch_size"]
        if (cfg["encoder_dim"], cfg["encoder_layers"], cfg["patch_size"], grid) == (
            sizes["encoder_dim"],
            sizes["encoder_layers"],
            sizes["patch_size"],
            sizes["grid"],
        ):
            return name
    return None


def _check_size(state_dict: Mapping[str, Any], model: sam_model.Sam, what: str) -> None:
    got = checkpoint_sizes(state_dict)
    want = dict(
        encoder_dim=model.encoder_dim,
        encoder_layers=model.encoder_layers,
        patch_size=model.patch_size,
        grid=model.grid,
    )
    if got != want:
        fits = preset_for_state_dict(state_dict)
        hint = f" (the checkpoint fits preset {fits!r})" if fits else ""
        diff = ", ".join(
            f"{k}: checkpoint {got[k]} vs model {want[k]}" for k in want if got[k] != want[k]
        )
        raise ValueError(f"{what} is for another SAM size: {diff}{hint}")


def _convert(state_dict, model: sam_model.Sam, names: dict, hf: bool, what: str, allow_unused):
    raw = convert.load_state_dict(state_dict)
    _check_size(raw, model, what)
    sd = convert.StateDict(raw, what=what)
    d, n, p, g = model.encoder_dim, model.encoder_heads, model.patch_size, model.grid
    dh, ff, c = d // n, d * model.encoder_mlp_ratio, model.prompt_dim
    enc: dict[str, Any] = {
        "patch_embed": _conv(sd, names["patch"], (d, 3, p, p)),
        "pos_embedding": sd.take(names["pos"], (1, g, g, d)),
    }
    for i in range(model.encoder_layers):
        pre = names["block"].format(i=i)
        side = g if i in model.global_attn_indexes else model.window_size
        qkv = sd.linear(pre + "attn.qkv", d, 3 * d)
        out = sd.linear(pre + "attn.proj", d, d)
        enc[f"block_{i}"] = {
            "ln_1": sd.layer_norm(pre + names["ln1"], d),
            "ln_2": sd.layer_norm(pre + names["ln2"], d),
            "attn": {
                "qkv": {
                    "kernel": qkv["kernel"].reshape(d, 3, n, dh),
                    "bias": qkv["bias"].reshape(3, n, dh),
                },
                "out": {"kernel": out["kernel"].reshape(n, dh, d), "bias": out["bias"]},
                "rel_pos_h": sd.take(pre + "attn.rel_pos_h", (2 * side - 1, dh)),
                "rel_pos_w": sd.take(pre + "attn.rel_pos_w", (2 * side - 1, dh)),
            },
            "mlp": {
                "fc": sd.linear(pre + "mlp.lin1", d, ff),
                "proj": sd.linear(pre + "mlp.lin2", ff, d),
            },
        }
    neck = names["neck"]
    enc["neck_conv_0"] = _conv(sd, neck[0], (c, d, 1, 1), bias=False)
    enc["neck_ln_0"] = sd.layer_norm(neck[1], c)
    enc["neck_conv_1"] = _conv(sd, neck[2], (c, c, 3, 3), bias=False)
    enc["neck_ln_1"] = sd.layer_norm(neck[3], c)

    m = model.mask_in_chans
    prompt = {
        "point_embeddings": np.concatenate(
            [sd.take(names["point"].format(i=i), (1, c)) for i in range(4)]
        ),
        "not_a_point_embed": sd.take(names["not_a_point"], (1, c))[0],
        "no_mask_embed": sd.take(names["no_mask"], (1, c))[0],
        "mask_conv_0": _conv(sd, names["mask_convs"][0], (m // 4, 1, 2, 2)),
        "mask_ln_0": sd.layer_norm(names["mask_lns"][0], m // 4),
        "mask_conv_1": _conv(sd, names["mask_convs"][1], (m, m // 4, 2, 2)),
        "mask_ln_1": sd.layer_norm(names["mask_lns"][1], m),
        "mask_conv_2": _conv(sd, names["mask_convs"][2], (c, m, 1, 1)),
    }
    gaussian = sd.take(names["gaussian"], (2, c // 2))
    if hf:  # HF ties a second copy to the shared one
        tied = "prompt_encoder.shared_embedding.positional_embedding"
        if tied in sd:
            sd.take(tied, (2, c // 2))

    tokens = model.num_multimask_outputs + 1
    inner = c // 2  # the cross-attentions' downsample rate 2
    dec: dict[str, Any] = {
        "iou_token": sd.take("mask_decoder.iou_token.weight", (1, c)),
        "mask_tokens": sd.take("mask_decoder.mask_tokens.weight", (tokens, c)),
    }
    for i in range(model.decoder_layers):
        pre = names["layer"].format(i=i)
        layer = {
            "self_attn": _attention(sd, pre + "self_attn", c, c),
            "token_to_image": _attention(sd, pre + "cross_attn_token_to_image", c, inner),
            "image_to_token": _attention(sd, pre + "cross_attn_image_to_token", c, inner),
            "mlp_fc": sd.linear(pre + "mlp.lin1", c, model.decoder_mlp_dim),
            "mlp_proj": sd.linear(pre + "mlp.lin2", model.decoder_mlp_dim, c),
        }
        for j, ln in enumerate(names["lns"]):
            layer[f"ln_{j + 1}"] = sd.layer_norm(pre + ln, c)
        dec[f"layer_{i}"] = layer
    dec["final_attn"] = _attention(sd, names["final_attn"], c, inner)
    dec["final_ln"] = sd.layer_norm(names["final_ln"], c)
    up = names["upscale"]
    dec["upscale_0"] = _deconv(sd, up[0], c, c // 4)
    dec["upscale_ln"] = sd.layer_norm(up[1], c // 4)
    dec["upscale_1"] = _deconv(sd, up[2], c // 4, c // 8)
    for i in range(tokens):
        dec[f"hypernet_{i}"] = _head_mlp(sd, names["hyper"].format(i=i), [c, c, c, c // 8], hf)
    iou_sizes = [c] + [model.iou_head_hidden_dim] * (model.iou_head_depth - 1) + [tokens]
    dec["iou_head"] = _head_mlp(sd, names["iou_head"], iou_sizes, hf)
    sd.check_all_used(allow_unused)

    flat = convert.flatten({"image_encoder": enc, "prompt_encoder": prompt, "mask_decoder": dec})
    abstract = jax.eval_shape(lambda r: sam_model.init(model, r), jax.random.key(0))
    expected = convert.flatten(jax.tree.map(lambda x: x, _unbox(abstract)["params"]))
    convert.check_params(flat, expected, what=f"params converted from the {what}")
    buffers = {"prompt_encoder": {"gaussian_matrix": gaussian.astype(np.float32)}}
    return {"params": convert.unflatten(convert.cast_like(flat, expected)), "buffers": buffers}


def _unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def sam_variables_from_torch(
    state_dict: str | os.PathLike | Mapping[str, Any],
    model: sam_model.Sam,
    *,
    allow_unused: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``{"params", "buffers"}`` from a ``segment_anything`` state dict (a ``.pth`` or a dict)."""
    return _convert(state_dict, model, _TORCH, False, "segment_anything checkpoint", allow_unused)


def sam_variables_from_hf(
    state_dict: str | os.PathLike | Mapping[str, Any],
    model: sam_model.Sam,
    *,
    allow_unused: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``{"params", "buffers"}`` from a Hugging Face ``SamModel`` state dict or folder."""
    return _convert(state_dict, model, _HF, True, "Hugging Face SamModel checkpoint", allow_unused)


def sam_config_from_hf(config: Any) -> dict[str, Any]:
    """``Sam`` fields from a ``transformers.SamConfig`` (object or ``config.json`` dict)."""
    get = convert.config_get
    vision = get(config, "vision_config")
    prompt = get(config, "prompt_encoder_config")
    decoder = get(config, "mask_decoder_config")
    d = get(vision, "hidden_size")
    mlp_dim = get(vision, "mlp_dim") or int(d * get(vision, "mlp_ratio", 4.0))
    widths = {
        "vision output_channels": get(vision, "output_channels"),
        "prompt encoder hidden_size": get(prompt, "hidden_size"),
        "mask decoder hidden_size": get(decoder, "hidden_size"),
        "2 * vision num_pos_feats": 2 * get(vision, "num_pos_feats"),
    }
    if len(set(widths.values())) != 1 or mlp_dim % d:
        raise ValueError(
            f"unsupported SamConfig: widths {widths} must all be equal and vision mlp_dim "
            f"{mlp_dim} a multiple of hidden_size {d}"
        )
    for name in ("use_abs_pos", "use_rel_pos", "qkv_bias"):
        if not get(vision, name, True):
            raise ValueError(f"unsupported SamConfig: vision {name}=False")
    if get(decoder, "attention_downsample_rate", 2) != 2:
        raise ValueError("unsupported SamConfig: attention_downsample_rate must be 2")
    return dict(
        image_size=get(vision, "image_size"),
        patch_size=get(vision, "patch_size"),
        encoder_dim=d,
        encoder_layers=get(vision, "num_hidden_layers"),
        encoder_heads=get(vision, "num_attention_heads"),
        encoder_mlp_ratio=mlp_dim // d,
        window_size=get(vision, "window_size"),
        global_attn_indexes=tuple(get(vision, "global_attn_indexes")),
        encoder_layer_norm_eps=get(vision, "layer_norm_eps"),
        prompt_dim=get(prompt, "hidden_size"),
        mask_in_chans=get(prompt, "mask_input_channels"),
        decoder_layers=get(decoder, "num_hidden_layers"),
        decoder_heads=get(decoder, "num_attention_heads"),
        decoder_mlp_dim=get(decoder, "mlp_dim"),
        decoder_layer_norm_eps=get(decoder, "layer_norm_eps"),
        num_multimask_outputs=get(decoder, "num_multimask_outputs"),
        iou_head_depth=get(decoder, "iou_head_depth"),
        iou_head_hidden_dim=get(decoder, "iou_head_hidden_dim"),
    )


def load_hf(path: str | os.PathLike, **overrides: Any) -> tuple[sam_model.Sam, dict[str, Any]]:
    """A ``Sam`` and its variables from a Hugging Face ``SamModel`` folder (``config.json`` and
    weights); ``overrides`` set other fields (``dtype`` ...)."""
    with open(os.path.join(os.fspath(path), "config.json")) as f:
        config = json.load(f)
    model = sam_model.Sam(**{**sam_config_from_hf(config), **overrides})
    return model, sam_variables_from_hf(path, model)


def load_torch(
    path: str | os.PathLike | Mapping[str, Any], preset: str | None = None, **overrides: Any
) -> tuple[sam_model.Sam, dict[str, Any]]:
    """A ``Sam`` and its variables from an original ``sam_vit_*.pth``; the preset is found from
    the checkpoint's sizes unless given."""
    raw = convert.load_state_dict(path)
    preset = preset or preset_for_state_dict(raw)
    if preset is None:
        raise ValueError(
            f"checkpoint sizes {checkpoint_sizes(raw)} match no preset in "
            f"{sorted(sam_model.PRESETS)}; build the Sam yourself and call "
            "sam_variables_from_torch"
        )
    model = sam_model.from_preset(preset, **overrides)
    return model, sam_variables_from_torch(raw, model)

"""diffusers ``UNet2DModel`` checkpoints -> ``diffusion.unet.UNet`` and its params.

* ``unet_from_config``: a diffusers ``config.json`` dict -> our ``UNet`` (refusing options
  this architecture does not implement, by name).
* ``unet_params``: a diffusers state dict -> our params, by walking our model's abstract
  params: every module is named after its diffusers counterpart (``down_1_attn_0`` is
  ``down_blocks.1.attentions.0``), convolutions go from ``[out, in, kh, kw]`` to
  ``[kh, kw, in, out]``, Linears are transposed. Every tensor's shape is checked and every
  checkpoint key must be used, so a config that does not match the weights fails naming the
  keys. The attention names of old checkpoints (``query``/``key``/``value``/``proj_attn``,
  as the original google/ddpm-* uploads have) are read too.
* ``load_unet``: a diffusers model folder (``config.json`` + ``diffusion_pytorch_model
  .safetensors``, or its ``fp16`` variant) -> ``(model, params)``.

diffusers has no notion of a null label: ``null_label=True`` reads the last of the
checkpoint's ``num_class_embeds`` rows as the null label of classifier-free guidance.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from common import convert
from diffusion.unet import UNet

_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
# config key -> the only value this architecture implements
_FIXED = {
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2D",
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "center_input_sample": False,
    "class_embed_type": None,
    "time_embedding_dim": None,
}
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def unet_from_config(config: Mapping[str, Any], *, null_label: bool = False, **overrides) -> UNet:
    """Our ``UNet`` for a diffusers ``UNet2DModel`` config dict; ``overrides`` set our fields
    (``dtype``, ``dropout`` ...)."""
    get = lambda k, d=None: config.get(k, d)
    cls = get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"config is for a {cls}, not a UNet2DModel")
    for key, want in _FIXED.items():
        if get(key, want) != want:
            raise ValueError(f"config {key}={get(key)!r} is not supported (only {want!r})")
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    unknown = [t for t in down if t not in _DOWN] + [t for t in up if t not in _UP]
    if unknown:
        raise ValueError(f"unsupported block types {unknown}; supported {[*_DOWN, *_UP]}")
    groups = get("norm_num_groups", 32)
    if get("attn_norm_num_groups") not in (None, groups):
        raise ValueError("attn_norm_num_groups different from norm_num_groups is not supported")
    n_embeds = get("num_class_embeds") or 0
    if null_label and n_embeds < 2:
        raise ValueError(f"null_label needs num_class_embeds >= 2, the config has {n_embeds}")
    fields = dict(
        out_channels=get("out_channels", 3),
        block_channels=tuple(get("block_out_channels")),
        layers_per_block=get("layers_per_block", 2),
        down_attention=tuple(_DOWN[t] for t in down),
        up_attention=tuple(_UP[t] for t in up),
        mid_attention=bool(get("add_attention", True)),
        attention_head_dim=get("attention_head_dim", 8),
        groups=groups,
        norm_eps=get("norm_eps", 1e-5),
        dropout=get("dropout", 0.0),
        flip_sin_to_cos=get("flip_sin_to_cos", True),
        freq_shift=float(get("freq_shift", 0)),
        downsample_padding=get("downsample_padding", 1),
        mid_scale=float(get("mid_block_scale_factor", 1.0)),
        num_classes=n_embeds - int(null_label),
        null_label=null_label,
    )
    fields.update(overrides)
    return UNet(**fields)


def _torch_module(path: str) -> str:
    """Our module path (``down_1_attn_0/attn/to_out``) -> diffusers' (``down_blocks.1
    .attentions.0.to_out.0``)."""
    parts = path.split("/")
    head = parts[0]
    m = re.fullmatch(r"(down|up)_(\d+)_(resnet|attn)_(\d+)", head)
    if m:
        kind = {"resnet": "resnets", "attn": "attentions"}[m[3]]
        head = f"{m[1]}_blocks.{m[2]}.{kind}.{m[4]}"
    elif m := re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", head):
        head = f"{m[1]}_blocks.{m[2]}.{m[3]}rs.0"
    elif m := re.fullmatch(r"mid_(resnet|attn)_(\d+)", head):
        head = f"mid_block.{ {'resnet': 'resnets', 'attn': 'attentions'}[m[1]] }.{m[2]}"
    rest = [p for p in parts[1:] if p != "attn"]  # our Attention sits inside the block
    rest = ["to_out.0" if p == "to_out" else p for p in rest]
    return ".".join([head, *rest])


def _rename_deprecated(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state_dict.items():
        m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", k)
        out[f"{m[1]}.{_DEPRECATED_ATTENTION[m[2]]}.{m[3]}" if m else k] = v
    return out


def abstract_unet_params(model: UNet, in_channels: int, image_size: int | None = None) -> dict:
    """Flat ``{path: ShapeDtypeStruct}`` of the model's params (no memory allocated)."""
    size = image_size or model.downsample_factor
    x = jnp.zeros((1, size, size, in_channels), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if model.num_classes > 0 else None
    return convert.abstract_params(
        model.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32), labels
    )


def unet_params(
    state_dict: Mapping[str, Any], model: UNet, *, in_channels: int | None = None
) -> dict[str, Any]:
    """Nested params of ``model`` (cast to its ``param_dtype``) from a diffusers state dict."""
    sd_raw = _rename_deprecated(convert.load_state_dict(state_dict))
    if in_channels is None:
        if "conv_in.weight" not in sd_raw:
            raise ValueError("checkpoint has no conv_in.weight: is it a UNet2DModel?")
        in_channels = int(sd_raw["conv_in.weight"].shape[1])
    expected = abstract_unet_params(model, in_channels)
    sd = convert.StateDict(sd_raw, what="diffusers UNet2DModel checkpoint")
    modules: dict[str, dict[str, Any]] = {}
    for path, leaf in expected.items():
        mod, name = path.rsplit("/", 1)
        modules.setdefault(mod, {})[name] = leaf
    flat = {}
    for mod, leaves in modules.items():
        prefix = _torch_module(mod)
        if "embedding" in leaves:
            n, d = leaves["embedding"].shape
            got = {"embedding": sd.take(f"{prefix}.weight", (n, d))}
        elif "scale" in leaves:
            got = sd.layer_norm(prefix, leaves["scale"].shape[0])
        elif leaves["kernel"].ndim == 4:
            kh, kw, n_in, n_out = leaves["kernel"].shape
            got = sd.conv2d(prefix, n_in, n_out, (kh, kw))
        else:
            n_in, n_out = leaves["kernel"].shape
            got = sd.linear(prefix, n_in, n_out)
        flat.update({f"{mod}/{k}": v for k, v in got.items()})
    sd.check_all_used()
    convert.check_params(flat, expected)
    return convert.unflatten(convert.cast_like(flat, expected))


def load_unet(
    folder: str | os.PathLike,
    *,
    variant: str | None = None,
    null_label: bool = False,
    **overrides: Any,
) -> tuple[UNet, dict[str, Any]]:
    """``(model, params)`` from a diffusers ``UNet2DModel`` folder.

    ``variant="fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors``; half-precision
    tensors are upcast to the model's ``param_dtype`` (float32 unless overridden).
    """
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder} has no config.json: not a diffusers model folder")
    with open(cfg_path) as f:
        config = json.load(f)
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    names = [f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.bin"]
    found = [n for n in names if os.path.exists(os.path.join(folder, n))]
    if not found:
        raise FileNotFoundError(f"no weights in {folder}: looked for {names}")
    model = unet_from_config(config, null_label=null_label, **overrides)
    state_dict = convert.load_state_dict(os.path.join(folder, found[0]))
    try:
        params = unet_params(state_dict, model, in_channels=config.get("in_channels", 3))
    except ValueError as e:
        raise ValueError(f"{folder}: config.json does not match the weights: {e}") from e
    return model, params

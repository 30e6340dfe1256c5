"""Shared helpers to map PyTorch / safetensors checkpoints into Flax params.

A family's converter (``nlp/gpt_convert.py`` ...) does three things with these helpers:

1. ``load_state_dict`` reads a checkpoint (a ``.safetensors`` file, a torch ``.bin``/``.pt``
   file read with ``torch.load(weights_only=True)``, a Hugging Face directory, possibly
   sharded, or an in-memory mapping of numpy arrays / torch tensors) into a flat
   ``{name: np.ndarray}`` dict, floating tensors as float32.
2. A ``StateDict`` hands out tensors by name (checking their shapes and recording which
   ones were used), singly or as a torch ``nn.Linear`` / ``nn.LayerNorm`` already mapped to
   our params (``attention_params`` fuses four such Linears into our attention layout), and
   at the end reports every key the converter did not consume, except those matching an
   allow-list (non-persistent buffers such as causal-mask tables).
3. ``check_params`` compares the produced params with the model's abstract params
   (``abstract_params``, i.e. ``jax.eval_shape(model.init, ...)``) and raises a
   ``ValueError`` naming every missing, unexpected or wrongly shaped leaf.

torch is imported lazily and only to read torch files or tensors: it is not a runtime
dependency of the models.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

SEP = "/"  # separator of flattened Flax param paths ("h_0/attn/qkv/kernel")

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# File names Hugging Face uses inside a model directory, in order of preference.
_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    # diffusers' model folders (UNet, autoencoder, ControlNet)
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)


# --------------------------------------------------------------------------- loading


# Hugging Face activation names (transformers' ACT2FN, where "gelu" is the exact erf GELU)
# -> ours (``common.layers.ACTIVATIONS``).
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",  # same function as gelu_new, written differently
    "relu": "relu",
    "quick_gelu": "quick_gelu",
}


def config_get(cfg: Any, name: str, default: Any = None) -> Any:
    """A field of a Hugging Face config object or of its ``config.json`` dict."""
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor / numpy / jax array as numpy; floating dtypes become float32."""
    if type(x).__module__.startswith("torch"):
        import torch  # lazy: only reached when the caller already has torch tensors

        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.to(torch.float32)
        return x.numpy()
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) or x.dtype in (
        ml_dtypes.bfloat16,
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
    ):
        x = x.astype(np.float32)
    return x


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a safetensors file; bfloat16/float8 (which numpy lacks) go through ml_dtypes.

    A file that is not safetensors (truncated, damaged, another format) is a ``ValueError``
    naming it.
    """
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:  # "data type 'bfloat16' not understood": parse the format directly
        pass
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' errors do not say which file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    with open(path, "rb") as f:
        raw = f.read()
    try:
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
        data = memoryview(raw)[8 + header_len :]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            if not 0 <= start <= end <= len(data):
                raise ValueError(f"tensor {name!r} lies past the end of the file")
            out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
    except (ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    return out


def _read_index(path: str) -> list[str]:
    """The shard files a ``*.index.json`` names, as paths inside its folder.

    A shard named by an absolute path or one that leaves the folder (``../x.safetensors``)
    is refused: the index is data, and must not point the loader at arbitrary files.
    """
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, Mapping):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is not a sharded-checkpoint index (JSON with a 'weight_map'): {e}"
        ) from e
    folder = os.path.dirname(os.path.abspath(path))
    shards = []
    for shard in sorted(set(weight_map.values()), key=str):
        bad = not isinstance(shard, str) or not shard or os.path.isabs(shard)
        if not bad:  # lexically, not through symlinks: Hugging Face's cache links to blobs
            inside = os.path.normpath(os.path.join(folder, shard))
            bad = os.path.commonpath([folder, inside]) != folder or inside == folder
        if bad:
            raise ValueError(
                f"{path} names the shard {shard!r}, which is not a file inside {folder}; "
                "refusing to read it."
            )
        shards.append(inside)
    return shards


def _read_torch(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path} needs torch (pip install torch); safetensors files do not"
        ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _read_file(path: str) -> dict[str, Any]:
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(".index.json"):  # a sharded checkpoint: read every shard it names
        out: dict[str, Any] = {}
        for shard in _read_index(path):
            if shard.endswith(".index.json"):
                raise ValueError(f"{path} names another index, {shard}, as a shard")
            if not os.path.exists(shard):
                raise FileNotFoundError(f"{path} names the shard {shard}, which does not exist")
            out.update(_read_file(shard))
        return out
    if path.endswith((".bin", ".pt", ".pth")):
        return _read_torch(path)
    raise ValueError(
        f"cannot tell the checkpoint format of {path!r}: expected .safetensors, "
        ".bin, .pt, .pth or a sharded *.index.json"
    )


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A flat ``{name: np.ndarray}`` from a checkpoint file, HF model directory or mapping.

    Floating tensors come back as float32 (bfloat16 / float16 upcast); integer buffers keep
    their dtype. A directory is searched for ``model.safetensors`` (or its sharded index),
    then ``pytorch_model.bin`` (or its index), then diffusers' ``diffusion_pytorch_model.*``.
    """
    if isinstance(source, Mapping):
        raw = source
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            found = [n for n in _HF_WEIGHT_FILES if os.path.exists(os.path.join(path, n))]
            if not found:
                raise FileNotFoundError(f"no weights in {path}: looked for {_HF_WEIGHT_FILES}")
            path = os.path.join(path, found[0])
        raw = _read_file(path)
    out = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise ValueError(f"state dict keys must be strings, got {name!r}")
        out[name] = to_numpy(value)
    return out


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Removes ``prefix`` from the keys that start with it; other keys stay as they are."""
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


# --------------------------------------------------------------------------- consuming


class StateDict:
    """Hands out tensors by name and remembers which ones were used.

    ``require`` checks up front that every key a converter needs is present (so one error
    lists all missing keys); ``take`` returns a tensor, checking its shape if given;
    ``linear`` / ``layer_norm`` take a torch Linear's / LayerNorm's tensors as our params;
    ``check_all_used`` raises on keys never taken unless they match an ``allow_unused``
    regular expression (``re.search`` on the key).
    """

    def __init__(self, state_dict: Mapping[str, Any], *, what: str = "checkpoint"):
        self._tensors = dict(state_dict)
        self._used: set[str] = set()
        self.what = what  # names the source in error messages

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def require(self, keys: Iterable[str]) -> None:
        missing = [k for k in keys if k not in self._tensors]
        if missing:
            raise ValueError(f"{self.what} is missing {len(missing)} key(s): {', '.join(missing)}")

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if key not in self._tensors:
            raise ValueError(f"{self.what} is missing key {key}")
        value = self._tensors[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"{self.what} key {key} has shape {tuple(value.shape)}, expected {tuple(shape)}"
            )
        self._used.add(key)
        return value

    def linear(
        self, prefix: str, n_in: int, n_out: int, *, bias: bool = True
    ) -> dict[str, np.ndarray]:
        """A torch ``nn.Linear`` as our Dense params: ``{"kernel": [n_in, n_out], "bias"}``.

        Takes ``{prefix}.weight`` (torch's ``[out, in]``, transposed here) and, with ``bias``,
        ``{prefix}.bias`` ``[n_out]``. GPT's ``Conv1D`` is already ``[in, out]``: use ``take``.
        """
        out = {"kernel": self.take(f"{prefix}.weight", (n_out, n_in)).T}
        if bias:
            out["bias"] = self.take(f"{prefix}.bias", (n_out,))
        return out

    def conv2d(
        self, prefix: str, n_in: int, n_out: int, kernel: tuple[int, int], *, bias: bool = True
    ) -> dict[str, np.ndarray]:
        """A torch ``nn.Conv2d`` as our ``nn.Conv`` params: ``{"kernel": [kh, kw, in, out],
        "bias": [out]}`` from torch's ``[out, in, kh, kw]`` weight."""
        w = self.take(f"{prefix}.weight", (n_out, n_in, *kernel))
        out = {"kernel": np.transpose(w, (2, 3, 1, 0))}
        if bias:
            out["bias"] = self.take(f"{prefix}.bias", (n_out,))
        return out

    def layer_norm(self, prefix: str, n: int, *, bias: bool = True) -> dict[str, np.ndarray]:
        """A torch ``nn.LayerNorm`` of width ``n`` as ``{"scale": [n], "bias": [n]}``.

        Takes ``{prefix}.weight`` and, with ``bias``, ``{prefix}.bias``.
        """
        out = {"scale": self.take(f"{prefix}.weight", (n,))}
        if bias:
            out["bias"] = self.take(f"{prefix}.bias", (n,))
        return out

    def unused(self, allow_unused: Iterable[str] = ()) -> list[str]:
        patterns = [re.compile(p) for p in allow_unused]
        return [
            k
            for k in self._tensors
            if k not in self._used and not any(p.search(k) for p in patterns)
        ]

    def check_all_used(self, allow_unused: Iterable[str] = ()) -> None:
        left = self.unused(allow_unused)
        if left:
            raise ValueError(
                f"{self.what} has {len(left)} key(s) the converter does not use "
                f"(wrong model config or family?): {', '.join(left)}"
            )


def attention_params(
    q: Mapping[str, np.ndarray],
    k: Mapping[str, np.ndarray],
    v: Mapping[str, np.ndarray],
    out: Mapping[str, np.ndarray],
    num_heads: int,
) -> dict[str, dict[str, np.ndarray]]:
    """``common.attention.MultiHeadAttention`` self-attention params from four Dense dicts.

    ``q``, ``k``, ``v``, ``out`` are ``{"kernel": [d, d], "bias": [d]}`` (as ``StateDict.linear``
    returns for torch's separate q/k/v/output projections). Returns ``{"qkv": {"kernel":
    [d, 3, heads, head_dim], "bias": [3, heads, head_dim]}, "out": {"kernel": [heads,
    head_dim, d], "bias": [d]}}``: each projection's output axis split into heads.
    """
    d = q["kernel"].shape[0]
    h, dh = num_heads, d // num_heads
    qkv_kernel = np.stack([q["kernel"], k["kernel"], v["kernel"]], 1)  # [d, 3, d]
    qkv_bias = np.stack([q["bias"], k["bias"], v["bias"]])  # [3, d]
    return {
        "qkv": {"kernel": qkv_kernel.reshape(d, 3, h, dh), "bias": qkv_bias.reshape(3, h, dh)},
        "out": {"kernel": out["kernel"].reshape(h, dh, d), "bias": out["bias"]},
    }


# --------------------------------------------------------------------------- checking


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``."""
    return traverse_util.flatten_dict(dict(tree), sep=SEP)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def abstract_params(init: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Flat ``{path: ShapeDtypeStruct}`` of ``init(*args)['params']``, unboxed, no FLOPs.

    ``init`` is typically ``model.init`` and ``args`` its rng and example inputs.
    """
    variables = jax.eval_shape(init, *args, **kwargs)
    return flatten(nn.meta.unbox(variables)["params"])


def check_params(
    params: Mapping[str, Any], expected: Mapping[str, Any], *, what: str = "converted params"
) -> None:
    """Raises ``ValueError`` naming every missing, unexpected and wrongly shaped leaf.

    Both arguments may be nested or flat (``"a/b"`` keys); ``expected`` holds anything with
    a ``.shape`` (e.g. the output of ``abstract_params``).
    """
    got = flatten(params) if _is_nested(params) else dict(params)
    want = flatten(expected) if _is_nested(expected) else dict(expected)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(
        f"{k} {tuple(np.shape(got[k]))} (expected {tuple(want[k].shape)})"
        for k in set(got) & set(want)
        if tuple(np.shape(got[k])) != tuple(want[k].shape)
    )
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if wrong:
        problems.append("wrong shape: " + ", ".join(wrong))
    if problems:
        raise ValueError(f"{what} do not match the model; " + "; ".join(problems))


def cast_like(params: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flat params cast to the dtypes of the flat ``expected`` tree (the model's param_dtype)."""
    return {k: np.asarray(v).astype(expected[k].dtype) for k, v in params.items()}


def _is_nested(tree: Mapping[str, Any]) -> bool:
    return any(isinstance(v, Mapping) for v in tree.values())

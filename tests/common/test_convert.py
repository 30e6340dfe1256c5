"""Untrusted checkpoint files: a sharded index may not point outside its folder, damaged
safetensors files are named in the error, an incomplete GPT config names its missing sizes."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from common.convert import load_state_dict
from nlp.gpt_convert import gpt_config_from_hf


def write_index(folder, weight_map):
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def test_sharded_index_reads_its_shards(tmp_path):
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float32)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "sub").mkdir()
    save_file({"b": b}, str(tmp_path / "sub" / "model-00002-of-00002.safetensors"))
    write_index(
        tmp_path,
        {
            "a": "model-00001-of-00002.safetensors",
            "b": "sub/../sub/model-00002-of-00002.safetensors",
        },
    )
    loaded = load_state_dict(tmp_path)  # the directory: found through its index
    np.testing.assert_array_equal(loaded["a"], a)
    np.testing.assert_array_equal(loaded["b"], b)


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "sub/../../outside.safetensors", "/abs.safetensors", "."]
)
def test_index_naming_a_file_outside_its_folder_is_refused(tmp_path, shard):
    model = tmp_path / "model"
    model.mkdir()
    (model / "sub").mkdir()
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "outside.safetensors"))
    index = write_index(model, {"x": shard})
    with pytest.raises(ValueError, match=r"names the shard .* not a file inside .*refusing"):
        load_state_dict(index)


def test_index_that_is_not_one_is_named(tmp_path):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text('{"weight_map": ["a", "b"]}')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not a sharded"):
        load_state_dict(path)
    write_index(tmp_path, {"x": "missing.safetensors"})
    with pytest.raises(FileNotFoundError, match=r"index\.json names the shard .*missing"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "huge_header"])
def test_damaged_safetensors_names_the_file(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_file({"w": np.arange(1000, dtype=np.float32)}, str(path))
    raw = path.read_bytes()
    if damage == "garbage":
        raw = b"this is not a safetensors file at all"
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw = struct.pack("<Q", 2**40) + raw[8:]
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors"):
        load_state_dict(path)


def test_damaged_bfloat16_safetensors_names_the_file(tmp_path):
    """bfloat16 (which numpy lacks) is parsed by us after safetensors' own checks."""
    path = tmp_path / "bf16.safetensors"
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    good = struct.pack("<Q", len(header)) + header + np.ones(4, ml_dtypes.bfloat16).tobytes()
    path.write_bytes(good)
    np.testing.assert_array_equal(load_state_dict(path)["w"], np.ones(4, np.float32))
    path.write_bytes(good[:-4])  # the tensor's bytes cut short
    with pytest.raises(ValueError, match=r"bf16\.safetensors is not a readable safetensors"):
        load_state_dict(path)


def test_gpt_config_names_missing_sizes():
    config = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_head": 12}
    with pytest.raises(
        ValueError, match=r"gpt2 config lacks the size field\(s\) n_positions, n_layer"
    ):
        gpt_config_from_hf(config)
    full = {**config, "n_positions": 1024, "n_layer": 12}
    got = gpt_config_from_hf(full)
    assert (got["vocab_size"], got["max_len"], got["num_layers"], got["d_ff"]) == (
        50257,
        1024,
        12,
        3072,
    )

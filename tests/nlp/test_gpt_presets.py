"""Preset sizes: GPT-1/2 equal Hugging Face's exact parameter counts, GPT-3 the paper's.

Counts come from ``jax.eval_shape`` (no memory, no FLOPs); the reference models are built
on torch's ``meta`` device, so even GPT-2 XL costs well under a second.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from common import convert  # noqa: E402
from nlp.gpt import PRESETS, from_preset  # noqa: E402

# The reference architecture of each GPT-1/2 preset (HF defaults + these overrides).
HF_CONFIGS = {
    "gpt1": ("OpenAIGPTConfig", {}),
    "gpt2-small": ("GPT2Config", {}),
    "gpt2-medium": ("GPT2Config", dict(n_embd=1024, n_layer=24, n_head=16)),
    "gpt2-large": ("GPT2Config", dict(n_embd=1280, n_layer=36, n_head=20)),
    "gpt2-xl": ("GPT2Config", dict(n_embd=1600, n_layer=48, n_head=25)),
}
# Brown et al. (2020) table 2.1, "n_params".
GPT3_PAPER = {
    "gpt3-small": 125e6,
    "gpt3-medium": 350e6,
    "gpt3-large": 760e6,
    "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13.0e9,
    "gpt3-175b": 175.0e9,
}


def _count(name: str) -> int:
    model = from_preset(name)
    shapes = convert.abstract_params(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return sum(int(np.prod(s.shape)) for s in shapes.values())


def _hf_model(name: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, overrides = HF_CONFIGS[name]
    config = getattr(transformers, config_cls)(**overrides)
    model_cls = (
        transformers.GPT2LMHeadModel
        if config_cls == "GPT2Config"
        else transformers.OpenAIGPTLMHeadModel
    )
    with torch.device("meta"):
        return model_cls(config)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_gpt1_gpt2_counts_equal_hf(name):
    hf = _hf_model(name)
    assert hf.lm_head.weight is hf.transformer.get_input_embeddings().weight  # tied
    expected = sum(p.numel() for p in hf.parameters())  # shared tensors counted once
    assert _count(name) == expected


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_gpt1_gpt2_architecture_equals_hf(name):
    """Every architectural field of the preset equals what the converter derives from HF."""
    from nlp.gpt_convert import gpt_config_from_hf

    derived = gpt_config_from_hf(_hf_model(name).config)
    preset = from_preset(name)
    for field in ("dropout", "attn_dropout"):  # training-only; HF's embd/resid split differs
        derived.pop(field)
    assert {k: getattr(preset, k) for k in derived} == derived


@pytest.mark.parametrize("name", sorted(GPT3_PAPER))
def test_gpt3_counts(name):
    cfg = PRESETS[name]
    V, T, L, d = cfg["vocab_size"], cfg["max_len"], cfg["num_layers"], cfg["d_model"]
    assert cfg["d_ff"] == 4 * d
    formula = V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d
    count = _count(name)
    assert count == formula
    assert count == pytest.approx(GPT3_PAPER[name], rel=0.03)

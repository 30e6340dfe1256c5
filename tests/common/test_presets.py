"""A model from an experiment's model section: the preset's fields, the section's overrides,
the dtype named by a string, the derived fields; a missing preset or unknown dtype named."""

import jax.numpy as jnp
import pytest

from common import presets
from nlp import gpt


def test_from_config_overrides_the_preset_and_converts_the_dtype():
    section = dict(preset="gpt2-small", num_layers=2, d_model=48, dtype="bfloat16")
    model = presets.from_config(gpt.from_preset, section, vocab_size=50, max_len=16)
    want = gpt.from_preset(
        "gpt2-small", num_layers=2, d_model=48, dtype=jnp.bfloat16, vocab_size=50, max_len=16
    )
    assert model == want and model.num_heads == want.num_heads
    assert section["dtype"] == "bfloat16"  # the config section is left as it is


def test_from_config_names_a_missing_preset_and_a_bad_dtype():
    with pytest.raises(ValueError, match="names no preset"):
        presets.from_config(gpt.from_preset, dict(num_layers=2))
    with pytest.raises(ValueError, match=r"model.dtype='float16' is not one of"):
        presets.from_config(gpt.from_preset, dict(preset="gpt2-small", dtype="float16"))

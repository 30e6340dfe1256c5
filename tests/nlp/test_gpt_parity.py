"""GPT-1 / GPT-2 logits equal Hugging Face's after converting its weights (float32, CPU).

Every HF parameter (LayerNorm scales and all biases included) is re-drawn with a larger
spread than HF's init, so that a swapped scale/bias, a wrong q|k|v split or the wrong GELU
variant shows up well above the tolerance.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from common import convert  # noqa: E402
from nlp.gpt import GPT  # noqa: E402
from nlp.gpt_convert import (  # noqa: E402
    gpt2_params_from_torch,
    gpt_config_from_hf,
    openai_gpt_params_from_torch,
)

TOL = 1e-4
SHAPES = [(1, 7), (3, 32)]
SMALL = dict(n_embd=64, n_layer=3, n_head=4, n_positions=64)


def _randomize(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ".ln_" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)  # LayerNorm scales around 1
            elif p.ndim == 1:
                p.copy_(0.2 * noise)  # biases, LayerNorm shifts
            else:
                p.copy_(0.25 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=257, **SMALL)
    return _randomize(transformers.GPT2LMHeadModel(cfg), seed=1)


@pytest.fixture(scope="module")
def openai_gpt():
    torch.manual_seed(0)
    cfg = transformers.OpenAIGPTConfig(vocab_size=123, **SMALL)
    return _randomize(transformers.OpenAIGPTLMHeadModel(cfg), seed=2)


def _tokens(shape, vocab, seed):
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int64)


def _hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.from_numpy(tokens)).logits.float().numpy()


def _max_diff(model, params, hf, shape, seed=0):
    tokens = _tokens(shape, model.vocab_size, seed)
    ours = np.asarray(model.apply(params, jnp.asarray(tokens, jnp.int32)))
    ref = _hf_logits(hf, tokens)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max())


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_gpt2_logits_match_hf(gpt2, shape):
    model = GPT(**gpt_config_from_hf(gpt2.config))
    params = gpt2_params_from_torch(gpt2.state_dict(), model)
    assert _max_diff(model, params, gpt2, shape) <= TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_openai_gpt_logits_match_hf(openai_gpt, shape):
    model = GPT(**gpt_config_from_hf(openai_gpt.config))
    params = openai_gpt_params_from_torch(openai_gpt.state_dict(), model)
    assert _max_diff(model, params, openai_gpt, shape) <= TOL


def test_openai_gpt_uses_tanh_gelu(openai_gpt):
    """HF's OpenAI GPT maps afn="gelu" to the tanh approximation; the exact GELU is visibly off
    (this is what makes the parity test above sensitive to the activation)."""
    cfg = gpt_config_from_hf(openai_gpt.config)
    assert cfg["activation"] == "gelu_tanh"
    model = GPT(**{**cfg, "activation": "gelu"})
    params = openai_gpt_params_from_torch(openai_gpt.state_dict(), model)
    assert _max_diff(model, params, openai_gpt, (3, 32)) > 10 * TOL


def test_gpt2_model_without_prefix_or_head(gpt2):
    """A ``GPT2Model`` state dict (no ``transformer.`` prefix, no lm_head) plus the old mask
    buffers converts to the same params."""
    model = GPT(**gpt_config_from_hf(gpt2.config))
    full = gpt2_params_from_torch(gpt2.state_dict(), model)
    bare = {
        k.removeprefix("transformer."): v
        for k, v in gpt2.state_dict().items()
        if k != "lm_head.weight"
    }
    bare["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    bare["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    got = convert.flatten(gpt2_params_from_torch(bare, model)["params"])
    for k, v in convert.flatten(full["params"]).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.slow
def test_gpt2_from_safetensors_file(gpt2, tmp_path):
    path = tmp_path / "model.safetensors"
    # Tied tensors cannot be saved twice; drop the head as save_pretrained does.
    sd = {k: v.contiguous() for k, v in gpt2.state_dict().items() if k != "lm_head.weight"}
    safetensors_torch.save_file(sd, str(path))
    model = GPT(**gpt_config_from_hf(gpt2.config))
    for source in (path, str(path), tmp_path):  # file path, str, HF model directory
        params = gpt2_params_from_torch(source, model)
        assert _max_diff(model, params, gpt2, (2, 16), seed=3) <= TOL


def test_openai_gpt_from_torch_bin_file(openai_gpt, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(openai_gpt.state_dict(), path)
    model = GPT(**gpt_config_from_hf(openai_gpt.config))
    params = openai_gpt_params_from_torch(path, model)
    assert _max_diff(model, params, openai_gpt, (2, 16), seed=4) <= TOL


def test_bfloat16_safetensors_and_param_dtype(gpt2, tmp_path):
    """bfloat16 files (which safetensors.numpy cannot read) load exactly; the params come out
    in the model's param_dtype."""
    path = tmp_path / "bf16.safetensors"
    sd = {
        k: v.to(torch.bfloat16).contiguous()
        for k, v in gpt2.state_dict().items()
        if k != "lm_head.weight"
    }
    safetensors_torch.save_file(sd, str(path))
    loaded = convert.load_state_dict(path)
    assert loaded["transformer.wte.weight"].dtype == np.float32
    np.testing.assert_array_equal(
        loaded["transformer.wte.weight"], sd["transformer.wte.weight"].float().numpy()
    )
    model = GPT(**gpt_config_from_hf(gpt2.config), param_dtype=jnp.bfloat16)
    params = gpt2_params_from_torch(path, model)
    qkv = params["params"]["h_1"]["attn"]["qkv"]["kernel"]
    assert qkv.dtype == ml_dtypes.bfloat16 and qkv.shape == (64, 3, 4, 16)


def test_wrong_shape_names_the_key(gpt2):
    model = GPT(**gpt_config_from_hf(gpt2.config))
    sd = dict(gpt2.state_dict())
    sd["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 255)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight.*\(64, 255\)"):
        gpt2_params_from_torch(sd, model)


def test_missing_key_is_named(openai_gpt):
    model = GPT(**gpt_config_from_hf(openai_gpt.config))
    sd = dict(openai_gpt.state_dict())
    del sd["transformer.h.2.ln_2.bias"], sd["transformer.positions_embed.weight"]
    with pytest.raises(ValueError, match=r"missing 2 key.*positions_embed\.weight.*h\.2\.ln_2"):
        openai_gpt_params_from_torch(sd, model)


def test_unused_key_is_named(gpt2):
    model = GPT(**gpt_config_from_hf(gpt2.config))
    sd = dict(gpt2.state_dict())
    sd["transformer.h.3.ln_1.weight"] = torch.ones(64)  # a layer the model does not have
    with pytest.raises(ValueError, match=r"does not use.*h\.3\.ln_1\.weight"):
        gpt2_params_from_torch(sd, model)
    gpt2_params_from_torch(sd, model, allow_unused=[r"^h\.3\."])


def test_wrong_model_is_rejected(gpt2, openai_gpt):
    model = GPT(**gpt_config_from_hf(gpt2.config))
    with pytest.raises(ValueError, match="pre_norm=False"):
        openai_gpt_params_from_torch(openai_gpt.state_dict(), model)
    smaller = GPT(**{**gpt_config_from_hf(gpt2.config), "max_len": 32})
    with pytest.raises(ValueError, match=r"wpe\.weight has shape \(64, 64\), expected \(32, 64\)"):
        gpt2_params_from_torch(gpt2.state_dict(), smaller)


def test_untied_head_is_rejected(gpt2):
    model = GPT(**gpt_config_from_hf(gpt2.config))
    sd = {k: v.clone() for k, v in gpt2.state_dict().items()}
    sd["lm_head.weight"] += 1.0
    with pytest.raises(ValueError, match="lm_head.weight"):
        gpt2_params_from_torch(sd, model)


def test_check_params_lists_every_problem():
    expected = {"a": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}, "b": np.zeros(4)}
    got = {"a": {"kernel": np.zeros((3, 2))}, "c": np.zeros(1), "b": np.zeros(4)}
    with pytest.raises(ValueError) as e:
        convert.check_params(got, expected)
    msg = str(e.value)
    assert "missing: a/bias" in msg and "unexpected: c" in msg
    assert "a/kernel (3, 2) (expected (2, 3))" in msg


def test_config_mapping_and_rejections():
    cfg = gpt_config_from_hf(
        transformers.GPT2Config(n_embd=64, n_head=4, n_inner=100, activation_function="gelu")
    )
    assert cfg["d_ff"] == 100 and cfg["activation"] == "gelu" and cfg["pre_norm"]
    assert (
        gpt_config_from_hf(
            {
                "model_type": "gpt2",
                "n_embd": 64,
                "n_head": 4,
                "n_layer": 2,
                "n_positions": 32,
                "vocab_size": 10,
            }
        )["activation"]
        == "gelu_tanh"
    )
    gpt1 = gpt_config_from_hf(transformers.OpenAIGPTConfig())
    assert (gpt1["pre_norm"], gpt1["activation"], gpt1["max_len"]) == (False, "gelu_tanh", 512)
    for bad in (
        dict(scale_attn_by_inverse_layer_idx=True),
        dict(reorder_and_upcast_attn=True),
        dict(scale_attn_weights=False),
        dict(activation_function="silu"),
        dict(add_cross_attention=True),
        dict(tie_word_embeddings=False),
    ):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name if name != "activation_function" else "silu"):
            gpt_config_from_hf(transformers.GPT2Config(**bad))
    with pytest.raises(ValueError, match="model_type"):
        gpt_config_from_hf(transformers.BertConfig())

"""The UNet against diffusers' UNet2DModel from random weights, its presets' exact sizes, and
the diffusers-folder loader with its errors."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import convert, unet

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

# google/ddpm-cifar10-32's config.json (Ho et al. 2020's CIFAR-10 model in diffusers).
DDPM_CIFAR10_CONFIG = dict(
    act_fn="silu",
    attention_head_dim=None,
    block_out_channels=[128, 256, 256, 256],
    center_input_sample=False,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    in_channels=3,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-06,
    norm_num_groups=32,
    out_channels=3,
    sample_size=32,
    time_embedding_type="positional",
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
)
TINY = dict(
    DDPM_CIFAR10_CONFIG,
    block_out_channels=[16, 32, 32],
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=8,
)


def _random_torch_unet(seed=0, **config):
    torch.manual_seed(seed)
    m = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing we rely on, but perturb anyway
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _compare(tm, model, params, x_nchw, t, labels=None, atol=1e-4):
    with torch.no_grad():
        y = None if labels is None else torch.from_numpy(labels)
        ref = tm(torch.from_numpy(x_nchw), torch.from_numpy(t), y).sample.numpy()
    ours = jax.jit(model.apply)(
        {"params": params},
        jnp.asarray(x_nchw.transpose(0, 2, 3, 1)),
        jnp.asarray(t),
        None if labels is None else jnp.asarray(labels),
    )
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, atol=atol, rtol=0)
    assert np.abs(ref).max() > 0.1


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # DDPM's layout: padding 0 downsampling, sines first, frequency shift 1
        dict(
            downsample_padding=1,
            flip_sin_to_cos=True,
            freq_shift=0,
            attention_head_dim=8,
            mid_block_scale_factor=1.4142,
            norm_eps=1e-5,
            in_channels=1,
            out_channels=2,
        ),
    ],
)
def test_parity_with_diffusers(overrides):
    config = dict(TINY, **overrides)
    tm = _random_torch_unet(**config)
    model = convert.unet_from_config(dict(tm.config))
    params = convert.unet_params(tm.state_dict(), model)
    x = (
        np.random.default_rng(0)
        .standard_normal((2, config["in_channels"], 8, 8))
        .astype(np.float32)
    )
    _compare(tm, model, params, x, np.array([0, 731]))


def test_class_conditional_parity_with_diffusers():
    """10 classes plus the null label: diffusers' num_class_embeds=11."""
    tm = _random_torch_unet(**dict(TINY, num_class_embeds=11))
    model = convert.unet_from_config(dict(tm.config), null_label=True)
    assert (model.num_classes, model.null_label) == (10, True)
    params = convert.unet_params(tm.state_dict(), model)
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    _compare(tm, model, params, x, np.array([5, 5, 999]), labels=np.array([0, 10, 7]))


def test_ddpm_cifar10_preset_has_diffusers_count():
    with torch.device("meta"):
        tm = diffusers.UNet2DModel(**DDPM_CIFAR10_CONFIG)
    theirs = sum(p.numel() for p in tm.parameters())
    assert theirs == 35_746_307  # the published 35.7M
    model = unet.from_preset("ddpm-cifar10")
    shapes = convert.abstract_unet_params(model, 3, 32)
    assert sum(int(np.prod(s.shape)) for s in shapes.values()) == theirs
    assert convert.unet_from_config(DDPM_CIFAR10_CONFIG, dropout=0.1) == model


def test_folder_fp32_and_fp16_and_mismatch(tmp_path):
    tm = _random_torch_unet(**dict(TINY, num_class_embeds=4))
    tm.save_pretrained(tmp_path / "fp32")
    copy.deepcopy(tm).half().save_pretrained(tmp_path / "fp16", variant="fp16")
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    model, params = convert.load_unet(tmp_path / "fp32")
    assert model.num_classes == 4 and not model.null_label
    _compare(tm, model, params, x, np.array([3, 400]), labels=np.array([0, 3]))
    model16, params16 = convert.load_unet(tmp_path / "fp16", variant="fp16", null_label=True)
    assert model16.num_classes == 3 and model16.null_label
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(params16))
    # fp16 weights are the fp32 ones rounded: the same model to half precision.
    _compare(tm, model16, params16, x, np.array([3, 400]), labels=np.array([0, 3]), atol=2e-2)
    # bfloat16 params and compute when asked, not silently float32.
    model_bf, params_bf = convert.load_unet(
        tmp_path / "fp32", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
    )
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(params_bf))
    out = model_bf.apply(
        {"params": params_bf},
        jnp.zeros((1, 8, 8, 3)),
        jnp.ones(1, jnp.int32),
        jnp.zeros(1, jnp.int32),
    )
    assert out.dtype == jnp.bfloat16

    cfg_path = tmp_path / "fp32" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [16, 32, 64]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json does not match the weights: .*has shape"):
        convert.load_unet(tmp_path / "fp32")
    cfg["block_out_channels"] = [16, 32, 32]
    cfg["num_class_embeds"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not use .*class_embedding.weight"):
        convert.load_unet(tmp_path / "fp32")
    with pytest.raises(FileNotFoundError, match="no weights"):
        convert.load_unet(tmp_path / "fp32", variant="fp16")
    with pytest.raises(ValueError, match="time_embedding_type='fourier' is not supported"):
        convert.unet_from_config(dict(TINY, time_embedding_type="fourier"))


def test_deprecated_attention_names_are_read():
    tm = _random_torch_unet(**TINY)
    sd = {}
    for k, v in tm.state_dict().items():
        for new, old in (
            ("to_q", "query"),
            ("to_k", "key"),
            ("to_v", "value"),
            ("to_out.0", "proj_attn"),
        ):
            if ".attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        sd[k] = v
    assert any(".proj_attn." in k for k in sd)
    model = convert.unet_from_config(dict(tm.config))
    params = convert.unet_params(sd, model)
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    _compare(tm, model, params, x, np.array([17]))


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 17, 999], np.float32)
    for flip, shift, dim in ((False, 1, 32), (True, 0, 33)):
        want = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
        got = unet.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
        # sin/cos of arguments up to 999 in float32 (one ulp is 6e-5 there): XLA and torch
        # round them differently.
        np.testing.assert_allclose(got, want, atol=1e-4)

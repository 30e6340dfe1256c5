"""ViT: logits, tokens and pooler output equal Hugging Face's after converting its weights
(also at a second resolution, through the resized position table), ``resize_positions``
equals torch's interpolation, mean pooling through the tanh representation layer equals
its definition, bfloat16 compute reaches every submodule while params stay float32, preset
sizes equal HF's and the paper's, bad inputs.

Parity tests draw every HF parameter (LayerNorm scales, class token, positions and all
biases included) with a larger spread than HF's init.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from common import convert  # noqa: E402
from vision import vit  # noqa: E402
from vision.vit_convert import vit_config_from_hf, vit_params_from_torch  # noqa: E402

TOL = 1e-4
HF_TINY = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    image_size=32,
    patch_size=8,
)


@pytest.fixture(scope="module")
def hf_cls(hf, randomize_torch):
    torch, transformers = hf
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(**HF_TINY, num_labels=7)
    return randomize_torch(transformers.ViTForImageClassification(cfg), 1, 0.3)


@pytest.fixture(scope="module")
def hf_base(hf, randomize_torch):
    torch, transformers = hf
    torch.manual_seed(0)
    return randomize_torch(transformers.ViTModel(transformers.ViTConfig(**HF_TINY)), 2, 0.3)


# (32, 32) is the table's resolution; (48, 40) resizes the 4 x 4 grid to 6 x 5 (bicubic),
# which HF does with interpolate_pos_encoding=True.
@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_logits_match_hf(hf_cls, size, hf, nchw_images, to_nhwc):
    torch, _ = hf
    model = vit.ViT(**vit_config_from_hf(hf_cls.config))
    params = vit_params_from_torch(hf_cls.state_dict(), model)
    x = nchw_images((2, 3, *size))
    with torch.no_grad():
        ref = hf_cls(torch.from_numpy(x), interpolate_pos_encoding=size != (32, 32)).logits
    ours = model.apply(params, to_nhwc(x))
    assert ours.shape == (2, 7)
    assert float(jnp.abs(ours - ref.numpy()).max()) <= TOL


def _to_legacy_keys(state_dict):
    """A transformers-5 ViT state dict in the hub / transformers-4 layout."""
    renames = [
        (r"^layers\.", "encoder.layer."),
        (r"\.attention\.q_proj\.", ".attention.attention.query."),
        (r"\.attention\.k_proj\.", ".attention.attention.key."),
        (r"\.attention\.v_proj\.", ".attention.attention.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.mlp\.fc1\.", ".intermediate.dense."),
        (r"\.mlp\.fc2\.", ".output.dense."),
    ]
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in renames:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def test_vit_model_tokens_and_pooler_match_hf_in_hub_key_layout(hf_base, hf, nchw_images, to_nhwc):
    """A ``ViTModel`` (hub key layout, with its tanh pooler as ``representation_size``):
    final-normed tokens and pooler output equal HF's."""
    torch, _ = hf
    sd = _to_legacy_keys(dict(hf_base.state_dict()))
    assert "encoder.layer.1.attention.attention.query.weight" in sd
    model = vit.ViT(**vit_config_from_hf(hf_base.config, with_head=False, with_pooler=True))
    params = vit_params_from_torch(sd, model)
    x = nchw_images((2, 3, 32, 32), seed=1)
    with torch.no_grad():
        ref = hf_base(torch.from_numpy(x))
    pooled, tokens = model.apply(params, to_nhwc(x), return_tokens=True)
    assert tokens.shape == (2, 17, 48) and pooled.shape == (2, 48)
    assert float(jnp.abs(tokens - ref.last_hidden_state.numpy()).max()) <= TOL
    assert float(jnp.abs(pooled - ref.pooler_output.numpy()).max()) <= TOL
    np.testing.assert_array_equal(model.apply(params, to_nhwc(x), method="features"), tokens)

    # Without a representation layer the pooler is unused: refused unless allowed.
    bare = vit.ViT(**vit_config_from_hf(hf_base.config, with_head=False))
    with pytest.raises(ValueError, match=r"does not use.*pooler\.dense\.weight"):
        vit_params_from_torch(sd, bare)
    params = vit_params_from_torch(sd, bare, allow_unused=[r"^pooler\."])
    assert float(jnp.abs(bare.apply(params, to_nhwc(x)) - tokens[:, 0]).max()) <= 1e-6


def test_converter_errors_name_the_key(hf_cls, hf):
    torch, transformers = hf
    model = vit.ViT(**vit_config_from_hf(hf_cls.config))
    sd = dict(hf_cls.state_dict())
    sd["vit.layers.1.mlp.fc1.weight"] = torch.zeros(95, 48)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.fc1\.weight has shape \(95, 48\)"):
        vit_params_from_torch(sd, model)
    sd = dict(hf_cls.state_dict())
    del sd["classifier.bias"], sd["vit.embeddings.cls_token"]
    with pytest.raises(ValueError, match=r"missing 2 key.*cls_token.*classifier\.bias"):
        vit_params_from_torch(sd, model)
    bigger = vit.ViT(**{**vit_config_from_hf(hf_cls.config), "image_size": 48})
    with pytest.raises(ValueError, match=r"position_embeddings has shape \(1, 17, 48\)"):
        vit_params_from_torch(hf_cls.state_dict(), bigger)
    with pytest.raises(ValueError, match="qkv_bias=False"):
        vit_config_from_hf(transformers.ViTConfig(qkv_bias=False))
    with pytest.raises(ValueError, match="pool='token'"):
        vit_params_from_torch(hf_cls.state_dict(), model.clone(pool="mean"))


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("old,new", [((4, 4), (6, 5)), ((7, 7), (3, 5)), ((5, 3), (5, 3))])
def test_resize_positions_equals_torch_interpolate(method, old, new, hf):
    torch, _ = hf
    grid = np.random.default_rng(0).normal(size=(*old, 6)).astype(np.float32)
    ours = vit.resize_positions(jnp.asarray(grid), new, method)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=new, mode=method, align_corners=False
    )[0].permute(1, 2, 0)
    assert ours.shape == (*new, 6)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_interpolation_matrix_rows_sum_to_one():
    for method in vit.RESIZE_METHODS:
        for n_in, n_out in ((4, 9), (9, 4), (14, 24)):
            w = vit.interpolation_matrix(n_in, n_out, method)
            np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(vit.interpolation_matrix(5, 5), np.eye(5), atol=1e-12)


# --------------------------------------------------------------------------- sizes

HF_PRESETS = {
    "vit-ti/16": dict(hidden_size=192, num_attention_heads=3, intermediate_size=768),
    "vit-s/16": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
    "vit-b/16": dict(),
    "vit-b/32": dict(patch_size=32),
    "vit-l/16": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "vit-h/14": dict(
        hidden_size=1280,
        num_hidden_layers=32,
        num_attention_heads=16,
        intermediate_size=5120,
        patch_size=14,
    ),
}
# Published sizes in millions (truncated, as the papers print them), with the 1000-class
# head: ViT table 1 (B 86M, H 632M) and DeiT table 1 (Ti 5M, S 22M). ViT-L/16 counts 304.3M
# here and in HF (the ViT paper prints 307M); B/32 has no separate entry in the paper.
PUBLISHED = {"vit-ti/16": 5, "vit-s/16": 22, "vit-b/16": 86, "vit-h/14": 632}


def _count(model):
    shapes = convert.abstract_params(
        model.init, jax.random.key(0), jnp.zeros(vit.example_images(model).shape)
    )
    return sum(int(np.prod(s.shape)) for s in shapes.values())


@pytest.mark.parametrize("name", sorted(HF_PRESETS))
def test_preset_counts_equal_hf(name, hf):
    torch, transformers = hf
    with torch.device("meta"):
        ref = transformers.ViTForImageClassification(
            transformers.ViTConfig(num_labels=1000, **HF_PRESETS[name])
        )
    expected = sum(p.numel() for p in ref.parameters())
    model = vit.from_preset(name)
    assert _count(model) == expected
    if name in PUBLISHED:
        assert int(expected / 1e6) == PUBLISHED[name]
    derived = vit_config_from_hf(ref.config)
    derived.pop("layer_norm_eps")  # HF's default 1e-12; the paper's code uses 1e-6
    assert {k: getattr(model, k) for k in derived} == derived


def test_vit_b16_is_86m():
    count = _count(vit.from_preset("vit-b/16"))
    assert count == 86_567_656  # ViTForImageClassification, 1000 classes
    assert count == pytest.approx(86e6, rel=0.01)


# --------------------------------------------------------------------------- behaviour


@pytest.mark.slow
def test_mean_pooling_and_representation_layer():
    model = vit.from_preset("vit-toy", pool="mean", representation_size=24)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
    assert "cls" not in params and params["pos_embedding"].shape == (1, 16, 48)
    assert params["pre_logits"]["kernel"].shape == (48, 24)
    assert params["head"]["kernel"].shape == (24, 10)
    out, tokens = jax.eval_shape(
        lambda p, im: model.apply({"params": p}, im, return_tokens=True), params, x
    )
    assert out.shape == (2, 10) and tokens.shape == (2, 16, 48)
    # Values: head(tanh(pre_logits(mean of the returned patch tokens))).
    images = jax.random.normal(jax.random.key(1), x.shape)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(2), images))
    variables["params"]["head"]["kernel"] = jax.random.normal(jax.random.key(3), (24, 10))
    out, tokens = jax.jit(lambda v, im: model.apply(v, im, return_tokens=True))(variables, images)
    p = jax.tree.map(np.asarray, variables["params"])
    hidden = np.tanh(
        np.asarray(tokens).mean(1) @ p["pre_logits"]["kernel"] + p["pre_logits"]["bias"]
    )  # [batch, representation_size]
    expected = hidden @ p["head"]["kernel"] + p["head"]["bias"]  # [batch, num_classes]
    assert np.abs(expected).std() > 0.1
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def toy():
    model = vit.from_preset("vit-toy", dropout=0.1)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), x))
    # the head is zero-initialised (as for fine-tuning in the paper); give it weights
    assert float(jnp.abs(params["params"]["head"]["kernel"]).max()) == 0.0
    params["params"]["head"]["kernel"] = jax.random.normal(jax.random.key(2), (48, 10))
    return model, params, x


@pytest.mark.slow
def test_dropout_and_bfloat16(toy):
    model, params, x = toy
    det = jax.jit(model.apply)(params, x)
    train = jax.jit(
        lambda p, im, key: model.apply(p, im, deterministic=False, rngs={"dropout": key})
    )
    a, b = train(params, x, jax.random.key(0)), train(params, x, jax.random.key(1))
    assert not np.allclose(a, det) and not np.allclose(a, b)
    bf16 = model.clone(dtype=jnp.bfloat16)
    logits = jax.jit(bf16.apply)(params, x)
    assert logits.dtype == jnp.float32
    assert float(jnp.abs(logits - det).max()) < 0.05 * max(1.0, float(jnp.abs(det).max()))
    # bfloat16 compute: the tokens and every submodule's output are bfloat16 (only the
    # logits are cast to float32); the bfloat16 model's params are stored in float32.
    _, tokens = jax.eval_shape(lambda p, im: bf16.apply(p, im, return_tokens=True), params, x)
    assert tokens.dtype == jnp.bfloat16
    _, state = jax.eval_shape(
        lambda p, im: bf16.apply(p, im, capture_intermediates=True, mutable=["intermediates"]),
        params,
        x,
    )
    inner = {
        path: leaf.dtype
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["intermediates"])
        if path[0].key != "__call__"  # not the top-level output
    }
    assert len(inner) > 20 and set(inner.values()) == {jnp.dtype(jnp.bfloat16)}
    shapes = jax.eval_shape(bf16.init, jax.random.key(0), x)
    assert {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(shapes))} == {jnp.dtype(jnp.float32)}


def test_bad_inputs_raise_clear_errors():
    model = vit.from_preset("vit-toy")
    params = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    )
    shape = lambda *s: jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct(s, jnp.float32))
    with pytest.raises(ValueError, match=r"images must be \[batch, height, width, channels\]"):
        shape(32, 32, 3)
    with pytest.raises(ValueError, match="1 channels.*num_channels=3"):
        shape(1, 32, 32, 1)
    with pytest.raises(
        ValueError, match="image height 30 is not a positive multiple of patch_size=8"
    ):
        shape(1, 30, 32, 3)
    with pytest.raises(ValueError, match="image width 4 is not a positive multiple"):
        shape(1, 32, 4, 3)
    assert shape(1, 64, 24, 3).shape == (1, 10)  # other multiples of the patch: resized table


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="num_heads=5 does not divide d_model=48"):
        vit.from_preset("vit-toy", num_heads=5)
    with pytest.raises(
        ValueError, match=r"image_size=30 is not a positive multiple of patch_size=8"
    ):
        vit.from_preset("vit-toy", image_size=30)
    with pytest.raises(ValueError, match="pool='max'"):
        vit.from_preset("vit-toy", pool="max")
    with pytest.raises(ValueError, match="resize_method='nearest'"):
        vit.from_preset("vit-toy", resize_method="nearest")
    with pytest.raises(ValueError, match="unknown ViT fields"):
        vit.from_preset("vit-toy", hidden_size=3)
    with pytest.raises(ValueError, match="unknown ViT preset"):
        vit.from_preset("vit-g/14")

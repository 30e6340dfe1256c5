"""Swin: logits and stage features equal Hugging Face's after converting its weights, the
shifted-window mask and (S)W-MSA against their definitions, window partition and patch
merging against naive loops, bfloat16 compute in every submodule with float32 params,
preset sizes against HF and the paper, FLOPs, bad inputs.

Parity tests draw every HF parameter (relative position tables, LayerNorm scales and all
biases included) with a larger spread than HF's init, so a wrongly indexed bias table, a
swapped merge order or a mis-rolled window shows up well above the tolerance.
"""

from __future__ import annotations

import copy
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from common import convert  # noqa: E402
from common import sharding as sh  # noqa: E402
from common.flops import compiled_flops  # noqa: E402
from common.layers import MLP  # noqa: E402
from vision import swin  # noqa: E402
from vision.swin_convert import swin_config_from_hf, swin_params_from_torch  # noqa: E402

TOL = 1e-4
# Tiny reference config: every stage windowed, shifted blocks in every stage that allows them.
HF_TINY = dict(
    embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=3, image_size=96
)
# (96, 96): no padding; the last stage (3 x 3) equals the window, so it is not shifted.
# (98, 74): patch padding (98 and 74 are not multiples of 4), window padding in every stage
# (25x19, 13x10, 7x5, 4x3), odd sides before merging, and a non-square image.
SIZES = [(96, 96), (98, 74)]


@pytest.fixture(scope="module")
def hf_swin(hf, randomize_torch):
    torch, transformers = hf
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(**HF_TINY, num_labels=7)
    return randomize_torch(
        transformers.SwinForImageClassification(cfg), 1, 0.2, {"relative_position_bias_table": 1.0}
    )


def _random_params(init, *args, seed=0):
    """Params with the shapes ``init(*args)`` would give, drawn in numpy (no compilation):
    LayerNorm scales around 1, everything else N(0, 0.2^2), bias tables N(0, 1)."""
    shapes = convert.abstract_params(init, jax.random.key(0), *args)
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in shapes.items():
        x = rng.normal(size=v.shape).astype(np.float32)
        if k.endswith("scale"):
            out[k] = 1.0 + 0.2 * x
        elif k.endswith("relative_position_bias_table"):
            out[k] = x
        else:
            out[k] = 0.2 * x
    return {"params": convert.unflatten(out)}


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_logits_and_stage_features_match_hf(hf_swin, size, hf, nchw_images, to_nhwc):
    torch, _ = hf
    model = swin.Swin(**swin_config_from_hf(hf_swin.config))
    params = swin_params_from_torch(hf_swin.state_dict(), model)
    x = nchw_images((2, 3, *size))
    # HF's SwinLayer keeps the window/shift it clamped for small maps across calls: a fresh
    # copy per input size keeps the reference stateless.
    with torch.no_grad():
        ref = copy.deepcopy(hf_swin)(
            torch.from_numpy(x),
            output_hidden_states=True,
            output_hidden_states_before_downsampling=True,
        )
    logits, feats = jax.jit(lambda p, im: model.apply(p, im, return_features=True))(
        params, to_nhwc(x)
    )
    assert logits.shape == (2, 7)
    assert float(jnp.abs(logits - ref.logits.numpy()).max()) <= TOL
    expected = [h.numpy().transpose(0, 2, 3, 1) for h in ref.reshaped_hidden_states[1:]]
    assert [f.shape for f in feats] == [e.shape for e in expected]
    assert [f.shape[1:3] for f in feats] == model.stage_resolutions(*size)
    for f, e in zip(feats, expected, strict=True):
        # un-normalised residual streams grow with depth: compare relative to their scale
        assert float(jnp.abs(f - e).max()) <= TOL * max(1.0, float(np.abs(e).max()))


def _to_legacy_keys(state_dict):
    """A transformers-5 Swin state dict in the hub / transformers-4 layout."""
    renames = [
        (r"\.attention\.q_proj\.", ".attention.self.query."),
        (r"\.attention\.k_proj\.", ".attention.self.key."),
        (r"\.attention\.v_proj\.", ".attention.self.value."),
        (r"\.attention\.relative_position_bias\.", ".attention.self."),
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


def test_headless_swin_model_in_hub_key_layout(hf_swin, hf):
    """A ``SwinModel`` state dict in the hub layout (with a stored relative_position_index
    buffer) converts to the same params as the transformers-5 layout, minus the head."""
    torch, transformers = hf
    model = swin.Swin(**swin_config_from_hf(hf_swin.config))
    full = convert.flatten(swin_params_from_torch(hf_swin.state_dict(), model)["params"])
    sd = _to_legacy_keys(dict(hf_swin.swin.state_dict()))
    assert "encoder.layers.0.blocks.0.attention.self.query.weight" in sd
    index = swin.relative_position_index(3).reshape(-1)
    sd["encoder.layers.0.blocks.0.attention.self.relative_position_index"] = torch.from_numpy(index)
    headless = swin.Swin(**swin_config_from_hf(hf_swin.config, with_head=False))
    got = convert.flatten(swin_params_from_torch(sd, headless)["params"])
    assert set(got) == {k for k in full if not k.startswith("head/")}
    for k, v in got.items():
        np.testing.assert_array_equal(v, full[k], err_msg=k)
    sd["encoder.layers.0.blocks.0.attention.self.relative_position_index"] = torch.from_numpy(
        index[::-1].copy()
    )
    with pytest.raises(ValueError, match="relative_position_index differs"):
        swin_params_from_torch(sd, headless)


def test_converter_errors_name_the_key(hf_swin, hf):
    torch, transformers = hf
    model = swin.Swin(**swin_config_from_hf(hf_swin.config))
    sd = dict(hf_swin.state_dict())
    key = "swin.encoder.layers.1.blocks.0.attention.relative_position_bias."
    key += "relative_position_bias_table"
    sd[key] = torch.zeros(49, 2)
    with pytest.raises(ValueError, match=r"layers\.1\.blocks\.0.*bias_table has shape \(49, 2\)"):
        swin_params_from_torch(sd, model)
    sd = dict(hf_swin.state_dict())
    del sd["swin.encoder.layers.2.downsample.reduction.weight"]
    with pytest.raises(ValueError, match=r"missing 1 key.*layers\.2\.downsample\.reduction"):
        swin_params_from_torch(sd, model)
    sd = dict(hf_swin.state_dict())
    sd["swin.embeddings.position_embeddings"] = torch.zeros(1, 576, 16)
    with pytest.raises(ValueError, match="does not use.*position_embeddings"):
        swin_params_from_torch(sd, model)
    with pytest.raises(ValueError, match="use_absolute_embeddings"):
        swin_config_from_hf(transformers.SwinConfig(use_absolute_embeddings=True))


# --------------------------------------------------------------------------- definitions


def _piece(i, window: int, shift: int):
    """Which window of the partition displaced by ``shift`` holds row/column(s) ``i`` of the
    un-rolled image (paper figure 2: windows start at ``shift + k * M``; the ones cut by the
    border are separate windows)."""
    return (i - shift) // window


def _naive_mask(height, width, window, shift):
    """Mask of every rolled window, from the definition: two positions may attend iff, back
    in the un-rolled image, they fall in the same window of the displaced partition."""
    masks = []
    for wi in range(height // window):
        for wj in range(width // window):
            cells = [
                (wi * window + a, wj * window + b) for a in range(window) for b in range(window)
            ]
            orig = [((r + shift) % height, (c + shift) % width) for r, c in cells]  # un-roll
            label = [(_piece(r, window, shift), _piece(c, window, shift)) for r, c in orig]
            masks.append([[p == q for q in label] for p in label])
    return np.array(masks, dtype=bool)


@pytest.mark.parametrize(
    "height,width,window,shift", [(6, 9, 3, 1), (8, 12, 4, 2), (14, 21, 7, 3), (12, 8, 4, 1)]
)
def test_shifted_window_mask_equals_definition(height, width, window, shift):
    mask = swin.shifted_window_mask(height, width, window, shift)
    assert mask.shape == ((height // window) * (width // window), window**2, window**2)
    np.testing.assert_array_equal(mask, _naive_mask(height, width, window, shift))
    # windows away from the wrapped border are not masked at all
    assert mask[0].all()
    assert not mask[-1].all()


def test_shifted_window_mask_equals_hf(hf):
    torch, transformers = hf
    from transformers.models.swin.modeling_swin import SwinLayer

    cfg = transformers.SwinConfig(window_size=4)
    layer = SwinLayer(cfg, dim=8, input_resolution=(12, 8), num_heads=1, shift_size=2)
    ref = layer.get_attn_mask(12, 8, dtype=torch.float32, device="cpu").numpy() == 0
    np.testing.assert_array_equal(swin.shifted_window_mask(12, 8, 4, 2), ref)


def _naive_window_attention(params, x, window, table_window, shift):
    """(S)W-MSA of ``x [1, H, W, C]`` (H, W multiples of ``window``) as dense attention over
    the whole un-rolled map: position p attends to q iff they share a window of the
    partition displaced by ``shift``, with bias ``table[(dy + T - 1) * (2T - 1) + dx + T - 1]``
    for the offset (dy, dx) = p - q."""
    _, H, W, C = x.shape
    p = params["params"]
    qkv = jnp.einsum("yxc,cthd->tyxhd", x[0], p["qkv"]["kernel"])
    qkv = qkv + p["qkv"]["bias"][:, None, None]
    q, k, v = (a.reshape(H * W, *a.shape[-2:]) for a in qkv)  # [HW, heads, d]
    T = table_window
    rows, cols = np.divmod(np.arange(H * W), W)
    pr, pc = _piece(rows, window, shift), _piece(cols, window, shift)
    same = (pr[:, None] == pr[None]) & (pc[:, None] == pc[None])  # [HW, HW]
    dy, dx = rows[:, None] - rows[None], cols[:, None] - cols[None]
    idx = np.where(same, (dy + T - 1) * (2 * T - 1) + dx + T - 1, 0)
    bias = p["relative_position_bias_table"][idx]  # [HW, HW, heads]
    scores = jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1]) + bias.transpose(2, 0, 1)
    scores = jnp.where(same[None], scores, -jnp.inf)
    out = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, -1), v)
    out = jnp.einsum("qhd,hdc->qc", out, p["out"]["kernel"]) + p["out"]["bias"]
    return out.reshape(1, H, W, C)


@pytest.mark.parametrize("size,shifted", [((6, 9), True), ((8, 8), True), ((2, 2), False)])
def test_window_attention_block_equals_dense_definition(size, shifted):
    """A whole block (roll, window partition, mask, bias, reverse roll) equals dense masked
    attention on the un-rolled image. (8, 8) is padded to (9, 9) first; (2, 2) is smaller
    than the window: one 2 x 2 window reading its offsets from the 5 x 5 table of window 3."""
    window, c = 3, 8
    block = swin.SwinBlock(
        num_heads=2,
        window=window,
        mlp_dim=16,
        drop_path=0.0,
        dropout=0.0,
        attn_dropout=0.0,
        layer_norm_eps=1e-5,
        activation="gelu",
        shifted=shifted,
        deterministic=True,
    )
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, *size, c)), jnp.float32)
    params = _random_params(block.init, x, seed=1)
    got = jax.jit(block.apply)(params, x)

    w, shift = swin.stage_windows(*size, window)
    shift = shift if shifted else 0

    def naive(params, x):
        p = params["params"]
        ln = lambda name, h: nn.LayerNorm(1e-5).apply({"params": p[name]}, h)
        # the reference zero-pads the normed map to whole windows; padded cells take part
        h, (H, W) = ln("ln_1", x), size
        h = jnp.pad(h, ((0, 0), (0, -H % w), (0, -W % w), (0, 0)))
        attn = _naive_window_attention({"params": p["attn"]}, h, w, window, shift)
        h = x + attn[:, :H, :W]
        return h + MLP(16, activation="gelu").apply({"params": p["mlp"]}, ln("ln_2", h))

    np.testing.assert_allclose(got, jax.jit(naive)(params, x), atol=2e-5, rtol=1e-5)


def test_relative_position_index_equals_hf(hf):
    torch, _ = hf
    from transformers.models.swin.modeling_swin import SwinRelativePositionBias

    for m in (2, 3, 7):
        ref = SwinRelativePositionBias(1, (m, m))._create_relative_position_index().numpy()
        np.testing.assert_array_equal(swin.relative_position_index(m), ref)
        assert swin.relative_position_index(m).max() == (2 * m - 1) ** 2 - 1


def test_window_partition_and_reverse():
    b, h, w, c, m = 2, 6, 9, 4, 3
    x = np.random.default_rng(0).normal(size=(b, h, w, c)).astype(np.float32)
    win = swin.window_partition(x, m)
    assert win.shape == (b * (h // m) * (w // m), m, m, c)
    n = 0
    for bi in range(b):  # batch-major, then row-major over windows
        for i in range(h // m):
            for j in range(w // m):
                np.testing.assert_array_equal(
                    win[n], x[bi, i * m : (i + 1) * m, j * m : (j + 1) * m]
                )
                n += 1
    np.testing.assert_array_equal(swin.window_reverse(win, m, h, w), x)
    np.testing.assert_array_equal(swin.window_partition(swin.window_reverse(win, m, h, w), m), win)
    with pytest.raises(ValueError, match="not a multiple of window=4"):
        swin.window_partition(x, 4)


@pytest.mark.parametrize("size", [(4, 6), (5, 7)])
def test_merge_patches_equals_naive_loop(size):
    b, c = 2, 3
    x = np.random.default_rng(0).normal(size=(b, *size, c)).astype(np.float32)
    got = np.asarray(swin.merge_patches(jnp.asarray(x)))
    h2, w2 = -(-size[0] // 2), -(-size[1] // 2)
    assert got.shape == (b, h2, w2, 4 * c)
    padded = np.zeros((b, 2 * h2, 2 * w2, c), np.float32)
    padded[:, : size[0], : size[1]] = x
    for i in range(h2):
        for j in range(w2):
            # the reference's x0, x1, x2, x3: (row, col) offsets (0,0), (1,0), (0,1), (1,1)
            want = [
                padded[:, 2 * i + di, 2 * j + dj] for di, dj in ((0, 0), (1, 0), (0, 1), (1, 1))
            ]
            np.testing.assert_array_equal(got[:, i, j], np.concatenate(want, -1))


# --------------------------------------------------------------------------- sizes


HF_PRESETS = {
    "swin-t": dict(),
    "swin-s": dict(depths=[2, 2, 18, 2]),
    "swin-b": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
    "swin-l": dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48]),
}
PAPER = {"swin-t": 28, "swin-s": 50, "swin-b": 88, "swin-l": 197}  # millions, table 1


def _count(model):
    shapes = convert.abstract_params(
        model.init, jax.random.key(0), jnp.zeros(swin.example_images(model).shape)
    )
    return sum(int(np.prod(s.shape)) for s in shapes.values())


@pytest.mark.parametrize("name", sorted(HF_PRESETS))
@pytest.mark.parametrize("res", [224, 384])
def test_preset_counts_equal_hf_and_paper(name, res, hf):
    torch, transformers = hf
    preset = name if res == 224 else f"{name}-384"
    extra = dict(image_size=384, window_size=12) if res == 384 else {}
    with torch.device("meta"):
        ref = transformers.SwinForImageClassification(
            transformers.SwinConfig(num_labels=1000, **HF_PRESETS[name], **extra)
        )
    expected = sum(p.numel() for p in ref.parameters())
    model = swin.from_preset(preset)
    assert _count(model) == expected
    assert round(expected / 1e6) == PAPER[name]  # 28.29M, 49.61M, 87.77M, 196.53M
    derived = swin_config_from_hf(ref.config)
    for field in ("drop_path_rate",):  # a training choice; HF's default is 0.1
        derived.pop(field)
    assert {k: getattr(model, k) for k in derived} == derived


@pytest.mark.slow
def test_swin_t_flops_at_224():
    """XLA's count for one 224 x 224 image: 9.42e9 FLOPs = 4.71 G multiply-adds; the paper's
    4.5 G counts matmuls only (XLA adds softmax, norms, GELU, bias and mask arithmetic)."""
    model = swin.from_preset("swin-t")
    x = jnp.zeros(swin.example_images(model).shape)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    flops = compiled_flops(lambda p, im: model.apply(p, im), params, x)
    assert 0.97 * 2 * 4.5e9 <= flops <= 1.08 * 2 * 4.5e9, flops


# --------------------------------------------------------------------------- behaviour


def test_toy_preset_features_and_small_last_stage():
    """Shapes only (``jax.eval_shape``): logits, the stage features at strides 4, 8, 16, 32
    with C .. 8C channels (the 3 x 3 map is padded to 4 x 4 before the last merge; the last
    2 x 2 map is smaller than the window), the ``features`` method and the headless model."""
    model = swin.from_preset("swin-toy")
    x = jax.ShapeDtypeStruct((2, 48, 48, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(1), x)
    logits, feats = jax.eval_shape(
        lambda p, im: model.apply(p, im, return_features=True), params, x
    )
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    shapes = [(2, 12, 12, 16), (2, 6, 6, 32), (2, 3, 3, 64), (2, 2, 2, 128)]
    assert [f.shape for f in feats] == shapes
    feats = jax.eval_shape(lambda p, im: model.apply(p, im, method="features"), params, x)
    assert [f.shape for f in feats] == shapes
    headless = swin.from_preset("swin-toy", num_classes=0)
    pooled = jax.eval_shape(headless.apply, jax.eval_shape(headless.init, jax.random.key(1), x), x)
    assert pooled.shape == (2, 128)
    assert swin.stage_windows(2, 2, 3) == (2, 0) and swin.stage_windows(12, 12, 3) == (3, 1)


# Two stages (6 x 6 shifted, 3 x 3 single window) are enough for the behaviour below.
SMALL = dict(depths=(2, 2), num_heads=(1, 2), image_size=24)


@pytest.fixture(scope="module")
def small():
    model = swin.from_preset("swin-toy", **SMALL, drop_path_rate=0.5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 24, 24, 3)), jnp.float32)
    params = _random_params(model.init, x, seed=1)
    return model, params, x, jax.jit(model.apply)(params, x)


@pytest.mark.slow
def test_stochastic_depth_and_dropout(small):
    model, params, x, det = small
    rates = swin.from_preset("swin-toy", drop_path_rate=0.5).drop_path_rates()
    assert len(rates) == 8 and rates[0] == 0.0 and rates[-1] == 0.5
    np.testing.assert_allclose(np.diff(rates), 0.5 / 7)
    train = jax.jit(
        lambda p, im, key: model.apply(p, im, deterministic=False, rngs={"dropout": key})
    )
    a, b = train(params, x, jax.random.key(0)), train(params, x, jax.random.key(1))
    assert not np.allclose(a, det) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, train(params, x, jax.random.key(0)))


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params(small):
    model, params, x, ref = small
    bf16 = swin.from_preset("swin-toy", **SMALL, dtype=jnp.bfloat16)
    logits = jax.jit(bf16.apply)(params, x)
    assert logits.dtype == jnp.float32
    assert float(jnp.abs(logits - ref).max()) < 0.05 * max(1.0, float(jnp.abs(ref).max()))
    # The stage features and every submodule's output are bfloat16 (only the logits are
    # cast to float32); the bfloat16 model's params are stored in float32.
    _, feats = jax.eval_shape(lambda p, im: bf16.apply(p, im, return_features=True), params, x)
    assert len(feats) == 2 and {f.dtype for f in feats} == {jnp.dtype(jnp.bfloat16)}
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


@pytest.mark.slow
def test_sharded_forward_equals_single_device(small):
    """Params sharded by their logical axes (``embed`` over ``fsdp``) and the batch over a
    4 x 2 (data, fsdp) mesh of simulated devices: same logits."""
    from common import sharding

    model, params, _, _ = small
    x = np.random.default_rng(2).normal(size=(8, 24, 24, 3)).astype(np.float32)
    y1 = jax.jit(model.apply)(params, x)
    mesh = sharding.make_mesh(4, 2)
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)
    placed = jax.device_put(params, sharding.logical_shardings(boxed, mesh))
    assert placed["params"]["stage_1_block_0"]["mlp"]["fc"]["kernel"].sharding.spec[0] == sh.FSDP
    y8 = jax.jit(model.apply)(placed, sharding.put_batch(x, mesh))
    assert len(y8.sharding.device_set) == 8
    np.testing.assert_allclose(y8, y1, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = swin.from_preset("swin-toy")
    x = jax.ShapeDtypeStruct((1, 48, 48, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    shape = lambda m, *s: jax.eval_shape(m.apply, params, jax.ShapeDtypeStruct(s, jnp.float32))
    with pytest.raises(ValueError, match=r"images must be \[batch, height, width, channels\]"):
        shape(model, 48, 48, 3)
    with pytest.raises(ValueError, match="1 channels.*num_channels=3"):
        shape(model, 1, 48, 48, 1)
    strict = swin.from_preset("swin-toy", pad_inputs=False)
    shape(strict, 1, 96, 96, 3)  # 24, 12, 6, 3: no padding needed
    with pytest.raises(ValueError, match="not a multiple of patch_size=4"):
        shape(strict, 1, 98, 96, 3)
    with pytest.raises(ValueError, match=r"stage 0 map 20x20 is not a multiple of window 3"):
        shape(strict, 1, 80, 80, 3)
    with pytest.raises(ValueError, match=r"stage 1 map 3x3 has an odd side"):
        shape(strict, 1, 24, 24, 3)
    shape(model, 1, 98, 74, 3)  # the default pads instead


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match=r"num_heads=\(1, 2\) needs one entry per stage"):
        swin.from_preset("swin-toy", num_heads=(1, 2))
    with pytest.raises(ValueError, match=r"num_heads\[1\]=3 does not divide stage 1 width 32"):
        swin.from_preset("swin-toy", num_heads=(1, 3, 4, 8))
    with pytest.raises(ValueError, match="drop_path_rate=1.0"):
        swin.from_preset("swin-toy", drop_path_rate=1.0)
    with pytest.raises(ValueError, match="window_size=0"):
        swin.from_preset("swin-toy", window_size=0)
    with pytest.raises(ValueError, match="unknown Swin fields"):
        swin.from_preset("swin-toy", window=7)
    with pytest.raises(ValueError, match="unknown Swin preset"):
        swin.from_preset("swin-xl")
    with pytest.raises(ValueError, match=r"shift=3 must be in \[0, window=3\)"):
        swin.shifted_window_mask(6, 6, 3, 3)


def test_merge_patches_is_inverted_by_depth_to_space():
    """Patch merging only regroups values (no loss): putting each of the four ``C``-channel
    slices back at its (row, col) offset recovers the (even-sided) input exactly, and
    window partitioning the merged map equals merging each window of side ``2M``."""
    b, h, w, c, m = 2, 12, 8, 3, 2
    x = np.random.default_rng(1).normal(size=(b, h, w, c)).astype(np.float32)
    merged = np.asarray(swin.merge_patches(jnp.asarray(x)))  # [b, h/2, w/2, 4c]
    back = np.zeros_like(x)
    for k, (di, dj) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        back[:, di::2, dj::2] = merged[..., k * c : (k + 1) * c]
    np.testing.assert_array_equal(back, x)
    per_window = swin.merge_patches(swin.window_partition(jnp.asarray(x), 2 * m))
    np.testing.assert_array_equal(swin.window_partition(jnp.asarray(merged), m), per_window)


@pytest.mark.slow
def test_convolutional_stem_equals_naive_convs():
    """``stem_channels``: log2(patch) 3x3 stride-2 convs (XLA's "SAME": for even sides no
    padding before, one row and column after), LayerNorm, GELU, then a 1x1 conv to C. The
    first conv equals a loop over output pixels; the stage maps keep the patch grid."""
    model = swin.from_preset("swin-toy", **SMALL, stem_channels=(4, 8))
    x = np.random.default_rng(3).normal(size=(2, 24, 24, 3)).astype(np.float32)
    params = _random_params(model.init, jnp.asarray(x), seed=2)
    (_, feats), state = model.apply(
        params, x, return_features=True, capture_intermediates=True, mutable=["intermediates"]
    )
    assert [f.shape for f in feats] == [(2, 6, 6, 16), (2, 3, 3, 32)]
    conv0 = params["params"]["stem_conv_0"]
    kernel, bias = np.asarray(conv0["kernel"]), np.asarray(conv0["bias"])  # [3, 3, 3, 4]
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    naive = np.zeros((2, 12, 12, 4), np.float32)
    for i in range(12):
        for j in range(12):
            patch = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]  # [b, 3, 3, c]
            naive[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel) + bias
    got = state["intermediates"]["stem_conv_0"]["__call__"][0]
    np.testing.assert_allclose(got, naive, atol=1e-5, rtol=1e-5)
    assert params["params"]["patch_embed"]["kernel"].shape == (1, 1, 8, 16)
    with pytest.raises(ValueError, match=r"stem_channels=\(4,\) has 1 stride-2 convs.*"):
        swin.from_preset("swin-toy", stem_channels=(4,))

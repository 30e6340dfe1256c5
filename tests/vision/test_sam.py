"""Segment Anything: image embeddings, masks and IoU predictions equal ``segment_anything``'s
and Hugging Face ``SamModel``'s after converting their (randomly drawn) weights; windowed
attention with padding equals the reference at grids that are and are not multiples of the
window; the decomposed relative bias equals its definition; preset parameter counts equal
the reference's; bfloat16 compute with float32 params; checkpoints of another size and bad
prompts fail with errors naming the problem.

``sam_reference`` (beside this file) imports ``segment_anything`` without torchvision.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vision.sam import convert as sam_convert  # noqa: E402
from vision.sam import image_encoder as enc_lib  # noqa: E402
from vision.sam import model as sam_model  # noqa: E402

torch = pytest.importorskip("torch")
import sam_reference  # noqa: E402

try:
    sam_reference.segment_anything()
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"segment_anything is not installed: {e}", allow_module_level=True)

TOL = 1e-4


@functools.cache
def _embed_fn(model):
    return jax.jit(functools.partial(model.apply, method="embed_images"))


@functools.cache
def _decode_fn(model, multimask: bool):
    return jax.jit(
        lambda v, e, p, l, b, m: model.apply(v, e, p, l, b, m, multimask, method="decode")
    )


def _embed(model, variables, images):
    return _embed_fn(model)(variables, images)


def _decode(model, variables, emb, points, labels, boxes, masks, multimask=True):
    return _decode_fn(model, multimask)(variables, emb, points, labels, boxes, masks)


@pytest.fixture(scope="module")
def tiny():
    """The reference tiny SAM, ours and the converted variables."""
    ref = sam_reference.build_tiny(seed=0)
    model = sam_model.from_preset("sam-tiny")
    return ref, model, sam_convert.sam_variables_from_torch(ref.state_dict(), model)


def _nhwc(x):
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _prompts(seed: int, b: int = 3):
    gen = torch.Generator().manual_seed(seed)
    points = torch.rand(b, 2, 2, generator=gen) * 64
    labels = torch.tensor([[1, 0], [1, -1], [0, 1]])[:b]
    x0y0 = torch.rand(b, 2, generator=gen) * 30
    boxes = torch.cat([x0y0, x0y0 + 5 + torch.rand(b, 2, generator=gen) * 28], 1)
    masks = torch.randn(b, 1, 32, 32, generator=gen) * 3
    return points, labels, boxes, masks


def test_image_embeddings_equal_reference(tiny):
    ref, model, variables = tiny
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.image_encoder(x).permute(0, 2, 3, 1).numpy()  # [b, 8, 8, 32]
    got = _embed(model, variables, _nhwc(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "use,multimask",
    [("points", True), ("points+box+mask", False), ("box", True), ("mask", False)],
)
@pytest.mark.slow
def test_masks_and_iou_equal_reference(tiny, use, multimask):
    ref, model, variables = tiny
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    points, labels, boxes, masks = _prompts(3)
    kw = dict(
        points=(points, labels) if "points" in use else None,
        boxes=boxes if "box" in use else None,
        masks=masks if "mask" in use else None,
    )
    with torch.no_grad():
        emb = ref.image_encoder(x)
        sparse, dense = ref.prompt_encoder(**kw)
        pe = ref.prompt_encoder.get_dense_pe()
        want_masks, want_iou = ref.mask_decoder(emb, pe, sparse, dense, multimask)
    arr = lambda t: None if t is None else jnp.asarray(t.numpy())
    got_masks, got_iou = _decode(
        model,
        variables,
        _embed(model, variables, _nhwc(x)),
        arr(points) if kw["points"] else None,
        arr(labels) if kw["points"] else None,
        arr(kw["boxes"]),
        None if kw["masks"] is None else arr(masks[:, 0]),
        multimask,
    )
    assert got_masks.shape == want_masks.shape  # [b, 3 or 1, 32, 32]
    np.testing.assert_allclose(np.asarray(got_masks), want_masks.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got_iou), want_iou.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "image_size,patch,window", [(64, 8, 3), (64, 8, 4), (80, 8, 3), (48, 8, 5)]
)
def test_windowed_attention_with_padding_equals_reference(image_size, patch, window):
    """Grids 8, 8, 10, 6 against windows 3, 4, 3, 5: padded (8 -> 9, 10 -> 12, 6 -> 10) and not."""
    ref = sam_reference.build_tiny(
        seed=4, image_size=image_size, patch_size=patch, window_size=window, depth=3
    )
    model = sam_model.from_preset(
        "sam-tiny",
        image_size=image_size,
        patch_size=patch,
        window_size=window,
        encoder_layers=3,
        global_attn_indexes=(2,),
    )
    variables = sam_convert.sam_variables_from_torch(ref.state_dict(), model)
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref.image_encoder(x).permute(0, 2, 3, 1).numpy()
    got = _embed(model, variables, _nhwc(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_window_partition_round_trips_and_pads_with_zeros():
    x = jnp.arange(2 * 5 * 7 * 3, dtype=jnp.float32).reshape(2, 5, 7, 3) + 1
    windows, padded = enc_lib.window_partition(x, 3)
    assert padded == (6, 9) and windows.shape == (2 * 2 * 3, 3, 3, 3)
    np.testing.assert_array_equal(windows[1], np.asarray(x[0, 0:3, 3:6]))  # row-major windows
    np.testing.assert_array_equal(windows[5, 2], 0.0)  # image 0, window (1, 2): row 6 is padding
    np.testing.assert_array_equal(enc_lib.window_unpartition(windows, 3, padded, (5, 7)), x)


def test_decomposed_relative_bias_equals_direct_sum():
    rng = np.random.default_rng(0)
    b, h, w, n, d = 2, 3, 4, 2, 5
    q = rng.normal(size=(b, h, w, n, d)).astype(np.float32)
    table_h = rng.normal(size=(2 * h - 1, d)).astype(np.float32)
    table_w = rng.normal(size=(2 * w - 1, d)).astype(np.float32)
    got = np.asarray(enc_lib.decomposed_relative_bias(jnp.asarray(q), table_h, table_w))
    want = np.zeros((b, n, h * w, h * w), np.float32)
    for i in range(h):
        for j in range(w):
            for k in range(h):
                for l in range(w):
                    r = q[:, i, j] @ (table_h[i - k + h - 1] + table_w[j - l + w - 1])
                    want[:, :, i * w + j, k * w + l] = r  # [b, heads]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_relative_table_of_another_size_is_an_error():
    with pytest.raises(ValueError, match="relative position table of 5 rows"):
        enc_lib.relative_table(jnp.zeros((5, 4)), 4, 4)


@pytest.mark.slow
def test_preset_counts_equal_reference():
    """Counts from ``jax.eval_shape`` against the reference built on the meta device."""
    sa = sam_reference.segment_anything()
    for ours, theirs in (("sam-vit-b", "vit_b"), ("sam-vit-l", "vit_l"), ("sam-vit-h", "vit_h")):
        with torch.device("meta"):
            ref = sa.sam_model_registry[theirs](checkpoint=None)
        want = {
            part: sum(p.numel() for p in getattr(ref, part).parameters())
            for part in ("image_encoder", "prompt_encoder", "mask_decoder")
        }
        assert sam_model.parameter_counts(sam_model.from_preset(ours)) == want, ours
    assert want == {
        "image_encoder": 637_026_048,
        "prompt_encoder": 6_220,
        "mask_decoder": 4_058_340,
    }


def test_checkpoint_of_another_size_names_the_mismatch(tiny):
    ref, _, _ = tiny
    wider = sam_model.from_preset("sam-tiny", encoder_dim=48, encoder_heads=3)
    with pytest.raises(ValueError, match="encoder_dim: checkpoint 32 vs model 48.*sam-tiny"):
        sam_convert.sam_variables_from_torch(ref.state_dict(), wider)
    with torch.device("meta"):
        vit_h = sam_reference.segment_anything().sam_model_registry["vit_h"](checkpoint=None)
    fake = {
        k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in vit_h.state_dict().items()
    }
    assert sam_convert.preset_for_state_dict(fake) == "sam-vit-h"
    with pytest.raises(ValueError, match="encoder_dim: checkpoint 1280 vs model 768.*sam-vit-h"):
        sam_convert.sam_variables_from_torch(fake, sam_model.from_preset("sam-vit-b"))


def test_pth_file_loads_with_weights_only(tiny, tmp_path):
    ref, model, variables = tiny
    path = tmp_path / "sam_tiny.pth"
    torch.save(ref.state_dict(), path)
    loaded_model, loaded = sam_convert.load_torch(path)
    assert loaded_model == model
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unused_checkpoint_keys_are_reported(tiny):
    ref, model, _ = tiny
    sd = dict(ref.state_dict(), extra_head_weight=torch.zeros(3))
    with pytest.raises(ValueError, match="extra_head_weight"):
        sam_convert.sam_variables_from_torch(sd, model)


HF_TINY = dict(
    vision_config=dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_dim=128,
        image_size=64,
        patch_size=8,
        window_size=3,
        global_attn_indexes=[1],
        output_channels=32,
        num_pos_feats=16,  # 2 * num_pos_feats must equal the prompt encoder's width
    ),
    prompt_encoder_config=dict(
        hidden_size=32, image_embedding_size=8, image_size=64, patch_size=8, mask_input_channels=8
    ),
    mask_decoder_config=dict(
        hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
    ),
)


@pytest.mark.slow
def test_hf_sam_model_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.SamConfig(**HF_TINY)
    hf = sam_reference.randomize(transformers.SamModel(config), seed=6)
    hf.save_pretrained(tmp_path)
    model, variables = sam_convert.load_hf(tmp_path)
    assert model.decoder_layer_norm_eps == 1e-6  # HF's two-way LayerNorms differ from the original
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    points, labels, boxes, masks = _prompts(8)
    with torch.no_grad():
        emb = hf.get_image_embeddings(x)
        out = hf(
            image_embeddings=emb,
            input_points=points[None],
            input_labels=labels.clamp(min=0)[None],
            input_boxes=boxes[None],
            input_masks=masks[:1],  # HF takes one mask per image, shared by its prompts
            multimask_output=True,
        )
    got_emb = _embed(model, variables, _nhwc(x))
    np.testing.assert_allclose(np.asarray(got_emb), _nhwc(emb), atol=TOL, rtol=0)
    got_masks, got_iou = _decode(
        model,
        variables,
        got_emb,
        jnp.asarray(points.numpy()),
        jnp.asarray(labels.clamp(min=0).numpy()),
        jnp.asarray(boxes.numpy()),
        jnp.asarray(masks[:1, 0].expand(3, -1, -1).numpy()),
        True,
    )
    np.testing.assert_allclose(np.asarray(got_masks), out.pred_masks[0].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got_iou), out.iou_scores[0].numpy(), atol=TOL, rtol=0)


def _matmul_operand_dtypes(jaxpr) -> list[tuple[str, tuple, tuple[str, ...]]]:
    """(primitive, first operand shape, operand dtypes) of every dot and convolution, nested
    jaxprs (jit, remat, custom gradients) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            avals = [v.aval for v in eqn.invars]
            found.append((eqn.primitive.name, avals[0].shape, tuple(str(a.dtype) for a in avals)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_matmul_operand_dtypes(inner))
    return found


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params(tiny):
    """bfloat16 reaches every matmul and convolution except the Fourier features of the
    prompt coordinates (``[.., 2] @ [2, dim/2]``, kept in float32 on purpose); params stay
    float32; the bfloat16 embeddings are near the float32 model's."""
    _, model, variables = tiny
    low = model.clone(dtype=jnp.bfloat16)
    inputs = sam_model.init_inputs(low)
    abstract = jax.eval_shape(lambda r: sam_model.init(low, r), jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(abstract))} == {jnp.dtype(jnp.float32)}
    stored = model.clone(param_dtype=jnp.bfloat16)
    abstract = nn.meta.unbox(jax.eval_shape(lambda r: sam_model.init(stored, r), jax.random.key(0)))
    assert {x.dtype for x in jax.tree.leaves(abstract["params"])} == {jnp.dtype(jnp.bfloat16)}
    jaxpr = jax.make_jaxpr(lambda v: low.apply(v, **inputs))(variables).jaxpr
    ops = _matmul_operand_dtypes(jaxpr)
    assert len(ops) > 20
    f32 = [op for op in ops if "float32" in op[2]]
    assert f32 and all(op[0] == "dot_general" and op[1][-1] == 2 for op in f32), f32
    images = inputs["images"] + jax.random.normal(jax.random.key(1), inputs["images"].shape)
    emb = _embed(low, variables, images)
    assert emb.dtype == jnp.bfloat16
    want = np.asarray(_embed(model, variables, images))
    np.testing.assert_allclose(np.asarray(emb, np.float32), want, atol=0.1 * np.abs(want).max())


def test_point_prompts_need_labels(tiny):
    _, model, variables = tiny
    emb = jnp.zeros((1, 8, 8, 32))
    with pytest.raises(ValueError, match="need both points"):
        model.apply(variables, emb, jnp.zeros((1, 1, 2)), None, method="decode")
    with pytest.raises(ValueError, match="mask prompt must be"):
        model.apply(variables, emb, None, None, None, jnp.zeros((1, 16, 16)), method="decode")
    with pytest.raises(ValueError, match="SAM image encoder input must be"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)), method="embed_images")

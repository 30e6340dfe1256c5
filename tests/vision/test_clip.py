"""CLIP: image / text embeddings and logits equal Hugging Face ``CLIPModel``'s after
converting its weights (both [EOS] pooling rules, two image resolutions, two text lengths);
the contrastive loss equals a per-pair loop and HF's loss, and is the same (with its
gradients) with the batch sharded over 8 devices as on one; zero-shot class weights equal
their definition; the temperature keeps a live gradient at its cap and
``clamp_logit_scale`` keeps the parameter within ``[0, log 100]`` after an optimizer step;
bfloat16 compute reaches every submodule; preset sizes equal HF's; bad inputs raise errors
naming the problem.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from common import convert, sharding  # noqa: E402
from vision import clip  # noqa: E402
from vision.clip_convert import clip_config_from_hf, clip_params_from_torch  # noqa: E402

TOL = 1e-4
VOCAB = 99
HF_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
)
HF_VISION = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    image_size=32, patch_size=8,
)  # fmt: skip
LOGIT_SCALE = {"logit_scale": ("fill", math.log(20.0))}


def _hf_clip(hf, randomize_torch, eos_token_id: int, seed: int):
    torch, transformers = hf
    cfg = transformers.CLIPConfig(
        text_config=dict(**HF_TEXT, eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=1),
        vision_config=HF_VISION,
        projection_dim=24,
    )
    torch.manual_seed(0)
    # every parameter drawn wider than HF's init; temperature exp(logit_scale) = 20
    return randomize_torch(transformers.CLIPModel(cfg), seed, 0.3, LOGIT_SCALE)


@pytest.fixture(scope="module")
def hf_eos(hf, randomize_torch):
    """HF's current rule: pool at the first ``eos_token_id``."""
    return _hf_clip(hf, randomize_torch, eos_token_id=VOCAB - 1, seed=1)


@pytest.fixture(scope="module")
def hf_argmax(hf, randomize_torch):
    """HF's legacy rule (``eos_token_id == 2``): pool at the largest id (OpenAI's code)."""
    return _hf_clip(hf, randomize_torch, eos_token_id=2, seed=2)


def _tokens(batch: int, length: int, rule: str, seed: int) -> np.ndarray:
    """Token rows ending at varying [EOS] positions, padded after it."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, VOCAB - 1, size=(batch, length))
    for row, end in enumerate(rng.integers(1, length, size=batch)):
        if rule == "eos":  # pad with the EOS id itself: pooling must take the first one
            tokens[row, end:] = VOCAB - 1
        else:  # a unique largest id at `end`, zeros after it
            tokens[row, end] = VOCAB - 1
            tokens[row, end + 1 :] = 0
    return tokens.astype(np.int64)


# (32 x 32, 16 tokens) is the tables' size; (48 x 40, 9 tokens) resizes the 4 x 4 position
# grid to 6 x 5 (bicubic, HF's interpolate_pos_encoding=True) and uses a shorter text.
@pytest.mark.parametrize(
    "rule,size,length,n_img,n_txt", [("eos", (32, 32), 16, 3, 4), ("argmax", (48, 40), 9, 4, 4)]
)
@pytest.mark.slow
def test_embeddings_and_logits_match_hf(
    hf_eos, hf_argmax, rule, size, length, n_img, n_txt, hf, to_nhwc
):
    torch, _ = hf
    reference = hf_eos if rule == "eos" else hf_argmax
    cfg = clip_config_from_hf(reference.config)
    assert cfg["eos_token_id"] == (VOCAB - 1 if rule == "eos" else None)
    model = clip.CLIP(**cfg)
    params = clip_params_from_torch(reference.state_dict(), model)
    images = np.random.default_rng(0).normal(size=(n_img, 3, *size)).astype(np.float32)
    tokens = _tokens(n_txt, length, rule, seed=1)
    with torch.no_grad():
        ref = reference(
            input_ids=torch.from_numpy(tokens),
            pixel_values=torch.from_numpy(images),
            interpolate_pos_encoding=size != (32, 32),
            return_loss=n_img == n_txt,
        )
        ref_img = reference.get_image_features(
            pixel_values=torch.from_numpy(images), interpolate_pos_encoding=size != (32, 32)
        ).pooler_output
        ref_txt = reference.get_text_features(input_ids=torch.from_numpy(tokens)).pooler_output

    def run(p, im, tk):  # one compilation for the forward pass and both encoders
        enc = clip.CLIP
        return (
            model.apply(p, im, tk),
            model.apply(p, im, method=enc.encode_image),
            model.apply(p, tk, method=enc.encode_text),
        )

    out, img, txt = jax.jit(run)(params, to_nhwc(images), jnp.asarray(tokens, jnp.int32))
    diff = lambda a, b: float(np.abs(np.asarray(a) - b.numpy()).max())
    assert out["logits_per_image"].shape == (n_img, n_txt)
    assert diff(out["image_embeds"], ref.image_embeds) <= TOL
    assert diff(out["text_embeds"], ref.text_embeds) <= TOL
    assert diff(out["logits_per_image"], ref.logits_per_image) <= TOL
    assert diff(out["logits_per_text"], ref.logits_per_text) <= TOL
    assert diff(img, ref_img) <= TOL and diff(txt, ref_txt) <= TOL
    if n_img == n_txt:
        assert abs(float(clip.contrastive_loss(out["logits_per_image"])) - float(ref.loss)) <= TOL


def test_converter_errors_name_the_key(hf_eos, hf):
    torch, transformers = hf
    model = clip.CLIP(**clip_config_from_hf(hf_eos.config))
    sd = dict(hf_eos.state_dict())
    sd["text_model.encoder.layers.1.mlp.fc1.weight"] = torch.zeros(63, 32)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.fc1\.weight has shape \(63, 32\)"):
        clip_params_from_torch(sd, model)
    sd = dict(hf_eos.state_dict())
    del sd["logit_scale"], sd["vision_model.pre_layrnorm.bias"]
    with pytest.raises(ValueError, match=r"missing 2 key.*logit_scale.*pre_layrnorm\.bias"):
        clip_params_from_torch(sd, model)
    sd = {**hf_eos.state_dict(), "text_model.pooler.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"does not use.*text_model\.pooler\.weight"):
        clip_params_from_torch(sd, model)
    sd = {**hf_eos.state_dict(), "text_model.embeddings.position_ids": torch.arange(16)}
    clip_params_from_torch(sd, model)  # old checkpoints' buffers are ignored
    with pytest.raises(ValueError, match=r"position_embedding\.weight has shape \(16, 32\), exp"):
        clip_params_from_torch(hf_eos.state_dict(), model.clone(context_length=20))
    bad = transformers.CLIPConfig(text_config=dict(hidden_act="gelu"))
    with pytest.raises(ValueError, match="hidden_act differs"):
        clip_config_from_hf(bad)


# --------------------------------------------------------------------------- loss


def test_loss_equals_naive_per_pair_loop():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(5, 5))
    naive = 0.0
    for i in range(5):  # image i against every caption, caption i against every image
        naive += -math.log(math.exp(logits[i, i]) / sum(math.exp(logits[i, j]) for j in range(5)))
        naive += -math.log(math.exp(logits[i, i]) / sum(math.exp(logits[j, i]) for j in range(5)))
    naive /= 2 * 5
    got = float(clip.contrastive_loss(jnp.asarray(logits, jnp.float32)))
    assert got == pytest.approx(naive, rel=1e-6)
    with pytest.raises(ValueError, match="must be square"):
        clip.contrastive_loss(jnp.zeros((3, 4)))


@pytest.fixture(scope="module")
def tiny():
    model = clip.from_preset("clip-tiny", vision_layers=1, text_layers=1)  # compiles faster
    images, tokens = clip.example_inputs(model, 16)
    rng = np.random.default_rng(0)
    x = rng.normal(size=images.shape).astype(np.float32)
    t = rng.integers(0, model.vocab_size, size=tokens.shape).astype(np.int32)
    # Random params of the model's shapes (no init compilation): norm scales near 1.
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t))
    draw = lambda path, s: (
        (1.0 if path[-1].key == "scale" else 0.0)
        + 0.3 * rng.normal(size=s.shape).astype(np.float32)
    )
    params = jax.tree_util.tree_map_with_path(draw, shapes)
    params["params"]["logit_scale"] = np.float32(math.log(1 / 0.07))
    return model, params, x, t, jax.jit(model.apply)


@pytest.mark.slow
def test_sharded_loss_and_grads_equal_single_device(tiny):
    """Batch of 16 split over 8 devices on the data axis: the loss contrasts all 16 x 16
    pairs (not 8 local 2 x 2 blocks), and loss and grads equal the one-device values."""
    model, params, x, t, fwd = tiny
    assert jax.device_count() == 8, "tests run with 8 simulated CPU devices (conftest.py)"

    def loss_fn(p, images, tokens):
        return clip.contrastive_loss(model.apply(p, images, tokens)["logits_per_image"])

    grad_fn = jax.value_and_grad(loss_fn)
    one = jax.devices()[0]
    loss_1, grads_1 = jax.jit(grad_fn)(*jax.device_put((params, x, t), one))

    mesh = sharding.make_mesh(data=8, fsdp=1)
    batch = NamedSharding(mesh, PartitionSpec(sharding.DATA))
    rep = sharding.replicated(mesh)
    xs, ts = jax.device_put(x, batch), jax.device_put(t, batch)
    assert len(xs.addressable_shards) == 8 and xs.addressable_shards[0].data.shape[0] == 2
    sharded = jax.jit(grad_fn, in_shardings=(rep, batch, batch), out_shardings=rep)
    loss_8, grads_8 = sharded(jax.device_put(params, rep), xs, ts)

    assert float(loss_8) == pytest.approx(float(loss_1), rel=1e-5)
    for g1, g8 in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_8), strict=True):
        g1, g8 = np.asarray(g1), np.asarray(g8)
        np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(g1).max()))
    # A per-device loss (each device contrasting only its own 2 pairs: the 2 x 2 diagonal
    # blocks of the global logits, as the encoders are per-example) would differ.
    logits = fwd(params, x, t)["logits_per_image"]
    assert float(clip.contrastive_loss(logits)) == pytest.approx(float(loss_1), rel=1e-5)
    local = np.mean(
        [float(clip.contrastive_loss(logits[i : i + 2, i : i + 2])) for i in range(0, 16, 2)]
    )
    assert abs(local - float(loss_1)) > 0.1


CAP = float(jnp.float32(math.log(100.0)))  # where clamp_logit_scale holds the parameter


def test_temperature_gradient_is_live_below_and_at_the_cap(tiny):
    """The multiplier is ``exp(logit_scale)`` with a nonzero gradient just below and at the
    cap. A forward ``min(exp(s), 100)`` had zero gradient there: exp of float32 log(100) is
    100.00001, so a parameter clamped to the cap could never come back down."""
    model, params, x, t, fwd = tiny
    init = nn.unbox(model.init(jax.random.key(0), method=lambda m: m.temperature()))  # scale only
    assert float(init["params"]["logit_scale"]) == pytest.approx(math.log(1 / 0.07), rel=1e-6)

    def with_scale(s):
        return {"params": {**params["params"], "logit_scale": s}}

    def loss(s):
        return clip.contrastive_loss(model.apply(with_scale(s), x, t)["logits_per_image"])

    grad = jax.jit(jax.grad(loss))
    for s in (CAP - 1e-3, CAP):
        assert abs(float(grad(jnp.float32(s)))) > 1.0, s
    out = fwd(with_scale(jnp.float32(CAP)), x, t)
    assert float(out["logit_scale"]) == pytest.approx(100.0, rel=1e-6)
    cos = np.asarray(out["image_embeds"]) @ np.asarray(out["text_embeds"]).T
    scale = float(out["logit_scale"])
    np.testing.assert_allclose(out["logits_per_image"], scale * cos, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_clamp_logit_scale_keeps_the_parameter_in_range_after_a_step(tiny):
    """AdamW (lr 0.1) then ``clamp_logit_scale``: a step that would take the parameter past
    log(100) or below 0 stops at the bound; from the cap a gradient that asks for a lower
    temperature brings it down; every other parameter's update is AdamW's own."""
    model, params, _, _, _ = tiny
    adamw = optax.adamw(0.1, weight_decay=0.0)
    tx = optax.chain(adamw, clip.clamp_logit_scale(model.logit_scale_max))
    temperature = lambda p: model.apply(p, method=lambda m: m.temperature())
    rng = np.random.default_rng(3)
    noise = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), params)

    def step(s, sign):  # one step on sign * temperature (+1: lower it, -1: raise it)
        p = {"params": {**params["params"], "logit_scale": jnp.float32(s)}}
        g = jax.grad(lambda q: sign * temperature(q))(p)
        g["params"] = {**noise["params"], "logit_scale": g["params"]["logit_scale"]}
        updates, _ = tx.update(g, tx.init(p), p)
        plain, _ = adamw.update(g, adamw.init(p), p)
        new = optax.apply_updates(p, updates)
        others = lambda tree: {k: v for k, v in tree["params"].items() if k != "logit_scale"}
        jax.tree.map(np.testing.assert_array_equal, others(updates), others(plain))
        return float(new["params"]["logit_scale"]), float(
            optax.apply_updates(p, plain)["params"]["logit_scale"]
        )

    clamped, unclamped = step(CAP - 0.05, sign=-1.0)
    assert unclamped > CAP and clamped == CAP  # at most log(100) (in float32)
    clamped, unclamped = step(CAP, sign=+1.0)
    assert clamped == unclamped < CAP  # a live gradient at the cap: back down
    clamped, unclamped = step(0.05, sign=+1.0)
    assert unclamped < 0.0 and clamped == 0.0
    with pytest.raises(ValueError, match="needs the params"):
        clip.clamp_logit_scale().update(noise, optax.EmptyState())
    with pytest.raises(ValueError, match="max_scale=0.5 must be >= 1"):
        clip.clamp_logit_scale(0.5)


# --------------------------------------------------------------------------- zero-shot


def _toy_tokenize(model):
    """Bytes of each prompt (mod the vocab) followed by the largest id as [EOS]."""

    def tokenize(prompts):
        out = np.zeros((len(prompts), model.context_length), np.int32)
        for i, p in enumerate(prompts):
            ids = [b % (model.vocab_size - 1) for b in p.encode()][: model.context_length - 1]
            out[i, : len(ids) + 1] = ids + [model.vocab_size - 1]
        return out

    return tokenize


def test_zero_shot_weights_and_classify(tiny):
    model, params, x, t, fwd = tiny
    tokenize = _toy_tokenize(model)
    names, templates = ["cat", "dog", "boot"], ["a {}", "the {}!", "{} photo"]
    w = model.zero_shot_weights(params, tokenize, names, templates, batch_size=4)
    assert w.shape == (3, model.projection_dim) and w.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(w, axis=-1), 1.0, rtol=1e-6)
    # definition: per class, the mean of normalised prompt embeddings, renormalised
    prompts = [tp.format(n) for n in names for tp in templates] + ["pad"] * 7  # 16 rows
    out = fwd(params, x, tokenize(prompts))
    e = np.asarray(out["text_embeds"])[:9].reshape(3, 3, -1).mean(1)
    np.testing.assert_allclose(w, e / np.linalg.norm(e, axis=-1, keepdims=True), atol=1e-5)
    logits = jax.jit(lambda p, im, cw: model.apply(p, im, cw, method=clip.CLIP.classify))(
        params, x, w
    )
    expected = float(out["logit_scale"]) * np.asarray(out["image_embeds"]) @ np.asarray(w).T
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="prompt template list is empty"):
        model.zero_shot_weights(params, tokenize, names, [])
    with pytest.raises(ValueError, match="class name list is empty"):
        model.zero_shot_weights(params, tokenize, [], templates)
    with pytest.raises(ValueError, match=r"without a '\{\}' slot.*'a photo'"):
        model.zero_shot_weights(params, tokenize, names, ["a photo", "a {}"])
    with pytest.raises(ValueError, match=r"class_weights must be \[num_classes, projection_dim"):
        jax.eval_shape(lambda p: model.apply(p, x, w[:, :5], method=clip.CLIP.classify), params)


# --------------------------------------------------------------------------- sizes

HF_PRESETS = {
    "clip-vit-b/32": dict(vision_config=dict(patch_size=32)),
    "clip-vit-b/16": dict(vision_config=dict(patch_size=16)),
    "clip-vit-l/14": dict(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=24,
            patch_size=14,
        ),  # fmt: skip
        projection_dim=768,
    ),
}


def _count(model):
    images, tokens = clip.example_inputs(model)
    shapes = convert.abstract_params(model.init, jax.random.key(0), images, tokens)
    return sum(int(np.prod(s.shape)) for s in shapes.values())


@pytest.mark.parametrize("name", sorted(HF_PRESETS))
def test_preset_counts_and_configs_equal_hf(name, hf):
    torch, transformers = hf
    with torch.device("meta"):
        ref = transformers.CLIPModel(transformers.CLIPConfig(**HF_PRESETS[name]))
    expected = sum(p.numel() for p in ref.parameters())
    model = clip.from_preset(name)
    assert _count(model) == expected
    derived = clip_config_from_hf(ref.config)
    assert derived.pop("logit_scale_init") == pytest.approx(model.logit_scale_init, abs=1e-4)
    assert {k: getattr(model, k) for k in derived} == derived
    if name == "clip-vit-b/32":
        assert expected == 151_277_313  # "ViT-B/32 151M" (openai/clip-vit-base-patch32)


# --------------------------------------------------------------------------- behaviour


@pytest.mark.slow
def test_dtypes_are_honoured(tiny):
    model, params, x, t, fwd = tiny
    ref = fwd(params, x, t)
    bf16 = model.clone(dtype=jnp.bfloat16)
    out = jax.jit(bf16.apply)(params, x, t)
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert float(jnp.abs(out["image_embeds"] - ref["image_embeds"]).max()) < 0.05
    assert float(jnp.abs(out["text_embeds"] - ref["text_embeds"]).max()) < 0.05
    # Every submodule (encoders, blocks, norms, projections) computes in bfloat16; only the
    # top-level outputs are cast to float32.
    _, state = jax.eval_shape(
        lambda p: bf16.apply(p, x, t, capture_intermediates=True, mutable=["intermediates"]),
        params,
    )
    inner = {
        path: leaf.dtype
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["intermediates"])
        if path[0].key != "__call__"  # not the top-level outputs
    }
    assert len(inner) > 20 and set(inner.values()) == {jnp.dtype(jnp.bfloat16)}
    for name in ("vision", "text", "visual_projection", "text_projection"):
        assert name in {path[0].key for path in inner}
    # bfloat16 compute stores float32 params; param_dtype=bfloat16 stores bfloat16 ones.
    shapes = jax.eval_shape(bf16.init, jax.random.key(0), x[:1], t[:1])
    assert {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(shapes))} == {jnp.dtype(jnp.float32)}
    stored = model.clone(param_dtype=jnp.bfloat16)
    shapes = jax.eval_shape(stored.init, jax.random.key(0), x[:1], t[:1])
    assert {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(shapes))} == {jnp.dtype(jnp.bfloat16)}


def test_bad_inputs_raise_clear_errors(tiny):
    model, params, _, _, _ = tiny
    apply = lambda images, tokens: jax.eval_shape(model.apply, params, images, tokens)
    img = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    tok = lambda *s, dtype=jnp.int32: jax.ShapeDtypeStruct(s, dtype)
    with pytest.raises(ValueError, match=r"images must be \[batch, height, width, channels\]"):
        apply(img(32, 32, 3), tok(1, 8))
    with pytest.raises(ValueError, match="1 channels.*num_channels=3"):
        apply(img(1, 32, 32, 1), tok(1, 8))
    with pytest.raises(ValueError, match="image height 30 is not a positive multiple"):
        apply(img(1, 30, 32, 3), tok(1, 8))
    with pytest.raises(ValueError, match="text length 17 is longer than the context_length=16"):
        apply(img(1, 32, 32, 3), tok(1, 17))
    with pytest.raises(ValueError, match=r"tokens are empty \(length 0\)"):
        apply(img(1, 32, 32, 3), tok(1, 0))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
        apply(img(1, 32, 32, 3), tok(8))
    with pytest.raises(ValueError, match="tokens must be integer ids"):
        apply(img(1, 32, 32, 3), tok(1, 8, dtype=jnp.float32))
    assert apply(img(2, 40, 24, 3), tok(3, 5))["logits_per_image"].shape == (2, 3)


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="text_heads=5 does not divide text_d_model=32"):
        clip.from_preset("clip-tiny", text_heads=5)
    with pytest.raises(ValueError, match="image_size=30 is not a multiple of patch_size=8"):
        clip.from_preset("clip-tiny", image_size=30)
    with pytest.raises(ValueError, match="eos_token_id=99 is outside the vocabulary"):
        clip.from_preset("clip-tiny", eos_token_id=99)
    with pytest.raises(ValueError, match="activation='swish'"):
        clip.from_preset("clip-tiny", activation="swish")
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        clip.from_preset("clip-vit-h/14")

"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision").

* Section 2.4 / figure 3: an image encoder and a text encoder, each followed by a linear
  projection without bias into a shared embedding space; both embeddings are L2-normalised
  and their cosine similarities, scaled by a learned temperature, are the logits of a
  symmetric cross-entropy over the batch (image -> its caption and caption -> its image).
* Image encoder (section 2.4, "Vision Transformer ... with the minor modification of adding
  an additional layer normalization to the combined patch and position embeddings"): patch
  embedding without bias, a class token and learned positions, ``ln_pre``, pre-LN blocks
  (``vision.vit.EncoderBlock``), then ``ln_post`` on the class token only.
* Text encoder: a causal ("masked self-attention") pre-LN Transformer over byte-pair tokens
  with learned positions and a final LayerNorm; "the activations of the highest layer of
  the transformer at the [EOS] token are treated as the feature representation". Which
  position is [EOS] follows Hugging Face's ``CLIPTextModel``: with ``eos_token_id=None`` the
  position of the largest token id (OpenAI's code: ``text.argmax(-1)``, since its EOT is the
  last id of the vocabulary; HF does this when a config says ``eos_token_id == 2``),
  otherwise the first position holding ``eos_token_id`` (position 0 if a row has none, as in
  HF). Attention is causal, so padding after [EOS] never reaches the pooled feature and no
  padding mask is needed.
* Temperature (section 2.5): a learned ``logit_scale = log(1 / T)`` initialised to
  ``log(1 / 0.07)``; the multiplier ``exp(logit_scale)`` is "clipped to prevent scaling the
  logits by more than 100". As in open_clip (and OpenAI's and HF's forward passes), the
  forward pass uses ``exp(logit_scale)`` as is and training clamps the *parameter* to
  ``[0, log 100]`` after each optimizer step: chain ``clamp_logit_scale`` after the
  optimizer. A clip in the forward pass (``min(exp(s), 100)``) would instead have zero
  gradient at and above the cap, so the temperature could never come back down from it.
* Activations are ``quick_gelu`` (``x * sigmoid(1.702 x)``) in OpenAI's presets; the field
  ``activation`` takes any of ``common.layers.ACTIVATIONS``.
* The loss (``contrastive_loss``) is over the *global* batch: under ``jax.jit`` with the
  batch sharded over devices (``NamedSharding``) the embeddings are logically one array and
  XLA gathers what each device needs, so every image is contrasted with every caption of
  the global batch, as in the paper's 32,768-pair batches. (With gradient accumulation each
  micro-batch is its own contrastive batch.)
* Zero-shot classification (section 3.1.4): ``zero_shot_weights`` embeds every
  ``template.format(class_name)``, normalises, averages over the templates of a class and
  normalises again (the prompt ensemble of section 3.1.4); ``classify`` scores images
  against those class embeddings.

Deliberate differences: no dropout (CLIP has none); block weights use ``vision.vit``'s
initialisers rather than OpenAI's width-scaled normals (embeddings and projections do use
OpenAI's scales). ``apply(params, images, tokens)`` returns a dict (see ``CLIP.__call__``).
Images are channels-last ``[batch, height, width, channels]``; tokens are int
``[batch, length]`` with ``length <= context_length``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import presets, validation
from common import sharding as sh
from common.attention import IMPLEMENTATIONS
from common.layers import ACTIVATIONS, REMAT_POLICIES, dense, layer_norm, remat
from vision.vit import RESIZE_METHODS, EncoderBlock, resize_positions

Array = jax.Array


def _blocks(
    x: Array, cfg: dict[str, Any], num_layers: int, remat_policy: str | None, causal: bool
) -> Array:
    """``num_layers`` pre-LN blocks ``block_{i}`` (called inside a compact module)."""
    block_cls = remat(EncoderBlock, remat_policy)
    for i in range(num_layers):
        x = block_cls(causal=causal, name=f"block_{i}", **cfg)(x)
        x = nn.with_logical_constraint(x, sh.ACTIVATIONS)
    return x  # [batch, tokens, d_model]


class VisionEncoder(nn.Module):
    """CLIP's ViT: patches + class token + positions -> ``ln_pre`` -> blocks -> ``ln_post``
    of the class token. Returns ``[batch, d_model]``."""

    image_size: int
    patch_size: int
    num_channels: int
    num_layers: int
    num_heads: int
    d_model: int
    d_ff: int
    activation: str
    layer_norm_eps: float
    resize_method: str = "bicubic"  # positions at another resolution (HF: bicubic)
    remat_policy: str | None = None
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:  # images: [batch, height, width, channels]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, p = self.d_model, self.patch_size
        x = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, sh.EMBED)
            ),
            name="patch_embed",
            **kw,
        )(images.astype(self.dtype))  # [batch, h/P, w/P, d_model]
        batch, gh, gw, _ = x.shape
        x = x.reshape(batch, gh * gw, d)  # [batch, patches, d_model], row-major over the grid
        scale = d**-0.5  # OpenAI's init scale for the class token and positions
        cls = self.param(
            "cls",
            nn.with_logical_partitioning(nn.initializers.normal(scale), (sh.EMBED,)),
            (d,),
            self.param_dtype,
        )
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, d)), x], 1)
        table = self.image_size // p
        pos = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(scale), (None, sh.EMBED)),
            (1 + table * table, d),
            self.param_dtype,
        )
        if (gh, gw) != (table, table):  # another resolution: resize the grid part (HF does too)
            grid = resize_positions(pos[1:].reshape(table, table, d), (gh, gw), self.resize_method)
            pos = jnp.concatenate([pos[:1], grid.reshape(gh * gw, d)], axis=0)
        x = x + pos.astype(self.dtype)[None]  # [batch, 1 + patches, d_model]
        x = layer_norm("ln_pre", eps=self.layer_norm_eps, **kw)(x)
        x = nn.with_logical_constraint(x, sh.ACTIVATIONS)
        cfg = dict(
            num_heads=self.num_heads,
            d_ff=self.d_ff,
            dropout=0.0,
            attn_dropout=0.0,
            layer_norm_eps=self.layer_norm_eps,
            activation=self.activation,
            deterministic=True,
            attention_impl=self.attention_impl,
            **kw,
        )
        x = _blocks(x, cfg, self.num_layers, self.remat_policy, causal=False)
        return layer_norm("ln_post", eps=self.layer_norm_eps, **kw)(x[:, 0])  # [batch, d]


class TextEncoder(nn.Module):
    """CLIP's causal text Transformer; returns the final-normed feature at [EOS],
    ``[batch, d_model]`` (see the module docstring for how [EOS] is found)."""

    vocab_size: int
    context_length: int
    num_layers: int
    num_heads: int
    d_model: int
    d_ff: int
    activation: str
    layer_norm_eps: float
    eos_token_id: int | None
    remat_policy: str | None = None
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array) -> Array:  # tokens: [batch, length] int
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = tokens.shape[1]
        x = nn.Embed(
            self.vocab_size,
            self.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (sh.VOCAB, sh.EMBED)
            ),
            name="token_embed",
            **kw,
        )(tokens)  # [batch, length, d_model]
        pos = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, sh.EMBED)),
            (self.context_length, self.d_model),
            self.param_dtype,
        )
        x = x + pos[:length].astype(self.dtype)[None]
        x = nn.with_logical_constraint(x, sh.ACTIVATIONS)
        cfg = dict(
            num_heads=self.num_heads,
            d_ff=self.d_ff,
            dropout=0.0,
            attn_dropout=0.0,
            layer_norm_eps=self.layer_norm_eps,
            activation=self.activation,
            deterministic=True,
            attention_impl=self.attention_impl,
            **kw,
        )
        x = _blocks(x, cfg, self.num_layers, self.remat_policy, causal=True)
        x = layer_norm("ln_final", eps=self.layer_norm_eps, **kw)(x)  # [batch, length, d]
        if self.eos_token_id is None:
            eos = jnp.argmax(tokens, axis=-1)  # [batch] largest id = OpenAI's EOT
        else:
            eos = jnp.argmax(tokens == self.eos_token_id, axis=-1)  # [batch] first EOS
        return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]  # [batch, d_model]


class CLIP(nn.Module):
    """CLIP image and text encoders with projections and a learned temperature.

    ``apply(params, images, tokens)`` returns a dict of float32 arrays:
    ``image_embeds [n_img, proj]`` and ``text_embeds [n_txt, proj]`` (L2-normalised),
    ``logits_per_image [n_img, n_txt]``, ``logits_per_text [n_txt, n_img]`` (its transpose)
    and ``logit_scale`` (the multiplier ``exp(s)``; see ``clamp_logit_scale``). Methods
    ``encode_image`` / ``encode_text`` give the projected (by default unnormalised, like
    HF's ``get_*_features``) embeddings; ``classify`` scores images against the class
    embeddings from ``zero_shot_weights``. Presets live in ``PRESETS``.
    """

    # image encoder (a ViT)
    image_size: int = 224  # resolution the position table is laid out for (square)
    patch_size: int = 32
    num_channels: int = 3
    vision_layers: int = 12
    vision_heads: int = 12
    vision_d_model: int = 768
    vision_d_ff: int = 3072
    # text encoder (a causal Transformer)
    vocab_size: int = 49408
    context_length: int = 77  # longest token sequence (size of the position table)
    text_layers: int = 12
    text_heads: int = 8
    text_d_model: int = 512
    text_d_ff: int = 2048
    eos_token_id: int | None = None  # None: pool at the largest token id (OpenAI's EOT)
    # shared
    projection_dim: int = 512  # joint embedding space
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    logit_scale_init: float = math.log(1 / 0.07)  # log of the inverse temperature
    logit_scale_max: float = 100.0  # training clamps exp(logit_scale) to [1, this]
    resize_method: str = "bicubic"  # image positions at another resolution
    remat_policy: str | None = None  # see common.layers.REMAT_POLICIES; None = no remat
    attention_impl: str | None = None  # see common.attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        vision = ("vision_layers", "vision_heads", "vision_d_model", "vision_d_ff")
        text = ("vocab_size", "context_length", "text_layers", "text_heads", "text_d_model")
        problems = validation.positive_ints(self, "image_size", "patch_size", "num_channels")
        problems += validation.positive_ints(self, *vision, *text, "text_d_ff", "projection_dim")
        problems += validation.divides(self, "vision_heads", "vision_d_model")
        problems += validation.divides(self, "text_heads", "text_d_model")
        if validation.is_positive_int(self.patch_size) and self.image_size % self.patch_size:
            problems.append(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            problems.append(
                f"eos_token_id={self.eos_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        problems += validation.one_of(self, "activation", sorted(ACTIVATIONS))
        problems += validation.one_of(self, "resize_method", RESIZE_METHODS)
        problems += validation.one_of(self, "attention_impl", IMPLEMENTATIONS)
        problems += validation.one_of(self, "remat_policy", REMAT_POLICIES)
        if not self.logit_scale_max >= 1:
            problems.append(f"logit_scale_max={self.logit_scale_max} must be >= 1")
        validation.check(self, problems)
        super().__post_init__()

    def setup(self):
        kw = dict(
            activation=self.activation,
            layer_norm_eps=self.layer_norm_eps,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.vision = VisionEncoder(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            num_layers=self.vision_layers,
            num_heads=self.vision_heads,
            d_model=self.vision_d_model,
            d_ff=self.vision_d_ff,
            resize_method=self.resize_method,
            **kw,
        )
        self.text = TextEncoder(
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            num_layers=self.text_layers,
            num_heads=self.text_heads,
            d_model=self.text_d_model,
            d_ff=self.text_d_ff,
            eos_token_id=self.eos_token_id,
            **kw,
        )
        proj = lambda width, name: dense(
            self.projection_dim,
            (sh.EMBED, None),
            name=name,
            use_bias=False,
            kernel_init=nn.initializers.normal(width**-0.5),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.visual_projection = proj(self.vision_d_model, "visual_projection")
        self.text_projection = proj(self.text_d_model, "text_projection")
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init), ()),
            (),
            self.param_dtype,
        )

    # ----------------------------------------------------------------- input checks

    def check_images(self, images: Array) -> None:
        """Raises ``ValueError`` naming what is wrong with an image batch."""
        validation.check_images(images.shape, self.num_channels, self.patch_size)

    def check_tokens(self, tokens: Array) -> None:
        """Raises ``ValueError`` naming what is wrong with a token batch."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"text length {tokens.shape[1]} is longer than the context_length="
                f"{self.context_length} of the text encoder"
            )
        if tokens.shape[1] == 0:
            raise ValueError("tokens are empty (length 0): every text needs its [EOS] token")

    # ----------------------------------------------------------------- encoders

    def temperature(self) -> Array:
        """The logit multiplier ``exp(logit_scale)`` (float32 scalar). Not clipped here: the
        cap is ``clamp_logit_scale``'s clamp of the parameter after each training step."""
        return jnp.exp(self.logit_scale.astype(jnp.float32))

    def encode_image(self, images: Array, normalize: bool = False) -> Array:
        """Projected image embeddings ``[batch, projection_dim]`` (float32)."""
        self.check_images(images)
        x = self.visual_projection(self.vision(images)).astype(jnp.float32)
        return _l2_normalize(x) if normalize else x

    def encode_text(self, tokens: Array, normalize: bool = False) -> Array:
        """Projected text embeddings ``[batch, projection_dim]`` (float32), at [EOS]."""
        self.check_tokens(tokens)
        x = self.text_projection(self.text(tokens)).astype(jnp.float32)
        return _l2_normalize(x) if normalize else x

    def __call__(self, images: Array, tokens: Array) -> dict[str, Array]:
        image_embeds = self.encode_image(images, normalize=True)  # [n_img, proj]
        text_embeds = self.encode_text(tokens, normalize=True)  # [n_txt, proj]
        scale = self.temperature()
        logits = scale * jnp.einsum(
            "ip,tp->it", image_embeds, text_embeds, precision=jax.lax.Precision.HIGHEST
        )  # [n_img, n_txt]
        return {
            "image_embeds": image_embeds,
            "text_embeds": text_embeds,
            "logits_per_image": logits,
            "logits_per_text": logits.T,  # [n_txt, n_img]
            "logit_scale": scale,
        }

    def classify(self, images: Array, class_weights: Array) -> Array:
        """Zero-shot logits ``[batch, num_classes]`` against ``zero_shot_weights`` output."""
        if class_weights.ndim != 2 or class_weights.shape[1] != self.projection_dim:
            raise ValueError(
                f"class_weights must be [num_classes, projection_dim={self.projection_dim}], "
                f"got shape {class_weights.shape}"
            )
        image_embeds = self.encode_image(images, normalize=True)  # [batch, proj]
        return self.temperature() * jnp.einsum(
            "bp,cp->bc",
            image_embeds,
            class_weights.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )

    @nn.nowrap
    def zero_shot_weights(
        self,
        params: Any,
        tokenize_fn: Callable[[list[str]], Any],
        class_names: Sequence[str],
        templates: Sequence[str],
        batch_size: int = 256,
    ) -> Array:
        """Class embeddings ``[num_classes, projection_dim]`` from prompt templates (3.1.4).

        For each class, every ``template.format(name)`` is tokenised with ``tokenize_fn``
        (``list[str] -> int [n, length]``, ``length <= context_length``), encoded and
        L2-normalised; the mean over templates is normalised again. Call on the unbound
        model: ``model.zero_shot_weights(params, tokenize, names, templates)``.
        """
        class_names, templates = list(class_names), list(templates)
        if not templates:
            raise ValueError("the prompt template list is empty: give at least one template")
        if not class_names:
            raise ValueError("the class name list is empty: give at least one class name")
        no_slot = [t for t in templates if "{}" not in t]
        if no_slot:
            raise ValueError(
                f"prompt templates without a '{{}}' slot for the class name: {no_slot}"
            )
        prompts = [t.format(name) for name in class_names for t in templates]
        rows = min(batch_size, len(prompts))  # every chunk padded to this: one compilation
        chunks = []
        for start in range(0, len(prompts), rows):
            tokens = np.asarray(tokenize_fn(prompts[start : start + rows]))  # [n, length]
            n = tokens.shape[0]
            if n < rows:
                tokens = np.concatenate([tokens, np.repeat(tokens[:1], rows - n, 0)])
            embeds = _encode_text_normalized(self, params, tokens)  # [rows, proj]
            chunks.append(np.asarray(jax.device_get(embeds), np.float32)[:n])
        # The averaging runs on the host (numpy, float32): no per-shape compilations.
        embeds = np.concatenate(chunks).reshape(len(class_names), len(templates), -1)
        mean = embeds.mean(axis=1)  # [num_classes, projection_dim]
        return jnp.asarray(mean / np.linalg.norm(mean, axis=-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=0)
def _encode_text_normalized(model: CLIP, params: Any, tokens: Array) -> Array:
    """Jitted once per (model config, shapes): modules are hashable dataclasses."""
    return model.apply(params, tokens, normalize=True, method=CLIP.encode_text)


def _l2_normalize(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clamp_logit_scale(max_scale: float = 100.0) -> optax.GradientTransformation:
    """CLIP's temperature clip (section 2.5) as the last link of an optimizer chain: the
    update of every ``logit_scale`` parameter becomes ``clip(p + u, 0, log(max_scale)) - p``,
    so after the step ``exp(logit_scale)`` lies in ``[1, max_scale]`` (open_clip clamps the
    parameter to ``[0, log 100]`` after each step the same way). Other updates pass through
    unchanged. Stateless; needs the params: ``tx.update(grads, state, params)``."""
    if not max_scale >= 1.0:
        raise ValueError(f"max_scale={max_scale} must be >= 1 (the parameter's lower bound is 0)")
    hi = math.log(max_scale)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("clamp_logit_scale needs the params: tx.update(grads, state, params)")

        def clamp(path, u, p):
            if not any(getattr(k, "key", None) == "logit_scale" for k in path):
                return u
            return (jnp.clip(p + u, 0.0, hi) - p).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(clamp, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def contrastive_loss(logits_per_image: Array) -> Array:
    """Symmetric InfoNCE of figure 3: mean of image->text and text->image cross-entropy.

    ``logits_per_image`` is ``[n, n]`` with matching pairs on the diagonal; float32.
    """
    if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(
            f"logits_per_image must be square [n, n] (pairs on the diagonal), "
            f"got shape {logits_per_image.shape}"
        )
    logits = logits_per_image.astype(jnp.float32)  # [n_img, n_txt]
    diag = jnp.diagonal(logits)  # [n]
    loss_i = jax.nn.logsumexp(logits, axis=1) - diag  # image -> its caption
    loss_t = jax.nn.logsumexp(logits, axis=0) - diag  # caption -> its image
    return (loss_i.mean() + loss_t.mean()) / 2


# One table for the family. OpenAI's released sizes (Radford et al. 2021, tables 19-20; HF
# ``openai/clip-vit-*`` configs): 224 x 224 RGB, BPE vocab 49408, context 77, quick_gelu.
_OPENAI = dict(
    image_size=224,
    num_channels=3,
    vocab_size=49408,
    context_length=77,
    eos_token_id=49407,
    activation="quick_gelu",
    layer_norm_eps=1e-5,
)
_B = dict(vision_layers=12, vision_heads=12, vision_d_model=768, vision_d_ff=3072)
_TEXT_512 = dict(text_layers=12, text_heads=8, text_d_model=512, text_d_ff=2048)
PRESETS: dict[str, dict[str, Any]] = {
    "clip-vit-b/32": dict(**_OPENAI, **_B, **_TEXT_512, patch_size=32, projection_dim=512),
    "clip-vit-b/16": dict(**_OPENAI, **_B, **_TEXT_512, patch_size=16, projection_dim=512),
    "clip-vit-l/14": dict(
        **_OPENAI,
        patch_size=14,
        vision_layers=24,
        vision_heads=16,
        vision_d_model=1024,
        vision_d_ff=4096,
        text_layers=12,
        text_heads=12,
        text_d_model=768,
        text_d_ff=3072,
        projection_dim=768,
    ),
    # For tests.
    "clip-tiny": dict(
        image_size=32,
        patch_size=8,
        num_channels=3,
        vision_layers=2,
        vision_heads=4,
        vision_d_model=48,
        vision_d_ff=96,
        vocab_size=99,
        context_length=16,
        text_layers=2,
        text_heads=4,
        text_d_model=32,
        text_d_ff=64,
        eos_token_id=None,
        projection_dim=24,
        activation="quick_gelu",
        layer_norm_eps=1e-5,
    ),
}


def from_preset(name: str, **overrides: Any) -> CLIP:
    """``CLIP`` built from a named preset, with field overrides (unknown fields fail)."""
    return presets.build(CLIP, PRESETS, name, **overrides)


def example_inputs(model: CLIP, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract ``(images, tokens)`` at the model's resolution and context length."""
    s = model.image_size
    return (
        jax.ShapeDtypeStruct((batch, s, s, model.num_channels), jnp.float32),
        jax.ShapeDtypeStruct((batch, model.context_length), jnp.int32),
    )

"""Segment Anything (Kirillov et al. 2023): the model, its presets and the image transforms.

Section 3 of the paper: a heavy image encoder runs once per image; a light prompt encoder
and mask decoder answer each prompt from that embedding. ``Sam`` exposes the parts as
methods (``embed_images``, ``decode``) so the predictor can compile them as two programs.

Presets follow the released models (``sam-vit-b``/``-l``/``-h``: the ViT-B/L/H image
encoders with global attention in four equally spaced blocks, a 256-wide prompt encoder and
a two-layer decoder); ``sam-tiny`` is for tests. The random Fourier matrix of the prompt
encoder is in the ``"buffers"`` collection, so ``init`` returns ``{"params", "buffers"}``.

Image transforms (the reference's ``ResizeLongestSide`` + ``Sam.preprocess`` /
``postprocess_masks``): the image is resized so its longer side is ``image_size`` (rounded
half up), normalised with ImageNet's pixel mean/std, zero-padded on the bottom and right to
``image_size`` square; masks come back by upsampling the ``4h x 4w`` logits bilinearly to the
padded frame, cropping the padding and resizing to the original size (both bilinear,
``align_corners=False``, no antialiasing, as torch's ``interpolate``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import presets as presets_lib
from vision.sam.image_encoder import ImageEncoder
from vision.sam.mask_decoder import MaskDecoder
from vision.sam.prompt_encoder import PromptEncoder
from vision.vit import interpolation_matrix

Array = jax.Array
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

_SHARED = dict(
    image_size=1024,
    patch_size=16,
    window_size=14,
    prompt_dim=256,
    mask_in_chans=16,
    decoder_layers=2,
    decoder_heads=8,
    decoder_mlp_dim=2048,
    iou_head_hidden_dim=256,
)
PRESETS: dict[str, dict[str, Any]] = {
    "sam-vit-b": dict(
        _SHARED,
        encoder_dim=768,
        encoder_layers=12,
        encoder_heads=12,
        global_attn_indexes=(2, 5, 8, 11),
    ),
    "sam-vit-l": dict(
        _SHARED,
        encoder_dim=1024,
        encoder_layers=24,
        encoder_heads=16,
        global_attn_indexes=(5, 11, 17, 23),
    ),
    "sam-vit-h": dict(
        _SHARED,
        encoder_dim=1280,
        encoder_layers=32,
        encoder_heads=16,
        global_attn_indexes=(7, 15, 23, 31),
    ),
    # For tests: an 8 x 8 grid whose 3 x 3 windows need padding (8 -> 9).
    "sam-tiny": dict(
        image_size=64,
        patch_size=8,
        window_size=3,
        encoder_dim=32,
        encoder_layers=2,
        encoder_heads=2,
        global_attn_indexes=(1,),
        prompt_dim=32,
        mask_in_chans=8,
        decoder_layers=2,
        decoder_heads=2,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    ),
}


class Sam(nn.Module):
    """Image encoder + prompt encoder + mask decoder. Presets live in ``PRESETS``."""

    image_size: int = 1024
    patch_size: int = 16
    encoder_dim: int = 768
    encoder_layers: int = 12
    encoder_heads: int = 12
    encoder_mlp_ratio: int = 4
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    encoder_layer_norm_eps: float = 1e-6
    prompt_dim: int = 256  # width of the neck output, prompt tokens and decoder
    mask_in_chans: int = 16
    decoder_layers: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    decoder_layer_norm_eps: float = 1e-5  # HF's SamModel uses 1e-6
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD
    remat_policy: str | None = None  # the image encoder's; see common.layers.REMAT_POLICIES
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mask_input_size(self) -> int:
        """Side of the low-resolution mask logits (decoder output and mask prompt)."""
        return 4 * self.grid

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = self.grid
        self.image_encoder = ImageEncoder(
            image_size=self.image_size,
            patch_size=self.patch_size,
            d_model=self.encoder_dim,
            num_layers=self.encoder_layers,
            num_heads=self.encoder_heads,
            d_ff=self.encoder_dim * self.encoder_mlp_ratio,
            window_size=self.window_size,
            global_attn_indexes=tuple(self.global_attn_indexes),
            out_channels=self.prompt_dim,
            layer_norm_eps=self.encoder_layer_norm_eps,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
            **kw,
        )
        self.prompt_encoder = PromptEncoder(
            embed_dim=self.prompt_dim,
            image_embedding_size=(g, g),
            input_image_size=(self.image_size, self.image_size),
            mask_in_chans=self.mask_in_chans,
            **kw,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=self.prompt_dim,
            num_layers=self.decoder_layers,
            num_heads=self.decoder_heads,
            mlp_dim=self.decoder_mlp_dim,
            num_multimask_outputs=self.num_multimask_outputs,
            iou_head_depth=self.iou_head_depth,
            iou_head_hidden_dim=self.iou_head_hidden_dim,
            layer_norm_eps=self.decoder_layer_norm_eps,
            **kw,
        )

    def embed_images(self, images: Array) -> Array:
        """Normalised, padded images ``[b, S, S, 3]`` -> embeddings ``[b, g, g, prompt_dim]``."""
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: Array,
        points: Array | None = None,
        labels: Array | None = None,
        boxes: Array | None = None,
        masks: Array | None = None,
        multimask_output: bool = True,
    ) -> tuple[Array, Array]:
        """Prompts (padded input frame) -> low-res logits ``[b, m, 4g, 4g]``, IoU ``[b, m]``.

        ``image_embeddings`` is ``[1, g, g, dim]`` (shared by all prompts) or ``[b, g, g,
        dim]``; ``points`` ``[b, n, 2]`` with ``labels`` ``[b, n]`` (1 foreground, 0
        background, -1 padding), ``boxes`` ``[b, 4]``, ``masks`` ``[b, 4g, 4g]`` logits.
        """
        sparse, dense = self.prompt_encoder(points, labels, boxes, masks)
        return self.mask_decoder(
            image_embeddings, self.prompt_encoder.dense_pe(), sparse, dense, multimask_output
        )

    def __call__(
        self,
        images: Array,
        points: Array | None = None,
        labels: Array | None = None,
        boxes: Array | None = None,
        masks: Array | None = None,
        multimask_output: bool = True,
    ) -> tuple[Array, Array]:
        """Encode ``images`` and decode one prompt set per image (or all prompts on one image)."""
        return self.decode(
            self.embed_images(images), points, labels, boxes, masks, multimask_output
        )


def from_preset(name: str, **overrides: Any) -> Sam:
    """A ``Sam`` from ``PRESETS[name]`` with field overrides (``dtype=jnp.bfloat16`` ...)."""
    return presets_lib.build(Sam, PRESETS, name, **overrides)


def init_inputs(model: Sam, batch: int = 1) -> dict[str, Array]:
    """Example inputs that touch every parameter (points, a box and a mask prompt)."""
    s, m = model.image_size, model.mask_input_size
    return dict(
        images=jnp.zeros((batch, s, s, 3), jnp.float32),
        points=jnp.zeros((batch, 1, 2), jnp.float32),
        labels=jnp.ones((batch, 1), jnp.int32),
        boxes=jnp.zeros((batch, 4), jnp.float32),
        masks=jnp.zeros((batch, m, m), jnp.float32),
    )


def init(model: Sam, rng: Array) -> dict[str, Any]:
    """``{"params", "buffers"}`` of a freshly initialised model."""
    return model.init(rng, **init_inputs(model))


def parameter_counts(model: Sam) -> dict[str, int]:
    """Parameter counts per part (``image_encoder``, ``prompt_encoder``, ``mask_decoder``).

    Computed from ``jax.eval_shape``: nothing is allocated. Buffers are not parameters.
    """
    shapes = jax.eval_shape(lambda r: init(model, r), jax.random.key(0))
    params = nn.meta.unbox(shapes)["params"]
    return {
        part: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params[part]))
        for part in ("image_encoder", "prompt_encoder", "mask_decoder")
    }


# --------------------------------------------------------------------------- transforms


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """``(h, w)`` with the longer side ``long_side``; each side rounded half up (the reference)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(image: np.ndarray, long_side: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 resized so the longer side is ``long_side``, as the reference does
    it: PIL's bilinear filter (antialiased when shrinking) on the uint8 image."""
    from PIL import Image  # lazy: only the predictor's numpy path needs it

    h, w = resized_shape(image.shape[0], image.shape[1], long_side)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR)
    return np.asarray(resized)


def preprocess(model: Sam, images: Array) -> Array:
    """Resized images ``[b, h, w, 3]`` (0-255, longer side ``<= image_size``) -> normalised and
    zero-padded on the bottom/right to ``[b, image_size, image_size, 3]``."""
    s = model.image_size
    h, w = images.shape[1:3]
    if images.ndim != 4 or images.shape[-1] != 3 or h > s or w > s:
        raise ValueError(
            f"images must be [batch, h, w, 3] with h, w <= image_size={s}, got {images.shape}"
        )
    mean = jnp.asarray(model.pixel_mean, jnp.float32)
    std = jnp.asarray(model.pixel_std, jnp.float32)
    x = (images.astype(jnp.float32) - mean) / std
    return jnp.pad(x, ((0, 0), (0, s - h), (0, s - w), (0, 0)))


def postprocess_matrices(
    model: Sam, input_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis linear maps ``[orig_h, 4g]`` and ``[orig_w, 4g]`` taking low-res logits to the
    original image: bilinear upsampling to the padded frame, the crop to ``input_size``, then
    bilinear resizing to ``original_size`` (torch ``interpolate``, ``align_corners=False``).
    Composing them into one matrix per axis is the same linear map."""
    s, low = model.image_size, model.mask_input_size
    up = interpolation_matrix(low, s, "bilinear")  # [s, low]
    out = []
    for inp, orig in zip(input_size, original_size, strict=True):
        out.append(interpolation_matrix(inp, orig, "bilinear") @ up[:inp])  # [orig, low]
    return out[0].astype(np.float32), out[1].astype(np.float32)


def upscale_masks(logits: Array, rows: Array, cols: Array) -> Array:
    """``[..., 4g, 4g]`` logits -> ``[..., H, W]`` through ``postprocess_matrices``."""
    return jnp.einsum("hi,...ij,wj->...hw", rows, logits.astype(jnp.float32), cols)

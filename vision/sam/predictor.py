"""Interactive use of SAM: embed an image once, then answer prompts (section 3 of the paper).

``SamPredictor(model, variables)``:

* ``embed(image)`` takes a ``[H, W, 3]`` uint8 RGB image, resizes it so the longer side is
  ``image_size`` (the reference's ``ResizeLongestSide``: PIL bilinear), pads and normalises
  it, and runs the image encoder. The resized image is zero-padded to ``image_size`` square
  on the host and normalised inside the compiled program with the padding zeroed again, so
  one compiled program serves every image size;
* ``predict(points, labels, boxes, mask_input, multimask_output)`` runs the prompt encoder,
  the mask decoder and the upscaling to the original image size as a second compiled
  program (compiled once per prompt shape and image size). Prompts are in the original
  image's pixel coordinates; one prompt set (``points [n, 2]``, ``labels [n]``, ``boxes
  [4]``, ``mask_input [4g, 4g]``) or a batch of them (a leading axis ``b`` on each) share the
  embedded image. Returns numpy ``masks`` (bool, or logits with ``return_logits``) ``[(b,)
  m, H, W]``, ``iou_predictions`` ``[(b,) m]`` and the low-resolution logits ``[(b,) m, 4g,
  4g]`` that a next round can pass back as ``mask_input``.

Point labels: 1 foreground, 0 background, -1 padding. A padding point is not ignored: it
becomes the learned "not a point" token, as in the reference (which appends one itself when
no box is given), so a padded prompt gives slightly different masks than the same prompt unpadded.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vision.sam import model as sam_model

Array = jax.Array


def _embed_program(model: sam_model.Sam, variables, padded: Array, size: Array) -> Array:
    """``[b, S, S, 3]`` resized+padded 0-255 images and their ``[2]`` valid (h, w) -> embeddings."""
    s = model.image_size
    mean = jnp.asarray(model.pixel_mean, jnp.float32)
    std = jnp.asarray(model.pixel_std, jnp.float32)
    x = (padded.astype(jnp.float32) - mean) / std  # [b, S, S, 3]
    valid = (jnp.arange(s)[:, None] < size[0]) & (jnp.arange(s)[None, :] < size[1])  # [S, S]
    x = jnp.where(valid[None, :, :, None], x, 0.0)  # the reference pads after normalising
    return model.apply(variables, x, method="embed_images")


def _predict_program(
    model: sam_model.Sam,
    multimask_output: bool,
    return_logits: bool,
    variables,
    features: Array,
    points: Array | None,
    labels: Array | None,
    boxes: Array | None,
    masks: Array | None,
    rows: Array,
    cols: Array,
) -> tuple[Array, Array, Array]:
    low, iou = model.apply(
        variables, features, points, labels, boxes, masks, multimask_output, method="decode"
    )  # [b, m, 4g, 4g], [b, m]
    full = sam_model.upscale_masks(low, rows, cols)  # [b, m, H, W]
    return (full if return_logits else full > 0.0), iou, low


class SamPredictor:
    """Embed once, prompt many times. See the module docstring."""

    def __init__(self, model: sam_model.Sam, variables: dict[str, Any]):
        self.model = model
        self.variables = variables
        self._embed = jax.jit(partial(_embed_program, model))
        self._predict = jax.jit(partial(_predict_program, model), static_argnums=(0, 1))
        self.reset()

    def reset(self) -> None:
        """Forgets the embedded image."""
        self.features: Array | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self._matrices: tuple[Array, Array] | None = None

    # ------------------------------------------------------------------ image

    def embed(self, image: np.ndarray, image_format: str = "RGB") -> Array:
        """Embeds a ``[H, W, 3]`` uint8 image; later ``predict`` calls prompt this image."""
        image = np.asarray(image)
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"image must be [height, width, 3], got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 (0-255), got dtype {image.dtype}")
        if image_format == "BGR":
            image = image[..., ::-1]
        s = self.model.image_size
        resized = sam_model.resize_image(image, s)  # [h, w, 3] with max(h, w) == s
        h, w = resized.shape[:2]
        padded = np.zeros((1, s, s, 3), np.uint8)
        padded[0, :h, :w] = resized
        self.reset()
        self.features = self._embed(self.variables, padded, jnp.asarray([h, w], jnp.int32))
        self.original_size = (int(image.shape[0]), int(image.shape[1]))
        self.input_size = (h, w)
        rows, cols = sam_model.postprocess_matrices(self.model, self.input_size, self.original_size)
        self._matrices = (jnp.asarray(rows), jnp.asarray(cols))
        return self.features

    # ------------------------------------------------------------------ prompts

    def _scale(self) -> np.ndarray:
        (oh, ow), (ih, iw) = self.original_size, self.input_size
        return np.asarray([iw / ow, ih / oh], np.float64)

    def _check_points(self, points, labels, batched: bool) -> tuple[np.ndarray, np.ndarray]:
        if labels is None:
            raise ValueError("points were given without labels (1 foreground, 0 background)")
        points = np.asarray(points, np.float64)
        labels = np.asarray(labels)
        want = 3 if batched else 2
        if points.ndim != want or points.shape[-1] != 2:
            shape = "[batch, n, 2]" if batched else "[n, 2]"
            raise ValueError(f"points must be {shape} (x, y), got shape {points.shape}")
        if labels.shape != points.shape[:-1]:
            raise ValueError(
                f"labels have shape {labels.shape}, expected one label per point "
                f"{points.shape[:-1]}"
            )
        if not np.isin(labels, (-1, 0, 1)).all():
            raise ValueError(
                f"point labels must be 1 (foreground), 0 (background) or -1 (padding), got "
                f"{sorted(set(np.unique(labels).tolist()))}"
            )
        h, w = self.original_size
        real = labels != -1
        x, y = points[..., 0], points[..., 1]
        outside = real & ((x < 0) | (x > w) | (y < 0) | (y > h) | ~np.isfinite(points).all(-1))
        if outside.any():
            bad = points[outside][:3].tolist()
            raise ValueError(
                f"{int(outside.sum())} point(s) lie outside the {w} x {h} (width x height) "
                f"image, e.g. {bad}"
            )
        return points * self._scale(), labels.astype(np.int32)

    def _check_boxes(self, boxes, batched: bool) -> np.ndarray:
        boxes = np.asarray(boxes, np.float64)
        if boxes.shape[-1:] != (4,) or boxes.ndim != (2 if batched else 1):
            shape = "[batch, 4]" if batched else "[4]"
            raise ValueError(f"boxes must be {shape} (x0, y0, x1, y1), got shape {boxes.shape}")
        b = boxes.reshape(-1, 4)
        if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
            bad = b[(b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])][:3].tolist()
            raise ValueError(f"boxes must have x1 >= x0 and y1 >= y0 (x0, y0, x1, y1), got {bad}")
        h, w = self.original_size
        if (b < 0).any() or (b[:, [0, 2]] > w).any() or (b[:, [1, 3]] > h).any():
            raise ValueError(f"boxes must lie inside the {w} x {h} (width x height) image")
        return (b.reshape(-1, 2, 2) * self._scale()).reshape(boxes.shape)

    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for the prompts on the embedded image; see the module docstring for shapes."""
        if self.features is None:
            raise RuntimeError("no image embedded: call embed(image) before predict(...)")
        if points is None and boxes is None and mask_input is None:
            raise ValueError("predict needs at least one prompt: points, boxes or mask_input")
        if points is None and labels is not None:
            raise ValueError("labels were given without points")
        # Batched when a prompt carries the leading batch axis.
        batched = (
            (points is not None and np.ndim(points) == 3)
            or (boxes is not None and np.ndim(boxes) == 2)
            or (mask_input is not None and np.ndim(mask_input) == 3)
        )
        args: list[np.ndarray | None] = [None, None, None, None]
        if points is not None:
            args[0], args[1] = self._check_points(points, labels, batched)
        if boxes is not None:
            args[2] = self._check_boxes(boxes, batched)
        if mask_input is not None:
            mask_input = np.asarray(mask_input, np.float32)
            side = self.model.mask_input_size
            if mask_input.shape[-2:] != (side, side) or mask_input.ndim != (3 if batched else 2):
                shape = f"[batch, {side}, {side}]" if batched else f"[{side}, {side}]"
                raise ValueError(
                    f"mask_input must be {shape} low-resolution logits (4x the embedding grid, "
                    f"as predict returns them), got shape {mask_input.shape}"
                )
            args[3] = mask_input
        if not batched:
            args = [None if a is None else a[None] for a in args]
        sizes = {a.shape[0] for a in args if a is not None}
        if len(sizes) > 1:
            raise ValueError(f"prompts disagree on the batch size: {sorted(sizes)}")
        args = [None if a is None else jnp.asarray(a, jnp.int32 if i == 1 else jnp.float32)
                for i, a in enumerate(args)]  # fmt: skip
        masks, iou, low = self._predict(
            bool(multimask_output),
            bool(return_logits),
            self.variables,
            self.features,
            *args,
            *self._matrices,
        )
        masks, iou, low = np.asarray(masks), np.asarray(iou), np.asarray(low)
        if not batched:
            return masks[0], iou[0], low[0]
        return masks, iou, low

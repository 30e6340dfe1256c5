"""Automatic mask generation: SAM prompted with a grid of points (paper section 4.1 / appendix
A, "Automatic mask generation"; the reference's ``SamAutomaticMaskGenerator``).

For each crop of the image (the whole image, plus with ``crop_n_layers`` = k, layer i's
``2^i x 2^i`` overlapping crops for i = 1..k):

1. embed the crop and prompt it with a regular ``n x n`` grid of single foreground points
   (cell centres), ``points_per_batch`` at a time (one compiled prompt program: the last
   batch is padded to the same size), each returning the three multimask outputs;
2. keep masks whose predicted IoU exceeds ``pred_iou_thresh`` and whose stability score
   (the IoU of the mask thresholded at ``+offset`` and at ``-offset`` around 0) reaches
   ``stability_score_thresh``;
3. binarise, take each mask's bounding box, drop masks touching a crop edge that is not an
   image edge, and remove duplicates with greedy box NMS ranked by predicted IoU;

then, across crops, NMS again with each mask scored ``1 / area of its crop`` (masks from
smaller crops win), as the reference does. Records use the reference's format: ``segmentation``
(bool ``[H, W]``), ``area``, ``bbox`` (XYWH), ``predicted_iou``, ``point_coords``,
``stability_score``, ``crop_box`` (XYWH). The reference's optional small-region cleanup
(OpenCV) and RLE outputs are not implemented.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from vision.sam.predictor import SamPredictor


def point_grid(n: int) -> np.ndarray:
    """``[n * n, 2]`` cell centres ``(x, y)`` of an ``n x n`` grid over ``[0, 1]^2``, row-major."""
    side = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(side, side, indexing="xy")
    return np.stack([x, y], axis=-1).reshape(-1, 2)


def crop_boxes(
    size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes ``[x0, y0, x1, y1]`` and their layer: the image, then layer i's ``2^i x 2^i``
    crops overlapping by ``overlap_ratio * short side * 2 / 2^i`` pixels (the reference's)."""
    h, w = size
    boxes, layers = [[0, 0, w, h]], [0]
    short = min(h, w)
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * short * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + h) / n))
        xs = [int((crop_w - overlap) * i) for i in range(n)]
        ys = [int((crop_h - overlap) * i) for i in range(n)]
        for x0 in xs:  # the reference orders crops column by column
            for y0 in ys:
                boxes.append([x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h)])
                layers.append(layer)
    return boxes, layers


def stability_score(logits: np.ndarray, offset: float, threshold: float = 0.0) -> np.ndarray:
    """IoU of ``logits > threshold + offset`` with ``logits > threshold - offset`` (the first
    lies inside the second), per mask over the last two axes."""
    inner = (logits > threshold + offset).sum(axis=(-2, -1))
    outer = (logits > threshold - offset).sum(axis=(-2, -1))
    return np.where(outer > 0, inner / np.maximum(outer, 1), np.nan)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Inclusive ``[x0, y0, x1, y1]`` pixel boxes ``[..., 4]`` of bool masks ``[..., H, W]``;
    ``[0, 0, 0, 0]`` for an empty mask."""
    h, w = masks.shape[-2:]
    rows, cols = masks.any(axis=-1), masks.any(axis=-2)  # [..., H], [..., W]
    first = lambda a: np.argmax(a, axis=-1)
    last = lambda a, n: n - 1 - np.argmax(a[..., ::-1], axis=-1)
    boxes = np.stack([first(cols), first(rows), last(cols, w), last(rows, h)], axis=-1)
    return boxes * rows.any(axis=-1)[..., None]


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``[4]`` box with ``[n, 4]`` boxes (xyxy, areas as ``(x1 - x0) (y1 - y0)``)."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area(box) + area(boxes) - inter)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: indices kept, in descending score order (ties in input order); a box is
    dropped when its IoU with a kept, higher-ranked box exceeds ``iou_threshold``."""
    order = np.argsort(-scores, kind="stable")
    boxes = boxes[order].astype(np.float64)
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        suppressed |= box_iou(boxes[i], boxes) > iou_threshold
    return np.asarray(keep, np.int64)


def _near_crop_edge(boxes: np.ndarray, crop: list[int], image: list[int], tol: float = 20.0):
    """Boxes (image frame) within ``tol`` pixels of a crop edge that is not an image edge."""
    near_crop = np.isclose(boxes, np.asarray(crop)[None], atol=tol, rtol=0)
    near_image = np.isclose(boxes, np.asarray(image)[None], atol=tol, rtol=0)
    return (near_crop & ~near_image).any(axis=1)


def _xywh(box) -> list:
    x0, y0, x1, y1 = np.asarray(box).tolist() if not isinstance(box, list) else box
    return [x0, y0, x1 - x0, y1 - y0]


@dataclasses.dataclass
class AutomaticMaskGenerator:
    """Masks for everything in an image; the fields are the reference's, same defaults."""

    predictor: SamPredictor
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1

    def __post_init__(self):
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be positive")
        if self.crop_n_layers < 0 or self.crop_n_points_downscale_factor < 1:
            raise ValueError("crop_n_layers must be >= 0 and the downscale factor >= 1")

    def _grid(self, layer: int) -> np.ndarray:
        return point_grid(int(self.points_per_side / self.crop_n_points_downscale_factor**layer))

    def _process_crop(self, image: np.ndarray, crop: list[int], layer: int) -> dict[str, Any]:
        x0, y0, x1, y1 = crop
        h, w = image.shape[:2]
        self.predictor.embed(image[y0:y1, x0:x1])
        ch, cw = y1 - y0, x1 - x0
        points = self._grid(layer) * np.asarray([cw, ch], np.float64)  # [n, 2] crop pixels
        out: dict[str, list] = {k: [] for k in ("masks", "iou", "points", "stability")}
        bs = self.points_per_batch
        for start in range(0, len(points), bs):
            batch = points[start : start + bs]
            real = len(batch)
            padded = np.concatenate([batch, np.repeat(batch[:1], bs - real, 0)])
            logits, iou, _ = self.predictor.predict(
                padded[:, None, :], np.ones((bs, 1), np.int32), return_logits=True
            )  # [bs, 3, ch, cw], [bs, 3]
            logits = logits[:real].reshape(-1, ch, cw)
            iou = iou[:real].reshape(-1)
            pts = np.repeat(batch, 3, axis=0)
            keep = (
                iou > self.pred_iou_thresh if self.pred_iou_thresh > 0 else np.ones_like(iou, bool)
            )
            logits, iou, pts = logits[keep], iou[keep], pts[keep]
            stab = stability_score(logits, self.stability_score_offset)
            if self.stability_score_thresh > 0:
                keep = stab >= self.stability_score_thresh
                logits, iou, pts, stab = logits[keep], iou[keep], pts[keep], stab[keep]
            out["masks"].append(logits > 0.0)
            out["iou"].append(iou)
            out["points"].append(pts)
            out["stability"].append(stab)
        self.predictor.reset()
        data = {k: np.concatenate(v) for k, v in out.items()}
        boxes = masks_to_boxes(data["masks"]) + np.asarray([x0, y0, x0, y0])  # image frame
        keep = ~_near_crop_edge(boxes, crop, [0, 0, w, h])
        data = {k: v[keep] for k, v in data.items()}
        boxes = boxes[keep]
        keep = box_nms(boxes - np.asarray([x0, y0, x0, y0]), data["iou"], self.box_nms_thresh)
        data = {k: v[keep] for k, v in data.items()}
        data["boxes"] = boxes[keep]
        data["points"] = data["points"] + np.asarray([x0, y0])
        full = np.zeros((len(keep), h, w), bool)
        full[:, y0:y1, x0:x1] = data["masks"]
        data["masks"] = full
        data["crops"] = np.tile(np.asarray(crop), (len(keep), 1))
        return data

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Records for every mask kept, in the reference's format (see module docstring)."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image must be [height, width, 3] uint8, got {image.shape} {image.dtype}"
            )
        crops, layers = crop_boxes(image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
        parts = [
            self._process_crop(image, c, layer) for c, layer in zip(crops, layers, strict=True)
        ]
        data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if len(crops) > 1:
            c = data["crops"].astype(np.float64)
            scores = 1.0 / ((c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]))
            keep = box_nms(data["boxes"], scores, self.crop_nms_thresh)
            data = {k: v[keep] for k, v in data.items()}
        return [
            {
                "segmentation": data["masks"][i],
                "area": int(data["masks"][i].sum()),
                "bbox": _xywh(data["boxes"][i]),
                "predicted_iou": float(data["iou"][i]),
                "point_coords": [data["points"][i].tolist()],
                "stability_score": float(data["stability"][i]),
                "crop_box": _xywh(data["crops"][i]),
            }
            for i in range(len(data["iou"]))
        ]

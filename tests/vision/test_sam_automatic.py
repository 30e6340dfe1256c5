"""Automatic mask generation: records equal ``segment_anything``'s generator on a small image
(same weights); the point grid, crop boxes, stability score and mask boxes equal the
reference's helpers; box NMS keeps what its definition keeps.

With random weights every mask's box spans the image, so the end-to-end comparison keeps
all masks (``box_nms_thresh=1``) to compare them one by one, and checks NMS separately.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vision.sam import automatic  # noqa: E402
from vision.sam import convert as sam_convert  # noqa: E402
from vision.sam import model as sam_model  # noqa: E402
from vision.sam.predictor import SamPredictor  # noqa: E402

torch = pytest.importorskip("torch")
import sam_reference  # noqa: E402

try:
    sam_reference.segment_anything()
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"segment_anything is not installed: {e}", allow_module_level=True)


def _image() -> np.ndarray:
    image = np.full((48, 60, 3), 30, np.uint8)
    image[5:25, 8:30] = (220, 40, 40)
    image[20:44, 35:56] = (40, 200, 90)
    image[30:46, 4:20] = (250, 250, 250)
    return image


@pytest.mark.parametrize("nms", [1.0, 0.7])
@pytest.mark.slow
def test_records_equal_reference_generator(nms):
    sa = sam_reference.segment_anything()
    ref = sam_reference.build_tiny(seed=3, randomize_all=False)
    model = sam_model.from_preset("sam-tiny")
    variables = sam_convert.sam_variables_from_torch(ref.state_dict(), model)
    kw = dict(
        points_per_side=4,
        points_per_batch=6,  # 16 points: batches of 6, 6 and a padded 4
        pred_iou_thresh=0.001,  # random weights predict IoUs around 0: most are dropped
        stability_score_offset=0.05,
        stability_score_thresh=0.0,
        box_nms_thresh=nms,
    )
    image = _image()
    want = sa.SamAutomaticMaskGenerator(ref, **kw).generate(image)
    got = automatic.AutomaticMaskGenerator(SamPredictor(model, variables), **kw).generate(image)
    assert 0 < len(got) == len(want) < 48
    for a, b in zip(want, got, strict=True):
        assert set(a) == set(b)
        assert a["bbox"] == b["bbox"] and a["crop_box"] == b["crop_box"]
        assert a["point_coords"] == b["point_coords"]
        assert abs(a["area"] - b["area"]) <= 2
        assert (a["segmentation"] != b["segmentation"]).sum() <= 2  # logits within 1e-5 of 0
        assert b["segmentation"].shape == image.shape[:2]
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-4
        assert abs(a["stability_score"] - b["stability_score"]) < 1e-2


def test_helpers_equal_reference():
    sa = sam_reference.segment_anything()
    amg = sa.utils.amg
    np.testing.assert_allclose(automatic.point_grid(5), amg.build_point_grid(5), atol=1e-12)
    for size, layers in (((48, 60), 1), ((300, 200), 2), ((1000, 1500), 3)):
        want = amg.generate_crop_boxes(size, layers, 512 / 1500)
        assert automatic.crop_boxes(size, layers, 512 / 1500) == (want[0], want[1])
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 20, 30)).astype(np.float32) * 2
    logits[2] = -5.0  # empty mask
    want = amg.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    got = automatic.stability_score(logits, 1.0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    masks = logits > 1.0
    np.testing.assert_array_equal(
        automatic.masks_to_boxes(masks), amg.batched_mask_to_box(torch.from_numpy(masks)).numpy()
    )


def test_box_nms_keeps_its_definition():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 9, 10], [21, 20, 30, 30]], float
    )
    scores = np.array([0.9, 0.95, 0.5, 0.4, 0.5])
    # box 1 wins its cluster (IoU 0.81 with box 0, 0.72 with box 3); boxes 2 and 4 tie on
    # score, so the earlier one is ranked first and suppresses the other (IoU 0.9).
    np.testing.assert_array_equal(automatic.box_nms(boxes, scores, 0.7), [1, 2])
    # at 0.85 box 1 suppresses nothing; box 0 then suppresses box 3 (IoU 0.9)
    np.testing.assert_array_equal(automatic.box_nms(boxes, scores, 0.85), [1, 0, 2])

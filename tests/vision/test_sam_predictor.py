"""SAM predictor: embeddings and full-size mask logits, IoU predictions and low-resolution
logits equal ``segment_anything.SamPredictor``'s for images that are wider and taller than
square (resize-longest-side + pad preprocessing, crop + resize postprocessing); batched
prompts equal one prompt at a time; each program compiles once; bad prompts raise errors
naming the problem.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vision.sam import convert as sam_convert  # noqa: E402
from vision.sam import model as sam_model  # noqa: E402
from vision.sam.predictor import SamPredictor  # noqa: E402

torch = pytest.importorskip("torch")
import sam_reference  # noqa: E402

try:
    sam_reference.segment_anything()
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"segment_anything is not installed: {e}", allow_module_level=True)

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    ref = sam_reference.build_tiny(seed=10)
    model = sam_model.from_preset("sam-tiny")
    ours = SamPredictor(model, sam_convert.sam_variables_from_torch(ref.state_dict(), model))
    return sam_reference.segment_anything().SamPredictor(ref), ours


@pytest.mark.parametrize("shape,case", [((50, 37, 3), 1), ((90, 120, 3), 0)])
@pytest.mark.slow
def test_predictions_equal_reference_predictor(pair, shape, case):
    theirs, ours = pair
    rng = np.random.default_rng(shape[0])
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    theirs.set_image(image)
    emb = ours.embed(image)
    want_emb = theirs.features.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(emb), want_emb, atol=TOL, rtol=0)
    h, w = shape[:2]
    points = np.array([[0.3 * w, 0.6 * h], [0.8 * w, 0.2 * h]])
    labels = np.array([1, 0])
    box = np.array([0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h])
    mask = rng.normal(size=(32, 32)).astype(np.float32) * 3
    cases = [
        dict(point_coords=points, point_labels=labels, multimask_output=False),
        dict(point_coords=points, point_labels=labels, box=box, mask_input=mask[None]),
    ]
    for kw in cases[case : case + 1]:
        want = theirs.predict(**kw, return_logits=True)
        got = ours.predict(
            kw.get("point_coords"),
            kw.get("point_labels"),
            kw.get("box"),
            kw["mask_input"][0] if "mask_input" in kw else None,
            kw.get("multimask_output", True),
            return_logits=True,
        )
        assert got[0].shape == want[0].shape  # [masks, h, w] at the original size
        for g, r in zip(got, want, strict=True):
            np.testing.assert_allclose(g, r, atol=TOL, rtol=0)
        masks, _, _ = ours.predict(
            kw.get("point_coords"),
            kw.get("point_labels"),
            kw.get("box"),
            kw["mask_input"][0] if "mask_input" in kw else None,
            kw.get("multimask_output", True),
        )
        assert masks.dtype == np.bool_
        np.testing.assert_array_equal(masks, got[0] > 0.0)


@pytest.mark.slow
def test_batched_prompts_equal_one_at_a_time(pair):
    _, ours = pair
    image = np.random.default_rng(3).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    ours.embed(image)
    points = np.array([[[5.0, 7.0], [30.0, 20.0]], [[50.0, 30.0], [0.0, 0.0]]])
    labels = np.array([[1, 0], [1, -1]])  # the second prompt has one real point
    boxes = np.array([[2.0, 3.0, 30.0, 35.0], [20.0, 1.0, 60.0, 39.0]])
    batched = ours.predict(points, labels, boxes, return_logits=True)
    assert batched[0].shape == (2, 3, 40, 64)
    for i in range(2):
        single = ours.predict(points[i], labels[i], boxes[i], return_logits=True)
        for b, s in zip(batched, single, strict=True):
            np.testing.assert_allclose(b[i], s, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_each_program_compiles_once(pair):
    _, ours = pair
    rng = np.random.default_rng(4)
    ours.embed(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
    embeds = ours._embed._cache_size()
    ours.predict(np.array([[3.0, 4.0]]), np.array([1]))
    predicts = ours._predict._cache_size()
    ours.embed(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))  # another size
    ours.embed(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for _ in range(3):
        ours.predict(rng.uniform(0, 20, (1, 2)), np.array([1]))
    assert ours._embed._cache_size() == embeds
    # the second size changes the upscaling matrices' shapes, not the values' count
    assert ours._predict._cache_size() <= predicts + 1


def test_bad_prompts_name_the_problem(pair):
    _, ours = pair
    fresh = SamPredictor(ours.model, ours.variables)
    with pytest.raises(RuntimeError, match="call embed"):
        fresh.predict(np.array([[1.0, 1.0]]), np.array([1]))
    ours.embed(np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="outside the 40 x 30"):
        ours.predict(np.array([[41.0, 3.0]]), np.array([1]))
    with pytest.raises(ValueError, match="outside"):
        ours.predict(np.array([[5.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="x1 >= x0"):
        ours.predict(boxes=np.array([20.0, 5.0, 10.0, 25.0]))
    with pytest.raises(ValueError, match="inside the 40 x 30"):
        ours.predict(boxes=np.array([0.0, 5.0, 50.0, 25.0]))
    with pytest.raises(ValueError, match="labels have shape"):
        ours.predict(np.array([[1.0, 1.0], [2.0, 2.0]]), np.array([1]))
    with pytest.raises(ValueError, match="labels"):
        ours.predict(np.array([[1.0, 1.0]]), None)
    with pytest.raises(ValueError, match="point labels must be"):
        ours.predict(np.array([[1.0, 1.0]]), np.array([2]))
    with pytest.raises(ValueError, match=r"mask_input must be \[32, 32\]"):
        ours.predict(mask_input=np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="batch size"):
        ours.predict(np.zeros((2, 1, 2)), np.ones((2, 1)), np.array([[0.0, 0, 5, 5]] * 3))
    with pytest.raises(ValueError, match="at least one prompt"):
        ours.predict()
    with pytest.raises(ValueError, match="uint8"):
        ours.embed(np.zeros((30, 40, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[height, width, 3\]"):
        ours.embed(np.zeros((30, 40), np.uint8))

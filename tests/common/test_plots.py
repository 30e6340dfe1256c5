"""common.plots: the PNGs decode to the pixels their definitions say (grid layout, mask
overlay colours, mask panels, curve points), and bad inputs fail by name."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from common import plots


def read(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_image_grid_png_holds_each_image_upscaled_in_its_cell(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 2, 1), dtype=np.uint8)  # 5 images for a 2 x 3 grid
    path = plots.save(plots.image_grid(images, 2, 3, scale=2), tmp_path / "sub" / "g.png")
    pixels = read(path)
    assert pixels.shape == (2 * 6, 3 * 4, 3)
    expected = np.full((12, 12), 255, np.uint8)  # the empty sixth cell stays white
    for k, im in enumerate(images):
        r, c = divmod(k, 3)
        expected[r * 6 : r * 6 + 6, c * 4 : c * 4 + 4] = np.kron(im[..., 0], np.ones((2, 2)))
    np.testing.assert_array_equal(pixels, np.repeat(expected[..., None], 3, -1))


def test_image_grid_float_rgb_images_and_captions(tmp_path):
    images = np.zeros((2, 2, 2, 3), np.float32)
    images[0, ..., 0] = 1.0  # red
    images[1, ..., 2] = 0.5  # half blue: 128 after rounding
    grid = plots.image_grid(
        images, 1, 2, captions=["a", ["b", "c"]], colors=[(0, 130, 0), ["red", "black"]]
    )
    pixels = read(plots.save(grid, tmp_path / "c.png"))
    assert pixels.shape == (2 + 2 * plots.LINE_HEIGHT + 4, 2 * 96, 3)  # cells >= 96 wide
    np.testing.assert_array_equal(pixels[0, 47], [255, 0, 0])  # centred: x = (96 - 2) // 2
    np.testing.assert_array_equal(pixels[1, 96 + 48], [0, 0, 128])
    caption = pixels[2:, :96].reshape(-1, 3)
    assert ((caption == [0, 130, 0]).all(-1)).any()  # the first caption's colour
    second = pixels[2:, 96:].reshape(-1, 3)
    assert ((second == [255, 0, 0]).all(-1)).any() and ((second == 0).all(-1)).any()
    with pytest.raises(ValueError, match="captions: 1 entries for 2 images"):
        plots.image_grid(images, 1, 2, captions=["a"])
    with pytest.raises(ValueError, match=r"\[h, w\], \[h, w, 1\] or \[h, w, 3\]"):
        plots.image_grid(np.zeros((1, 2, 2, 2)), 1, 1)


def test_overlay_blends_binary_and_label_masks():
    image = np.full((2, 3), 100, np.uint8)
    binary = np.array([[True, False, False], [False, False, True]])
    out = plots.overlay(image, binary, alpha=0.25)
    expected = np.full((2, 3, 3), 100, np.uint8)
    expected[binary] = np.round(0.75 * 100 + 0.25 * np.array([255, 0, 0]))
    np.testing.assert_array_equal(out, expected)
    labels = np.array([[0, 1, 2], [2, 0, 1]])
    colors = [(0, 0, 200), (40, 80, 120)]
    out = plots.overlay(image, labels, alpha=0.5, colors=colors)
    for (i, j), label in np.ndenumerate(labels):
        want = [100] * 3 if label == 0 else np.round(50 + 0.5 * np.array(colors[label - 1]))
        np.testing.assert_array_equal(out[i, j], want)
    no_labels = plots.overlay(image, np.zeros((2, 3), int))  # label 0 everywhere: unchanged
    np.testing.assert_array_equal(no_labels, np.full((2, 3, 3), 100, np.uint8))
    with pytest.raises(ValueError, match="mask shape"):
        plots.overlay(image, labels[:1])
    with pytest.raises(ValueError, match="need 2 colours"):
        plots.overlay(image, labels, colors=colors[:1])


def test_mask_panels_and_label_picture():
    masks = np.array([[[1, 0], [0, 1]], [[0, 0], [1, 1]], [[1, 1], [1, 1]]], bool)
    panel = np.asarray(plots.mask_panels(masks, 2, gap=1))
    expected = np.array(
        [
            [255, 0, 128, 0, 0],
            [0, 255, 128, 255, 255],
            [128, 128, 128, 128, 128],
            [255, 255, 128, 128, 128],
            [255, 255, 128, 128, 128],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(panel, expected)
    table = np.array([[10, 20, 30], [200, 100, 0]], np.uint8)
    picture = np.asarray(plots.label_picture(np.array([[0, 1], [1, 1]]), 3, colors=table))
    np.testing.assert_array_equal(picture, table[np.kron([[0, 1], [1, 1]], np.ones((3, 3), int))])


def test_curves_draw_each_series_at_its_points(tmp_path):
    series = {"loss": ([0, 10, 20], [2.0, 1.0, 0.5]), "val": ([20], [1.5])}
    picture = read(plots.save(plots.curves(series, title="loss"), tmp_path / "l.png"))
    assert picture.shape == (320, 480, 3)
    to_px = plots.axes_transform(plots.plot_box((480, 320)), (0, 20), (0.5, 2.0))
    colors = [np.array(plots.rgb(c)) for c in plots.CURVE_COLORS[:2]]
    for (x, y), color in [((0, 2.0), 0), ((10, 1.0), 0), ((20, 0.5), 0), ((20, 1.5), 1)]:
        px, py = to_px(x, y)
        np.testing.assert_array_equal(picture[py, px], colors[color], err_msg=f"{x}, {y}")
    left, top, right, bottom = plots.plot_box((480, 320))
    assert (left, bottom) == to_px(0, 0.5) and (right, top) == to_px(20, 2.0)
    with pytest.raises(ValueError, match="series 'x': steps"):
        plots.curves({"x": ([0, 1], [1.0])})
    with pytest.raises(ValueError, match="non-finite"):
        plots.curves({"x": ([0, 1], [1.0, float("nan")])})


def test_prediction_grid_captions_right_green_and_wrong_red_with_the_truth():
    images = np.zeros((3, 4, 4, 1), np.uint8)
    grid = plots.prediction_grid(images, np.array([0, 1, 1]), np.array([0, 0, 1]), "ab", 1, 2)
    pixels = np.asarray(grid)
    assert pixels.shape == (12 + 2 * plots.LINE_HEIGHT + 4, 2 * 96, 3)  # two cells of three
    right, wrong = pixels[12:, :96].reshape(-1, 3), pixels[12:, 96:].reshape(-1, 3)
    colours = lambda p: {tuple(c) for c in np.unique(p, axis=0)}
    assert colours(right) == {(255, 255, 255), (0, 130, 0)}
    assert colours(wrong) == {(255, 255, 255), (255, 0, 0), (0, 0, 0)}
    assert (pixels[12 + plots.LINE_HEIGHT + 1 :, 96:] == [255, 0, 0]).all(-1).sum() == 0


def _tensorboard_images(tb_dir) -> dict[str, tuple[int, np.ndarray]]:
    """``{tag: (step, RGB pixels)}`` of the image summaries in ``tb_dir``'s event files."""
    import io
    import struct

    from tensorboardX.proto import event_pb2

    found = {}
    for name in sorted(os.listdir(tb_dir)):
        with open(os.path.join(tb_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):  # TFRecord framing: length, its crc, payload, its crc
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("image"):
                    found[v.tag] = (event.step, read(io.BytesIO(v.image.encoded_image_string)))
    return found


def test_save_images_writes_pngs_and_tensorboard_summaries(tmp_path):
    rng = np.random.default_rng(1)
    images = {
        "gray": plots.image_grid(rng.integers(0, 256, (2, 3, 3), dtype=np.uint8), 1, 2, scale=2),
        "rgb": plots.image_grid(rng.integers(0, 256, (1, 4, 5, 3), dtype=np.uint8), 1, 1),
    }
    paths = plots.save_images(tmp_path, images, step=7)
    assert paths == [str(tmp_path / "gray.png"), str(tmp_path / "rgb.png")]
    summaries = _tensorboard_images(tmp_path / "tb")
    assert sorted(summaries) == ["gray", "rgb"]
    for name, image in images.items():
        np.testing.assert_array_equal(read(tmp_path / f"{name}.png"), np.asarray(image))
        step, pixels = summaries[name]
        assert step == 7
        np.testing.assert_array_equal(pixels, np.asarray(image))
    plots.save_images(tmp_path / "no_tb", images)  # no step: PNGs only
    assert sorted(os.listdir(tmp_path / "no_tb")) == ["gray.png", "rgb.png"]

"""Pictures an experiment writes next to its results: image grids, masks and curves, as PNG.

Pillow only (no plotting library): every function returns a ``PIL.Image.Image`` that
``save`` writes, so a test can read the pixels back. Images are numpy arrays ``[h, w]``,
``[h, w, 1]`` or ``[h, w, 3]``, uint8 or float in ``[0, 1]`` (``to_uint8``).

* ``image_grid``: ``rows x cols`` images, nearest-neighbour upscaled, each with optional
  caption lines and colours; ``prediction_grid``: test images captioned with the predicted
  class, green when right.
* ``overlay``: a binary or label mask blended over an image (a segmentation).
* ``label_picture`` / ``mask_panels``: a label map as colours with a grid of window borders;
  binary masks side by side. ``shifted_window_picture`` puts the two together to show Swin's
  shifted-window attention (Liu et al. 2021, figure 2 and section 3.2).
* ``curves``: metrics against steps, one coloured polyline per series.
* ``save_images``: pictures as PNG files in the workdir and TensorBoard image summaries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = str | tuple[int, int, int]
LINE_HEIGHT = 12  # pixels per caption line of Pillow's default font


def save(image: Image.Image, path: str | os.PathLike[str]) -> str:
    """Write ``image`` as PNG to ``path`` (folders created); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image.save(path, format="PNG")
    return path


def save_images(
    workdir: str | os.PathLike[str], images: Mapping[str, Image.Image], step: int | None = None
) -> list[str]:
    """Process 0 writes each ``images[name]`` to ``workdir/<name>.png`` and, with ``step``, as
    a TensorBoard image summary ``name`` in ``workdir/tb`` (tensorboardX, beside the training
    scalars of ``common.metrics.MetricWriter``); returns the PNG paths (empty elsewhere)."""
    import jax

    if jax.process_index() != 0:
        return []
    paths = [save(image, os.path.join(workdir, f"{name}.png")) for name, image in images.items()]
    if step is not None and images:
        from tensorboardX import SummaryWriter

        tb = SummaryWriter(os.path.join(workdir, "tb"))
        for name, image in images.items():
            tb.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        tb.close()
    return paths


def to_uint8(image: np.ndarray) -> np.ndarray:
    """``[h, w]``, ``[h, w, 1]`` or ``[h, w, 3]`` uint8 or float in ``[0, 1]`` -> uint8
    ``[h, w]`` (gray) or ``[h, w, 3]``; floats are clipped to ``[0, 1]`` and rounded."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(f"an image is [h, w], [h, w, 1] or [h, w, 3]; got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"images are uint8 or float in [0, 1]; got dtype {image.dtype}")


def _per_cell(value: Any, n: int, name: str) -> list[Any]:
    if value is None:
        return [None] * n
    value = list(value)
    if len(value) < n:
        raise ValueError(f"{name}: {len(value)} entries for {n} images")
    return value


def image_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    rows: int,
    cols: int,
    *,
    scale: int = 1,
    captions: Sequence[str | Sequence[str]] | None = None,
    colors: Sequence[Color | Sequence[Color]] | None = None,
    cell_width: int | None = None,
    background: Color = "white",
) -> Image.Image:
    """``rows x cols`` cells, filled row by row with the first ``rows * cols`` images.

    Each image is upscaled ``scale`` times (nearest neighbour) and centred in its cell;
    ``captions[k]`` (a string or a list of lines) goes below image ``k`` in ``colors[k]``
    (one colour, or one per line; default black). Cells are ``cell_width`` wide (default:
    the image, at least 96 pixels when there are captions) and as tall as the image plus
    ``LINE_HEIGHT`` per line of the longest caption (plus 4 pixels).
    """
    if rows < 1 or cols < 1 or scale < 1:
        raise ValueError(f"rows={rows}, cols={cols} and scale={scale} must be >= 1")
    n = min(rows * cols, len(images))
    tiles = [to_uint8(images[k]) for k in range(n)]
    if len({t.shape[:2] for t in tiles}) > 1:
        raise ValueError(f"images differ in size: {sorted({t.shape[:2] for t in tiles})}")
    captions = _per_cell(captions, n, "captions")
    colors = _per_cell(colors, n, "colors")
    lines = [[c] if isinstance(c, str) else list(c or ()) for c in captions]
    h, w = (tiles[0].shape[0] * scale, tiles[0].shape[1] * scale) if tiles else (0, 0)
    n_lines = max((len(x) for x in lines), default=0)
    cell_w = cell_width or max(w, 96 if n_lines else 0)
    cell_h = h + (n_lines * LINE_HEIGHT + 4 if n_lines else 0)
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), background)
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"  # no anti-aliasing: captions in exactly their colours
    font = ImageFont.load_default()
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        x0, y0 = c * cell_w, r * cell_h
        picture = Image.fromarray(tile).resize((w, h), Image.NEAREST).convert("RGB")
        canvas.paste(picture, (x0 + (cell_w - w) // 2, y0))
        color = colors[k] if colors[k] is not None else "black"
        line_colors = (
            color if isinstance(color, list | tuple) and not _is_rgb_triple(color) else None
        )
        for i, text in enumerate(lines[k]):
            fill = line_colors[i] if line_colors is not None else color
            draw.text((x0 + 2, y0 + h + 1 + i * LINE_HEIGHT), text, fill=fill, font=font)
    return canvas


def prediction_grid(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: Sequence[str],
    rows: int,
    cols: int,
    scale: int = 3,
) -> Image.Image:
    """``image_grid`` of the first ``rows * cols`` images of a classifier's test set, each
    captioned with its predicted class: green when right; red, then the true class in
    parentheses, when wrong."""
    n = min(rows * cols, len(images))
    right = np.asarray(predictions[:n]) == np.asarray(labels[:n])
    captions = [
        [class_names[p]] + ([] if ok else [f"({class_names[t]})"])
        for p, t, ok in zip(predictions[:n], labels[:n], right, strict=True)
    ]
    colors = [[(0, 130, 0)] if ok else [(255, 0, 0), (0, 0, 0)] for ok in right]
    return image_grid(images[:n], rows, cols, scale=scale, captions=captions, colors=colors)


def _is_rgb_triple(color: Any) -> bool:
    return len(color) == 3 and all(isinstance(v, int | np.integer) for v in color)


def palette(n: int, seed: int = 3) -> np.ndarray:
    """``n`` distinct-enough mid-tone colours, uint8 ``[n, 3]`` (fixed by ``seed``)."""
    return np.random.default_rng(seed).integers(60, 240, size=(n, 3)).astype(np.uint8)


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    alpha: float = 0.5,
    colors: np.ndarray | Sequence[Color] | None = None,
) -> np.ndarray:
    """``image`` with ``mask`` blended over it, uint8 ``[h, w, 3]``.

    ``mask`` ``[h, w]``: bool (True pixels take ``colors[0]``, default red) or integer labels
    (label ``l > 0`` takes ``colors[l - 1]``, default ``palette``; 0 is left as it is). Covered
    pixels become ``(1 - alpha) * image + alpha * colour``.
    """
    base = to_uint8(image)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=-1)
    mask = np.asarray(mask)
    if mask.shape != base.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} is not the image's {base.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    labels = mask.astype(np.int64)
    if colors is None:
        table = (
            np.array([[255, 0, 0]], np.uint8)
            if mask.dtype == bool
            else palette(max(labels.max(), 1))
        )
    else:
        table = np.array([rgb(c) for c in colors], np.uint8)
    if labels.min() < 0 or labels.max() > len(table):
        raise ValueError(f"mask labels {labels.min()}..{labels.max()} need {labels.max()} colours")
    color = table[np.maximum(labels - 1, 0)].astype(np.float64)  # [h, w, 3]
    blended = np.round((1.0 - alpha) * base + alpha * color).astype(np.uint8)
    return np.where((labels > 0)[..., None], blended, base)


def rgb(color: Color) -> tuple[int, int, int]:
    if isinstance(color, str):
        from PIL import ImageColor

        return ImageColor.getrgb(color)[:3]
    return tuple(int(v) for v in color)


def label_picture(
    labels: np.ndarray, cell: int, *, grid: int = 0, colors: np.ndarray | None = None
) -> Image.Image:
    """A label map ``[h, w]`` as colours (``colors[label]``, default ``palette``), each entry a
    ``cell x cell`` square, with black lines every ``grid`` entries (0: none)."""
    labels = np.asarray(labels)
    table = palette(int(labels.max()) + 1) if colors is None else np.asarray(colors, np.uint8)
    h, w = labels.shape
    picture = Image.fromarray(table[labels]).resize((w * cell, h * cell), Image.NEAREST)
    if grid:
        draw = ImageDraw.Draw(picture)
        for i in range(0, h + 1, grid):
            draw.line([(0, i * cell), (w * cell, i * cell)], fill="black", width=2)
        for j in range(0, w + 1, grid):
            draw.line([(j * cell, 0), (j * cell, h * cell)], fill="black", width=2)
    return picture


def mask_panels(masks: np.ndarray, cols: int, *, scale: int = 1, gap: int = 4) -> Image.Image:
    """Binary masks ``[n, a, b]`` as ``ceil(n / cols) x cols`` panels, white where True, black
    where False, ``gap`` gray pixels between panels (before upscaling by ``scale``)."""
    masks = np.asarray(masks)
    n, a, b = masks.shape
    rows = -(-n // cols)
    out = np.full((rows * (a + gap) - gap, cols * (b + gap) - gap), 128, np.uint8)
    for k in range(n):
        i, j = divmod(k, cols)
        out[i * (a + gap) : i * (a + gap) + a, j * (b + gap) : j * (b + gap) + b] = masks[k] * 255
    picture = Image.fromarray(out)
    return picture.resize((out.shape[1] * scale, out.shape[0] * scale), Image.NEAREST)


def shifted_window_picture(
    height: int,
    width: int,
    window: int,
    shift: int,
    mask_fn: Callable[[int, int, int, int], np.ndarray],
    scale: int = 6,
) -> Image.Image:
    """Swin's SW-MSA on a ``height x width`` token map (Liu et al. 2021, figure 2, 3.2).

    Left: the map after the cyclic roll by ``-shift``, each token coloured by the window of
    the displaced partition it came from (a window that mixes colours holds tokens that were
    not adjacent in the image), window borders in black. Right: ``mask_fn(H, W, window,
    shift)`` (``vision.swin.shifted_window_mask``: ``[windows, M*M, M*M]``) in the same
    layout, white where a query (row) may attend to a key (column). A map that is not a
    multiple of the window is drawn zero-padded, as the block pads it.
    """
    size = f"{height}x{width} tokens"
    height, width = height + -height % window, width + -width % window
    if size != f"{height}x{width} tokens":
        size += f" (padded {height}x{width})"
    zoom = max(1, 16 // width)  # small maps drawn larger, so the captions fit
    rows = (np.arange(height) + shift) % height  # un-rolled coordinates of the rolled map
    cols = (np.arange(width) + shift) % width
    piece = ((rows[:, None] - shift) // window + 1) * 64 + (cols[None] - shift) // window + 1
    left = label_picture(piece, 12 * zoom, grid=window)
    mask = mask_fn(height, width, window, shift)  # [windows, M*M, M*M]
    right = mask_panels(mask, width // window, scale=max(1, scale // 2) * zoom).convert("RGB")
    pad, title = 16, 28  # margins; two lines of captions above the panels
    out = Image.new(
        "RGB",
        (left.width + right.width + 3 * pad, max(left.height, right.height) + 2 * pad + title),
        "white",
    )
    out.paste(left, (pad, pad + title))
    out.paste(right, (2 * pad + left.width, pad + title))
    draw = ImageDraw.Draw(out)
    draw.text((pad, 2), size, fill="black")
    draw.text((pad, 16), f"rolled by -{shift}, {window}x{window} windows", fill="black")
    draw.text((2 * pad + left.width, 2), "mask of each window (white: the", fill="black")
    draw.text((2 * pad + left.width, 16), "query row may attend the key column)", fill="black")
    return out


def curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    size: tuple[int, int] = (480, 320),
    colors: Sequence[Color] | None = None,
) -> Image.Image:
    """Metrics against steps: ``series[name] = (steps, values)``, one polyline each in
    ``colors`` (default: a fixed list), on shared axes whose ranges cover every point.

    The plot area is the ``size`` canvas less ``MARGINS`` (left, top, right, bottom), framed
    in black; the axes' end values, the title and a legend are written in the margins.
    """
    if not series:
        raise ValueError("curves: no series to draw")
    data = {}
    for name, (steps, values) in series.items():
        steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
        if steps.shape != values.shape or steps.ndim != 1 or not len(steps):
            raise ValueError(f"series {name!r}: steps {steps.shape} and values {values.shape}")
        if not (np.isfinite(steps).all() and np.isfinite(values).all()):
            raise ValueError(f"series {name!r} has non-finite steps or values")
        data[name] = (steps, values)
    colors = list(colors or CURVE_COLORS)
    if len(colors) < len(data):
        raise ValueError(f"{len(colors)} colours for {len(data)} series")
    xs = np.concatenate([s for s, _ in data.values()])
    ys = np.concatenate([v for _, v in data.values()])
    box = plot_box(size)
    to_px = axes_transform(box, (xs.min(), xs.max()), (ys.min(), ys.max()))
    out = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(out)
    draw.rectangle(box, outline="black")
    for (steps, values), color in zip(data.values(), colors, strict=False):
        points = [to_px(x, y) for x, y in zip(steps, values, strict=True)]
        if len(points) == 1:
            draw.point(points, fill=color)
        else:
            draw.line(points, fill=color, width=1)
    left, top, right, bottom = box
    draw.text((left, bottom + 4), _num(xs.min()), fill="black")
    draw.text((right - 40, bottom + 4), _num(xs.max()), fill="black")
    draw.text((2, bottom - LINE_HEIGHT), _num(ys.min()), fill="black")
    draw.text((2, top), _num(ys.max()), fill="black")
    draw.text((left, 4), title, fill="black")
    for i, (name, color) in enumerate(zip(data, colors, strict=False)):
        draw.text((left + 8, top + 4 + i * LINE_HEIGHT), name, fill=color)
    return out


CURVE_COLORS: tuple[Color, ...] = ("#1f5fbf", "#d2451e", "#2e8b3a", "#7b3fa0", "#b8860b")
MARGINS = (56, 24, 12, 24)  # left, top, right, bottom: room for the labels


def plot_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The plot area ``(left, top, right, bottom)`` of a ``curves`` canvas of ``size``."""
    left, top, right, bottom = MARGINS
    if size[0] <= left + right + 1 or size[1] <= top + bottom + 1:
        raise ValueError(f"size {size} leaves no room inside the margins {MARGINS}")
    return left, top, size[0] - 1 - right, size[1] - 1 - bottom


def axes_transform(
    box: tuple[int, int, int, int], x_range: tuple[float, float], y_range: tuple[float, float]
) -> Callable[[float, float], tuple[int, int]]:
    """``(x, y) -> pixel``: ``x_range`` onto the box's width, ``y_range`` onto its height
    (up is larger); a range of one value maps to the box's middle."""
    left, top, right, bottom = box

    def scale(v, lo, hi, a, b):
        return (a + b) / 2 if hi == lo else a + (v - lo) / (hi - lo) * (b - a)

    def to_px(x: float, y: float) -> tuple[int, int]:
        px = scale(x, *x_range, left, right)
        py = scale(y, *y_range, bottom, top)
        return int(round(px)), int(round(py))

    return to_px


def _num(v: float) -> str:
    return f"{v:.4g}"

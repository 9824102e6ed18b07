"""Tables, image grids and plots for reports."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cmboost.atomic import atomic_path


def image_grid(images: np.ndarray, columns: int, pad: int = 2, value: int = 255) -> np.ndarray:
    """uint8 NCHW -> one HWC (or HW) uint8 image with `columns` tiles per row."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((c, rows * (h + pad) + pad, columns * (w + pad) + pad), value, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = image
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Writes a HW or HWC uint8 array as PNG, atomically."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:  # PIL picks the format from the suffix
        Image.fromarray(array).save(tmp)
    return path


def save_before_after_grid(before: np.ndarray, after: np.ndarray, path: str | os.PathLike,
                           count: int = 16, scale: int = 2) -> Path:
    """Two rows: the first `count` images before (top) and after (bottom) boosting."""
    count = min(count, len(before), len(after))
    grid = image_grid(np.concatenate([before[:count], after[:count]]), columns=count)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return save_png(grid, path)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], floats: str = "{:.3f}") -> str:
    """A GitHub markdown table of `rows` (dicts) restricted to `columns`."""
    def cell(value):
        if isinstance(value, float):
            return "n/a" if not math.isfinite(value) else floats.format(value)
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def line_plot(series: dict[str, Sequence[tuple[float, float]]], path: str | os.PathLike, title: str,
              xlabel: str, ylabel: str, size: tuple[int, int] = (860, 420)) -> Path:
    """A small line chart drawn with Pillow (no plotting dependency): one polyline per series."""
    from PIL import Image, ImageDraw

    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    width, height = size
    left, right, top, bottom = 70, 230, 40, 60  # the legend sits in the right margin, clear of the lines
    points = [p for s in series.values() for p in s if all(map(math.isfinite, p))]
    if not points:
        raise ValueError("line_plot: no finite points")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = 0.05 * (max(ys) - min(ys) or 1.0)
    y0, y1 = min(ys) - pad, max(ys) + pad

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                top + (y1 - y) / (y1 - y0) * (height - top - bottom))

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for i in range(5):  # ticks
        yv = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, yv)
        draw.line([left - 4, py, left, py], fill=(0, 0, 0))
        draw.text((5, py - 6), f"{yv:.3g}", fill=(0, 0, 0))
    for xv in sorted(set(xs)):
        px, _ = to_px(xv, y0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill=(0, 0, 0))
        draw.text((px - 6, height - bottom + 6), f"{xv:g}", fill=(0, 0, 0))
    draw.text((width // 2 - 4 * len(title), 10), title, fill=(0, 0, 0))
    draw.text((width // 2 - 4 * len(xlabel), height - 25), xlabel, fill=(0, 0, 0))
    draw.text((5, top - 20), ylabel, fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        color = colors[i % len(colors)]
        pix = [to_px(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        if len(pix) > 1:
            draw.line(pix, fill=color, width=2)
        for px, py in pix:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.line([width - right + 12, top + 14 + 16 * i, width - right + 32, top + 14 + 16 * i], fill=color, width=2)
        draw.text((width - right + 38, top + 8 + 16 * i), name, fill=color)
    return save_png(np.asarray(image), path)


def save_labelled_grid(before: np.ndarray, after: np.ndarray, labels: np.ndarray, path: str | os.PathLike,
                       class_names: Sequence[str] | None = None, classes: int = 8, per_class: int = 8,
                       scale: int = 2) -> Path:
    """Before (left) and after (right) panels: one column per class (named on top), the first
    `per_class` samples of that class down the column; uint8 NCHW images with labels."""
    from PIL import Image, ImageDraw

    from cmboost.data import FMNIST_CLASSES

    names = list(class_names or FMNIST_CLASSES)
    chosen = [c for c in range(len(names)) if (labels == c).any()][:classes]
    n, c, h, w = before.shape
    blank = np.full((c, h, w), 255, np.uint8)

    def panel(images):
        tiles = []
        for row in range(per_class):
            for cls in chosen:
                where = np.flatnonzero(labels == cls)
                tiles.append(images[where[row]] if row < len(where) else blank)
        grid = image_grid(np.stack(tiles), columns=len(chosen))
        return grid.repeat(scale, axis=0).repeat(scale, axis=1)

    left, right = panel(before), panel(after)
    header, gap = 28, 16
    height, width = left.shape[0] + header, left.shape[1] * 2 + gap
    canvas = Image.new("L" if left.ndim == 2 else "RGB", (width, height), 255)
    canvas.paste(Image.fromarray(left), (0, header))
    canvas.paste(Image.fromarray(right), (left.shape[1] + gap, header))
    draw = ImageDraw.Draw(canvas)
    tile = (w + 2) * scale
    for offset, title in ((0, "before"), (left.shape[1] + gap, "after")):
        draw.text((offset + 4, 2), title, fill=0)
        for i, cls in enumerate(chosen):
            draw.text((offset + 2 * scale + i * tile, 15), names[cls][:9], fill=0)
    return save_png(np.asarray(canvas), path)

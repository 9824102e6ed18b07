"""Tables, image grids and plots for reports.

Every writer is atomic and refuses an existing file unless `overwrite` is passed. Plots need the
optional matplotlib (`pip install 'cmboost[report]'`); grids need only torchvision and Pillow.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_path, refuse_existing
from cmboost.files.datasets import FMNIST_CLASSES

MIN_TILE = 96  # px: 28-32 px samples are upscaled (nearest) to at least this, to be judged by eye


def image_grid(images: np.ndarray, columns: int, pad: int = 2, value: int = 255) -> np.ndarray:
    """uint8 NCHW -> one HWC (or HW, for one channel) uint8 image with `columns` tiles per row,
    `pad` pixels of `value` around every tile (torchvision's make_grid)."""
    import torch
    from torchvision.utils import make_grid

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid: expected uint8 NCHW images, got {images.dtype} {images.shape}")
    grid = make_grid(torch.from_numpy(np.ascontiguousarray(images)), nrow=columns, padding=pad,
                     pad_value=value).numpy()
    # make_grid turns one channel into three identical ones; keep grey PNGs grey.
    return grid[0] if images.shape[1] == 1 else grid.transpose(1, 2, 0)


def upscale(images: np.ndarray, scale: int) -> np.ndarray:
    """NCHW images `scale` times larger, nearest neighbour, so single pixels stay visible as squares."""
    return images if scale <= 1 else images.repeat(scale, axis=2).repeat(scale, axis=3)


def auto_scale(images: np.ndarray, min_tile: int = MIN_TILE) -> int:
    return max(1, math.ceil(min_tile / max(images.shape[2:])))


def save_png(array: np.ndarray, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Writes a HW or HWC uint8 array as PNG, atomically."""
    from PIL import Image

    path = Path(path)
    refuse_existing(path, overwrite)
    with atomic_path(path, suffix=".png") as tmp:  # PIL picks the format from the suffix
        Image.fromarray(array).save(tmp)
    return path


def save_before_after_grid(before: np.ndarray, after: np.ndarray, path: str | os.PathLike,
                           count: int = 16, scale: int = 2, overwrite: bool = False) -> Path:
    """Two rows: the first `count` images before (top) and after (bottom) boosting."""
    count = min(count, len(before), len(after))
    tiles = upscale(np.concatenate([before[:count], after[:count]]), scale)
    return save_png(image_grid(tiles, columns=count, pad=2 * scale), path, overwrite)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], floats: str = "{:.3f}") -> str:
    """A GitHub markdown table of `rows` (dicts) restricted to `columns`."""
    def cell(value):
        if isinstance(value, float):
            return "n/a" if not math.isfinite(value) else floats.format(value)
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def require_matplotlib():
    """matplotlib's Figure and Agg canvas, or one line saying how to install them. Callers that plot
    at the end of a long run call this first, so a missing extra fails before the work, not after."""
    try:
        import matplotlib  # noqa: F401  (imported first so a missing package fails here, not mid-way)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserInputError("plots need matplotlib: pip install 'cmboost[report]'") from None
    return Figure, FigureCanvasAgg


def line_plot(series: dict[str, Sequence[tuple[float, float]]], path: str | os.PathLike, title: str,
              xlabel: str, ylabel: str, logx: bool = False, overwrite: bool = False,
              size: tuple[float, float] = (8.0, 4.5), dpi: int = 150) -> Path:
    """One line with markers per series, legend, axis labels; x ticks at the data's x values when
    there are few. `logx` spaces x by log2 (evaluation counts that roughly double). `size` in inches."""
    Figure, FigureCanvasAgg = require_matplotlib()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    path = Path(path)
    refuse_existing(path, overwrite)
    finite = {name: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
              for name, pts in series.items()}
    xs = sorted({x for pts in finite.values() for x, _ in pts})
    if not xs:
        raise ValueError("line_plot: no finite points")
    if logx and xs[0] <= 0:
        raise ValueError(f"line_plot: log x needs positive x, got {xs[0]:g}")

    # A bare Figure on an Agg canvas: no pyplot, so no global state and no display is touched.
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, pts in finite.items():
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=5, linewidth=2, label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if len(xs) <= 12:
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))  # 0.601, not 0.601432
    ax.set_title(title, fontsize=13)
    ax.set_xlabel(xlabel, fontsize=12)
    ax.set_ylabel(ylabel, fontsize=12)
    ax.tick_params(labelsize=10.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=10, loc="best", framealpha=0.9)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font, no system fonts needed


def _fitting_font(draw, texts: Sequence[str], width: int, largest: int = 20, smallest: int = 10):
    """The largest font size at which every text fits in `width` pixels (at least `smallest`)."""
    for size in range(largest, smallest, -1):
        font = _font(size)
        if max(draw.textlength(t, font=font) for t in texts) <= width:
            return font
    return _font(smallest)


# The third panel of a labelled grid: |after - before| times this gain, so that an edit of a few grey
# levels per pixel (a boost's typical L2 change of 0.3 over 1024 pixels is about 2.5 levels) shows.
DIFFERENCE_GAIN = 8


def amplified_difference(before: np.ndarray, after: np.ndarray, gain: int = DIFFERENCE_GAIN) -> np.ndarray:
    """uint8 |after - before| x gain, clipped to 255: black where the edit changed nothing."""
    difference = np.abs(after.astype(np.int32) - before.astype(np.int32)) * int(gain)
    return np.minimum(difference, 255).astype(np.uint8)


def save_labelled_grid(before: np.ndarray, after: np.ndarray, labels: np.ndarray, path: str | os.PathLike,
                       class_names: Sequence[str] | None = None, classes: int = 10, per_class: int = 8,
                       scale: int | None = None, overwrite: bool = False, gain: int = DIFFERENCE_GAIN) -> Path:
    """Before (left), after (middle) and the amplified difference |after - before| x gain (right,
    the gain in its title) side by side: one column per class, its name under the column, the first
    `per_class` samples of that class down the column (blank where a class has fewer). uint8 NCHW
    images with their labels; `scale` (nearest upscaling) defaults to tiles of at least MIN_TILE
    pixels."""
    from PIL import Image, ImageDraw


    names = list(class_names or FMNIST_CLASSES)
    labels = np.asarray(labels)
    chosen = [c for c in range(len(names)) if (labels == c).any()][:classes]
    if not chosen:
        raise ValueError("save_labelled_grid: no labels name a known class")
    scale = auto_scale(before) if scale is None else scale
    pad = 2 * scale
    c, h, w = before.shape[1:]
    blank = np.full((c, h, w), 255, np.uint8)
    rows = min(per_class, max(int((labels == cls).sum()) for cls in chosen))

    def panel(images):
        tiles = []
        for row in range(rows):
            for cls in chosen:
                where = np.flatnonzero(labels == cls)
                tiles.append(images[where[row]] if row < len(where) else blank)
        return image_grid(upscale(np.stack(tiles), scale), columns=len(chosen), pad=pad)

    panels = (("before", panel(before)), ("after", panel(after)),
              (f"|after - before| x {gain}", panel(amplified_difference(before, after, gain))))
    left = panels[0][1]
    gap, column = 6 * pad, w * scale + pad
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))  # measures text before the canvas size is known
    name_font = _fitting_font(probe, [names[cls] for cls in chosen], column - 4)
    title_font = _font(24)
    header, footer = 36, int(name_font.size * 1.6)
    canvas = Image.new("L" if left.ndim == 2 else "RGB",
                       (len(panels) * (left.shape[1] + gap) - gap, header + left.shape[0] + footer), 255)
    draw = ImageDraw.Draw(canvas)
    for index, (title, image) in enumerate(panels):
        offset = index * (left.shape[1] + gap)
        canvas.paste(Image.fromarray(image), (offset, header))
        draw.text((offset + pad, 4), title, fill=0, font=title_font)
        for i, cls in enumerate(chosen):
            centre = offset + pad + i * column + w * scale / 2
            text = names[cls]
            draw.text((centre - draw.textlength(text, font=name_font) / 2, header + left.shape[0] + 2),
                      text, fill=0, font=name_font)
    return save_png(np.asarray(canvas), path, overwrite)

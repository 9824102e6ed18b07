"""Tables, image grids and plots for reports."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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

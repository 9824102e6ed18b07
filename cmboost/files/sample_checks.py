"""What every sample file must hold, checked wherever one is read: uint8 NCHW images and integer labels in
range."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmboost.errors import UserInputError


def check_samples(images: np.ndarray, labels: np.ndarray | None, source: str,
                  num_classes: int | None = None) -> None:
    """Raises UserInputError naming `source` unless images are uint8 NCHW with 1 or 3 channels
    and labels (if any) are one non-negative integer per image below `num_classes`."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise UserInputError(f"{source}: images must be uint8, got {dtype}")
    if images.ndim != 4:
        raise UserInputError(f"{source}: images must have 4 dimensions, got shape {images.shape}")
    if images.shape[1] not in (1, 3):
        raise UserInputError(f"{source}: images must have 1 or 3 channels, got {images.shape[1]}")
    if labels is None:
        return
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(f"{source}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise UserInputError(f"{source}: {len(labels)} labels for {len(images)} images")
    if len(labels) and labels.min() < 0:
        raise UserInputError(f"{source}: negative label {labels.min()}")
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        raise UserInputError(f"{source}: label {labels.max()} out of range for {num_classes} classes")


def integer_labels(labels: np.ndarray | None, path: Path) -> np.ndarray | None:
    """`arr_1` as int64, or a clear error when it holds anything but integers."""
    if labels is None:
        return None
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(f"{path}: arr_1 labels must be integers, got {labels.dtype}")
    return labels.astype(np.int64)

"""A batch as Ray Data hands it to a stage: a dict of numpy arrays, one entry per column, and the
helpers on it that need no torch (the writer's process never imports torch)."""

from __future__ import annotations

import numpy as np

from workers.errors import MissingColumnsError

Batch = dict[str, np.ndarray]


def require_columns(stage: str, batch: Batch, needed: tuple[str, ...]) -> None:
    missing = [c for c in dict.fromkeys(needed) if c not in batch]
    if missing:
        raise MissingColumnsError(
            f"{stage}: the batch lacks column(s) {missing}; it has {sorted(batch)}. "
            f"Expected the stages before {stage} to produce them: check the stage order."
        )


def to_uint8_hwc(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) floats in [-1, 1] to (B, H, W, 3) uint8."""
    scaled = np.clip(images.astype(np.float32) / 2 + 0.5, 0, 1) * 255
    return np.round(scaled).astype(np.uint8).transpose(0, 2, 3, 1)


def pixels(image: np.ndarray) -> np.ndarray:
    """One row's image as (H, W, 3) uint8: stage I / II rows are (3, H, W) in [-1, 1]."""
    if image.ndim == 3 and image.shape[0] == 3 and image.dtype != np.uint8:
        return to_uint8_hwc(image[None])[0]
    return image


def per_row(n: int, value: np.ndarray) -> np.ndarray:
    """An image column whose rows may differ in shape: an object array, `value` in every row."""
    column = np.empty(n, dtype=object)
    for i in range(n):
        column[i] = value
    return column


def stacked(column: np.ndarray) -> np.ndarray:
    """An image column as one array when its rows share a shape (so it travels as a fixed-shape
    tensor), else as it is: rows of several shapes (Ray Data's variable-shaped tensors)."""
    if column.dtype != object or not len(column) or not isinstance(column[0], np.ndarray):
        return column
    if len({image.shape for image in column}) > 1:
        return column
    return np.stack(list(column))

"""Boxes and masks, one place: ``[x0, y0, x1, y1]`` in pixels, ends exclusive."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def box_area(b: Sequence[float]) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def intersection_area(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = intersection_area(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def mask_box(mask: np.ndarray) -> list[float] | None:
    """The bounding box of a mask's True pixels, or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def as_mask(a: np.ndarray | None) -> np.ndarray | None:
    """A mask as bool (H, W): bool as is, grey or RGB images above mid-grey."""
    if a is None:
        return None
    if a.ndim == 3:
        a = a[..., 0]
    return a.astype(bool) if a.dtype == bool else a > 127

"""GrabCut segmentation from a box (OpenCV, no weights)."""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np
from scipy import ndimage

from opensubject_tasks.backends.base import Box, Image, Mask
from opensubject_tasks.backends.registry import register


class GrabCutSegmenter:
    """Segments the subject inside a box. Works on a crop around the box, downscaled to
    ``work_side``, so the cost does not grow with the frame size. When GrabCut finds
    almost nothing inside the box (flat or camouflaged subjects) the box itself is the
    mask, so later stages always get a usable region."""

    name = "classical"

    def __init__(self, iterations: int = 4, work_side: int = 256, margin: float = 0.15,
                 min_fill: float = 0.15) -> None:
        self.iterations = iterations
        self.work_side = work_side
        self.margin = margin
        self.min_fill = min_fill

    def segment(self, images: Sequence[Image], boxes: Sequence[Box]) -> list[Mask]:
        return [self._one(img, box) for img, box in zip(images, boxes, strict=True)]

    def _one(self, image: Image, box: Box) -> Mask:
        h, w = image.shape[:2]
        x0, y0, x1, y1 = _clip_box(box, w, h)
        out = np.zeros((h, w), bool)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return out
        bw, bh = x1 - x0, y1 - y0
        # a margin of background around the box gives GrabCut its background model
        cx0, cy0 = max(0, int(x0 - self.margin * bw)), max(0, int(y0 - self.margin * bh))
        cx1, cy1 = min(w, int(np.ceil(x1 + self.margin * bw))), min(h, int(np.ceil(y1 + self.margin * bh)))
        crop = image[cy0:cy1, cx0:cx1]
        scale = min(1.0, self.work_side / max(crop.shape[:2]))
        small = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else crop
        rect = (int((x0 - cx0) * scale), int((y0 - cy0) * scale),
                max(1, int(bw * scale)), max(1, int(bh * scale)))
        mask = np.zeros(small.shape[:2], np.uint8)
        box_only = np.zeros(small.shape[:2], bool)
        box_only[rect[1]:rect[1] + rect[3], rect[0]:rect[0] + rect[2]] = True
        fg = box_only
        if rect[2] >= 4 and rect[3] >= 4 and not box_only.all():
            cv2.setRNGSeed(0)  # GrabCut's GMM initialisation draws from OpenCV's RNG
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            try:
                cv2.grabCut(cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2BGR), mask, rect,
                            bgd, fgd, self.iterations, cv2.GC_INIT_WITH_RECT)
                cut = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
                cut = _largest_component(cut) & box_only
                if cut.sum() >= self.min_fill * box_only.sum():
                    fg = ndimage.binary_fill_holes(cut)
            except cv2.error:
                pass  # degenerate colour models: keep the box
        full = cv2.resize(fg.astype(np.uint8), (cx1 - cx0, cy1 - cy0), interpolation=cv2.INTER_NEAREST)
        out[cy0:cy1, cx0:cx1] = full.astype(bool)
        # never outside the box that was asked for
        box_mask = np.zeros_like(out)
        box_mask[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
        return out & box_mask


def _clip_box(box: Box, w: int, h: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask.astype(bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


@register("segmenter", "classical")
def make_grabcut(device: str = "cpu", dtype: str = "auto", batch_size: int = 1,
                 **options: Any) -> GrabCutSegmenter:
    return GrabCutSegmenter(**options)

"""Template captions from what is measurable without a language model.

Used when no VLM is configured. Every phrase comes from the pixels or the recorded
metadata (category, subject colours, position and scale in the frame, scene
brightness and colour), and the caption is labelled ``source="template"`` so nobody
mistakes it for a model's description. Nothing here claims an action or attribute
it cannot see.
"""
from __future__ import annotations

import cv2
import numpy as np

from opensubject_tasks.backends.base import Caption

TEMPLATE_SOURCE = "template"

# Hue ranges in degrees (0..360) -> colour name, for saturated pixels.
_HUES = [(15, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (195, "teal"),
         (255, "blue"), (290, "purple"), (345, "pink"), (360, "red")]


_NAMES = [name for _, name in _HUES] + ["brown", "white", "grey", "black"]
_BROWN, _WHITE, _GREY, _BLACK = range(len(_HUES), len(_HUES) + 4)
_MAX_PIXELS = 20_000  # colour statistics from an even subsample: plenty, and fast


def _subsample(pixels: np.ndarray) -> np.ndarray:
    px = pixels.reshape(-1, 3)
    step = max(1, len(px) // _MAX_PIXELS)
    return px[::step]


def colour_codes(pixels: np.ndarray) -> np.ndarray:
    """Index into ``_NAMES`` of each RGB pixel (N, 3) uint8, from hue, saturation, value."""
    hsv = cv2.cvtColor(pixels.reshape(-1, 1, 3).astype(np.uint8), cv2.COLOR_RGB2HSV).reshape(-1, 3)
    h = hsv[:, 0].astype(np.float32) * 2.0
    s = hsv[:, 1].astype(np.int32)
    v = hsv[:, 2].astype(np.int32)
    edges = np.array([e for e, _ in _HUES], dtype=np.float32)
    codes = np.searchsorted(edges, h, side="right").clip(0, len(_HUES) - 1)
    warm = np.isin(codes, [0, 1, 2, len(_HUES) - 1])          # red, orange, yellow
    codes[warm & (v < 150) & (s > 60)] = _BROWN               # dark warm colours read as brown
    grey = s < 45
    codes[grey & (v >= 200)] = _WHITE
    codes[grey & (v < 200)] = _GREY
    codes[v < 50] = _BLACK
    return codes


def colour_names(pixels: np.ndarray) -> list[str]:
    """Name the colour of each RGB pixel (N, 3) uint8."""
    if len(pixels) == 0:
        return []
    return [_NAMES[c] for c in colour_codes(pixels)]


def dominant_colours(pixels: np.ndarray, max_names: int = 2, min_share: float = 0.15) -> list[str]:
    """The one or two colour names that cover most of the given pixels."""
    px = _subsample(pixels)
    if len(px) == 0:
        return []
    counts = np.bincount(colour_codes(px), minlength=len(_NAMES)).astype(np.float64)
    # Red sits at both ends of the hue circle: one name, one count.
    counts[0] += counts[len(_HUES) - 1]
    counts[len(_HUES) - 1] = 0
    order = sorted(range(len(_NAMES)), key=lambda i: (-counts[i], i))
    total = counts.sum()
    picked = [_NAMES[i] for i in order if counts[i] / total >= min_share][:max_names]
    return picked or [_NAMES[order[0]]]


def position_phrase(box: tuple[float, float, float, float], width: int, height: int) -> str:
    """Where a box sits in the frame, in words ("in the upper left of the frame")."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2 / max(width, 1), (y0 + y1) / 2 / max(height, 1)
    horiz = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    vert = "upper" if cy < 0.4 else "lower" if cy > 0.6 else ""
    if not horiz and not vert:
        return "in the centre of the frame"
    if not vert:
        return f"on the {horiz} side of the frame"
    if not horiz:
        return f"in the {vert} part of the frame"
    return f"in the {vert} {horiz} of the frame"


def scale_phrase(area_share: float) -> str:
    if area_share < 0.05:
        return "small in the frame"
    if area_share < 0.2:
        return "medium-sized in the frame"
    if area_share < 0.5:
        return "large in the frame"
    return "filling most of the frame"


def scene_phrase(pixels: np.ndarray) -> str:
    """Brightness, colour temperature and main colour of the scene around the subject."""
    pixels = _subsample(pixels)
    if len(pixels) == 0:
        return "an unknown scene"
    px = pixels.astype(np.float32)
    hsv = cv2.cvtColor(pixels.reshape(-1, 1, 3).astype(np.uint8), cv2.COLOR_RGB2HSV).reshape(-1, 3)
    v, s = float(hsv[:, 2].mean()), float(hsv[:, 1].mean())
    light = "dark" if v < 70 else "dim" if v < 120 else "well-lit" if v < 190 else "bright"
    warmth = float(px[:, 0].mean() - px[:, 2].mean())
    tone = "warm-toned" if warmth > 15 else "cool-toned" if warmth < -15 else "neutral-toned"
    vivid = ["muted"] if s < 40 else ["colourful"] if s > 120 else []
    main = dominant_colours(pixels, max_names=1)
    bg = f" with a mostly {main[0]} background" if main else ""
    return f"a {', '.join([light, *vivid, tone])} scene{bg}"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def template_caption(reference: np.ndarray, reference_mask: np.ndarray | None,
                     target: np.ndarray, target_box_mask: np.ndarray | None,
                     category: str) -> Caption:
    """Short and long captions built from pixels and metadata only.

    ``reference``/``reference_mask`` give the subject's colours; ``target`` and the mask of
    the subject's box in it give its position, scale and the scene around it.
    """
    category = (category or "object").strip() or "object"
    if reference_mask is not None and reference_mask.shape == reference.shape[:2] and reference_mask.any():
        subject_px = reference[reference_mask]
    else:
        subject_px = reference.reshape(-1, 3)
    colours = dominant_colours(subject_px)
    described = f"{' and '.join(colours)} {category}" if colours else category
    short = f"{_article(described)} {described}"

    h, w = target.shape[:2]
    if target_box_mask is not None and target_box_mask.shape == (h, w) and target_box_mask.any():
        ys, xs = np.nonzero(target_box_mask)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        area = float(target_box_mask.mean())
        scene_px = target[~target_box_mask]
        where = f", {scale_phrase(area)}, {position_phrase(box, w, h)}"
    else:
        scene_px, where = target.reshape(-1, 3), ""
    long = f"{short[0].upper()}{short[1:]}{where}, in {scene_phrase(scene_px)}."
    return Caption(short=short, long=long, source=TEMPLATE_SOURCE)

"""Classical benchmark metrics: pure functions on numpy images and an embedder.

Images are RGB uint8 (H, W, 3); masks bool (H, W); boxes [x0, y0, x1, y1] in pixels.
Similarities come from an ``Embedder`` (L2-normalised vectors, cosine = dot product).
Every metric is also mapped to the benchmark's 0-10 scale by a documented rule, so
it can stand in for a judge score when no VLM judge is configured (and is labelled so).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from PIL import Image as PILImage
from scipy import ndimage
from skimage.metrics import structural_similarity

PSNR_CAP_DB = 100.0          # identical pixels: PSNR is infinite; JSON needs a number
PSNR_FLOOR_DB, PSNR_GOOD_DB = 15.0, 40.0  # ~unrelated images .. visually identical
CLIPSCORE_W = 2.5            # CLIPScore (Hessel et al., 2021): 2.5 * max(cos, 0)
SSIM_WIN = 7


# --- geometry ----------------------------------------------------------------------
def clamp_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer box inside the image, at least 1x1 pixel."""
    x0 = int(np.clip(math.floor(box[0]), 0, width - 1))
    y0 = int(np.clip(math.floor(box[1]), 0, height - 1))
    x1 = int(np.clip(math.ceil(box[2]), x0 + 1, width))
    y1 = int(np.clip(math.ceil(box[3]), y0 + 1, height))
    return x0, y0, x1, y1


def crop(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    x0, y0, x1, y1 = clamp_box(box, image.shape[1], image.shape[0])
    return image[y0:y1, x0:x1]


def expand_box(box: Sequence[float], factor: float, width: int, height: int) -> list[float]:
    """The box grown by ``factor`` of its size on every side, clipped to the image."""
    w, h = box[2] - box[0], box[3] - box[1]
    return [max(0.0, box[0] - factor * w), max(0.0, box[1] - factor * h),
            min(float(width), box[2] + factor * w), min(float(height), box[3] + factor * h)]


def box_mask(shape: tuple[int, ...], box: Sequence[float]) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    x0, y0, x1, y1 = clamp_box(box, shape[1], shape[0])
    mask[y0:y1, x0:x1] = True
    return mask


def resize_to(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.asarray(PILImage.fromarray(image).resize((width, height), PILImage.BICUBIC))


def jitter_boxes(box: Sequence[float], tolerance: float, width: int, height: int) -> list[list[float]]:
    """The box plus shifted (±tolerance of its size) and rescaled (1±tolerance) copies:
    the search window for "the subject is at (about) this box"."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    out = [[x0, y0, x1, y1]]
    if tolerance <= 0:
        return out
    for s in (1.0 - tolerance, 1.0, 1.0 + tolerance):
        for dx in (-tolerance, 0.0, tolerance):
            for dy in (-tolerance, 0.0, tolerance):
                if s == 1.0 and dx == 0.0 and dy == 0.0:
                    continue
                nx, ny, nw, nh = cx + dx * w, cy + dy * h, w * s, h * s
                b = [max(0.0, nx - nw / 2), max(0.0, ny - nh / 2),
                     min(float(width), nx + nw / 2), min(float(height), ny + nh / 2)]
                if b[2] - b[0] >= 2 and b[3] - b[1] >= 2:
                    out.append(b)
    return out


# --- embedding similarities ---------------------------------------------------------
def identity_similarity(embedder: Any, output: np.ndarray, reference: np.ndarray,
                        box: Sequence[float], tolerance: float = 0.25) -> tuple[float, list[float]]:
    """Best cosine similarity between the reference subject and the output's region at
    ``box`` (searched over small shifts/rescales, so a subject placed a little off the
    ground-truth box still counts). Returns (similarity, the window that gave it)."""
    boxes = jitter_boxes(box, tolerance, output.shape[1], output.shape[0])
    vecs = np.asarray(embedder.embed([reference] + [crop(output, b) for b in boxes]), dtype=np.float64)
    sims = vecs[1:] @ vecs[0]
    best = int(np.argmax(sims))
    return float(sims[best]), [round(v, 2) for v in boxes[best]]


def image_similarity(embedder: Any, a: np.ndarray, b: np.ndarray) -> float:
    vecs = np.asarray(embedder.embed([a, b]), dtype=np.float64)
    return float(vecs[0] @ vecs[1])


def region_fit_similarity(embedder: Any, output: np.ndarray, target: np.ndarray,
                          box: Sequence[float], context: float = 0.5) -> float:
    """How well the edited region and its surroundings match the ground truth there:
    the box grown by ``context`` of its size, output vs target ("fits the scene")."""
    grown = expand_box(box, context, target.shape[1], target.shape[0])
    return image_similarity(embedder, crop(output, grown), crop(target, grown))


def text_image_score(embedder: Any, images: Sequence[np.ndarray], texts: Sequence[str]) -> list[float] | None:
    """CLIPScore-style prompt adherence, 0..1 (None when the embedder has no text tower)."""
    if not hasattr(embedder, "embed_text") or not images:
        return None
    iv = np.asarray(embedder.embed(list(images)), dtype=np.float64)
    tv = np.asarray(embedder.embed_text(list(texts)), dtype=np.float64)
    cos = np.sum(iv * tv, axis=1)
    return [float(min(1.0, CLIPSCORE_W * max(c, 0.0))) for c in cos]


# --- pixel metrics outside the edit region ------------------------------------------
def masked_psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float | None:
    """PSNR over the pixels where ``keep`` is True (capped at PSNR_CAP_DB for identical)."""
    if not keep.any():
        return None
    diff = a.astype(np.float64)[keep] - b.astype(np.float64)[keep]
    mse = float(np.mean(diff ** 2))
    if mse == 0:
        return PSNR_CAP_DB
    return float(min(PSNR_CAP_DB, 10.0 * math.log10(255.0 ** 2 / mse)))


def masked_ssim(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float | None:
    """Mean SSIM over ``keep`` pixels whose whole SSIM window lies inside ``keep``,
    so the edited region does not leak into the background score."""
    if min(a.shape[:2]) < SSIM_WIN:
        return None
    _, smap = structural_similarity(a, b, channel_axis=-1, win_size=SSIM_WIN, full=True,
                                    data_range=255)
    smap = smap.mean(axis=-1) if smap.ndim == 3 else smap
    inner = ndimage.binary_erosion(keep, structure=np.ones((3, 3), bool), iterations=SSIM_WIN // 2,
                                   border_value=1)
    if not inner.any():
        inner = keep
    if not inner.any():
        return None
    return float(np.mean(smap[inner]))


def background_consistency(output: np.ndarray, source: np.ndarray, edit_mask: np.ndarray) -> dict[str, Any]:
    """Output vs the input image outside the edit region: PSNR, SSIM and their 0-10 score."""
    keep = ~edit_mask
    psnr, ssim = masked_psnr(output, source, keep), masked_ssim(output, source, keep)
    return {"psnr": psnr, "ssim": ssim, "score10": background_score10(psnr, ssim),
            "outside_pixels": int(keep.sum())}


# --- mapping to the 0-10 scale -----------------------------------------------------
def similarity_score10(sim: float | None, chance: float) -> float | None:
    """Linear map of a cosine similarity: ``chance`` (what unrelated content gets with
    this embedder, measured on the bench itself) -> 0, identical (1.0) -> 10."""
    if sim is None:
        return None
    chance = min(chance, 0.99)
    return float(10.0 * np.clip((sim - chance) / (1.0 - chance), 0.0, 1.0))


def background_score10(psnr: float | None, ssim: float | None) -> float | None:
    """Mean of PSNR mapped 15 dB -> 0 .. 40 dB -> 1 and SSIM clipped to 0..1, times 10."""
    if psnr is None or ssim is None:
        return None
    p = np.clip((psnr - PSNR_FLOOR_DB) / (PSNR_GOOD_DB - PSNR_FLOOR_DB), 0.0, 1.0)
    return float(10.0 * (p + np.clip(ssim, 0.0, 1.0)) / 2.0)


def overall(pf: float | None, sc: float | None) -> float | None:
    """The paper's case score: sqrt(PF * SC) on the 0-10 scale (None if either is unscored)."""
    if pf is None or sc is None:
        return None
    return float(math.sqrt(max(pf, 0.0) * max(sc, 0.0)))

"""Classical in/outpainting: cv2.inpaint (Telea) for thin regions, a coarse-to-fine
smooth fill for large ones, plus seeded low-amplitude texture so that a flat fill
does not give the generated images an obvious tell and the seed matters.

Pixels outside the mask are returned unchanged, bit for bit.
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from opensubject_tasks.backends.base import Image, Mask
from opensubject_tasks.backends.registry import register


class ClassicalInpainter:
    name = "classical"
    family = "classical"   # synthesis_prompts.yaml: prompts are ignored, no objects are painted

    def __init__(self, radius: int = 5, coarse_depth: float = 6.0, band_px: int = 12,
                 texture_amplitude: float = 6.0, texture_scale: float = 3.0) -> None:
        self.radius = radius                          # Telea neighbourhood
        self.coarse_depth = coarse_depth              # hole depth (px) at which the coarse fill runs
        self.band_px = band_px                        # width of the fine fill next to known pixels
        self.texture_amplitude = texture_amplitude    # max std of the added texture (grey levels)
        self.texture_scale = texture_scale            # texture grain in pixels

    def inpaint(self, images: Sequence[Image], masks: Sequence[Mask], prompts: Sequence[str],
                seeds: Sequence[int], negative_prompts: Sequence[str] | None = None) -> list[Image]:
        return [self._one(img, m, int(s)) for img, m, s in zip(images, masks, seeds, strict=True)]

    def _one(self, image: Image, mask: Mask, seed: int) -> Image:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        mask = np.asarray(mask, bool)
        if not mask.any():
            return image.copy()
        if mask.all():  # nothing known: a seeded mid-grey texture is all that can honestly be made
            base = np.full(image.shape, 127.0, np.float32)
            return _texture(base, mask, np.random.default_rng(seed), self.texture_amplitude,
                            self.texture_scale, np.ones(mask.shape, np.float32))
        m8 = mask.astype(np.uint8)
        depth = cv2.distanceTransform(m8, cv2.DIST_L2, 3)
        if depth.max() <= self.coarse_depth:
            filled = cv2.inpaint(image, m8, self.radius, cv2.INPAINT_TELEA).astype(np.float32)
            weight = np.zeros(mask.shape, np.float32)
        else:
            coarse = self._coarse_fill(image, mask, depth)
            # Telea over a band next to the known pixels, seeded with the coarse fill
            # inside, joins the true surroundings smoothly to the coarse colours.
            seeded = image.copy()
            seeded[mask] = np.clip(coarse[mask], 0, 255).astype(np.uint8)
            band = (mask & (depth <= self.band_px)).astype(np.uint8)
            fine = cv2.inpaint(seeded, band, self.radius, cv2.INPAINT_TELEA).astype(np.float32)
            weight = np.clip(depth / self.band_px - 0.5, 0.0, 1.0)[..., None]
            filled = fine * (1 - weight) + coarse * weight
            weight = weight[..., 0]
        # texture fades in away from the known pixels so seams stay clean
        texture_weight = np.clip(depth / max(self.band_px, 1), 0.0, 1.0) * mask
        out = _texture(filled, mask, np.random.default_rng(seed), self._amplitude(image, mask),
                       self.texture_scale, texture_weight)
        out[~mask] = image[~mask]
        return out

    def _coarse_fill(self, image: Image, mask: Mask, depth: np.ndarray) -> np.ndarray:
        """Telea at a resolution where the hole is only a few pixels deep, upsampled and
        smoothed: a large region gets a smooth continuation of its surroundings."""
        h, w = mask.shape
        scale = max(self.coarse_depth / float(depth.max()), 8.0 / max(h, w))
        sw, sh = max(2, round(w * scale)), max(2, round(h * scale))
        small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        # a small pixel counts as known only if its whole footprint was known
        small_mask = cv2.resize(mask.astype(np.float32), (sw, sh), interpolation=cv2.INTER_AREA) > 0.01
        if small_mask.all():
            small_mask[:] = False
            small[:] = np.median(image[~mask], axis=0)
        small_fill = cv2.inpaint(small, small_mask.astype(np.uint8), 2, cv2.INPAINT_TELEA)
        up = cv2.resize(small_fill, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        k = max(3, int(2 / scale) | 1)
        return cv2.GaussianBlur(up, (k, k), 0)

    def _amplitude(self, image: Image, mask: Mask) -> float:
        """Match the texture strength to the known image's fine detail, capped low."""
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        detail = np.abs(grey - cv2.GaussianBlur(grey, (0, 0), self.texture_scale))
        known = detail[~mask]
        level = float(np.median(known)) * 1.25 if known.size else self.texture_amplitude
        return float(min(self.texture_amplitude, max(1.0, level)))


def _texture(base: np.ndarray, mask: Mask, rng: np.random.Generator, amplitude: float,
             grain: float, weight: np.ndarray) -> np.ndarray:
    """Add band-limited seeded noise (same pattern on all channels, slight colour jitter)."""
    h, w = mask.shape
    noise = rng.standard_normal((h, w)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), grain)
    noise /= float(noise.std()) + 1e-6
    tint = 1.0 + 0.15 * rng.standard_normal(3).astype(np.float32)
    out = base + (amplitude * noise * weight)[..., None] * tint
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@register("inpainter", "classical")
def make_classical_inpainter(device: str = "cpu", dtype: str = "auto", batch_size: int = 1,
                             **options: Any) -> ClassicalInpainter:
    return ClassicalInpainter(**options)

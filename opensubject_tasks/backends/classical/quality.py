"""Classical clip quality: sharpness, exposure, contrast and motion from a few frames.

Each metric is mapped to 0..1 (1 = good) and the score is their weighted
geometric mean, so one failed metric (a black, flat or badly blurred clip) sinks
the score however good the others are. All are measured at one working width so
that the numbers do not depend on the source resolution.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from opensubject_tasks.backends.base import Image, QualityScore
from opensubject_tasks.backends.registry import register

WORK_WIDTH = 384
WEIGHTS = {"sharpness": 0.35, "exposure": 0.25, "contrast": 0.25, "motion": 0.15}


def _gray(img: Image) -> np.ndarray:
    h, w = img.shape[:2]
    g = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    if w != WORK_WIDTH:
        g = cv2.resize(g, (WORK_WIDTH, max(1, round(h * WORK_WIDTH / w))), interpolation=cv2.INTER_AREA)
    return g


_LEVELS = np.arange(256, dtype=np.float64)


def _histogram(gray: np.ndarray) -> np.ndarray:
    """Share of pixels at each grey level."""
    hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(np.float64)
    return hist / max(hist.sum(), 1.0)


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian on a log scale: <= 10 (badly blurred or flat) -> 0,
    100 -> 0.5, >= 1000 (crisp) -> 1."""
    _, std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_32F))
    var = float(std[0, 0]) ** 2
    return min(1.0, max(0.0, (math.log10(var + 1.0) - 1.0) / 2.0))


def exposure(gray: np.ndarray) -> float:
    """Mean brightness near mid-grey and few clipped pixels."""
    hist = _histogram(gray)
    mean = float(hist @ _LEVELS) / 255.0
    clipped = float(hist[:5].sum() + hist[251:].sum())
    return max(0.0, 1.0 - 2.0 * abs(mean - 0.5)) ** 0.5 * (1.0 - clipped)


def contrast(gray: np.ndarray) -> float:
    """Standard deviation of brightness; 64 grey levels or more counts as full contrast."""
    _, std = cv2.meanStdDev(gray)
    return min(1.0, float(std[0, 0]) / 64.0)


def motion(grays: Sequence[np.ndarray]) -> tuple[float, float]:
    """(raw mean change between consecutive frames in 0..1, its 0..1 score). A still
    clip scores 0.5 (usable, but little pose variety); chaotic change scores low."""
    if len(grays) < 2:
        return 0.0, 0.5
    small = [cv2.resize(g, (96, max(1, round(g.shape[0] * 96 / g.shape[1]))), interpolation=cv2.INTER_AREA)
             .astype(np.float32) for g in grays]
    raw = float(np.mean([np.abs(a - b).mean() for a, b in zip(small, small[1:], strict=False)])) / 255.0
    if raw < 0.01:
        return raw, 0.5 + 50.0 * raw  # 0.5 .. 1.0
    if raw <= 0.2:
        return raw, 1.0
    return raw, max(0.0, 1.0 - (raw - 0.2) / 0.2)


class ClassicalQuality:
    name = "classical-quality"

    def score(self, clips: Sequence[Sequence[Image]]) -> list[QualityScore]:
        out = []
        for frames in clips:
            if not len(frames):
                out.append(QualityScore(0.0, {"frames": 0.0}))
                continue
            grays = [_gray(f) for f in frames]
            m = {
                "sharpness": float(np.mean([sharpness(g) for g in grays])),
                "exposure": float(np.mean([exposure(g) for g in grays])),
                "contrast": float(np.mean([contrast(g) for g in grays])),
            }
            m["motion_raw"], m["motion"] = motion(grays)
            score = math.exp(sum(w * math.log(max(m[k], 0.01)) for k, w in WEIGHTS.items()))
            out.append(QualityScore(round(float(score), 4), {k: round(v, 4) for k, v in m.items()}))
        return out


@register("quality", "classical")
def make_classical_quality(**_options: object) -> ClassicalQuality:
    return ClassicalQuality()

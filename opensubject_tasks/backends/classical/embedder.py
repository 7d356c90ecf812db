"""Identity embedding without weights: colour, texture and keypoint statistics.

Three blocks, each L2-normalised and weighted, then the whole vector L2-normalised:
* colour (0.6): centre-weighted HSV histogram (hue x saturation, plus value);
* texture (0.2): uniform LBP histogram and a 2x2-cell gradient orientation histogram;
* keypoints (0.2): how often each ORB descriptor bit is set over the crop's keypoints.
Histograms are square-rooted (Hellinger) and centred on the flat histogram, bit
frequencies centred on 0.5, so unrelated crops share less of a common part. Histograms
and bit statistics ignore where things are, so the vector tolerates the pose, scale and
flip changes that separate a reference frame from a target frame. Cosine similarity on
the sample media: same subject >= 0.80, other categories median 0.75 (docs/mining.md).
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np
from skimage.feature import local_binary_pattern

from opensubject_tasks.backends.base import Image
from opensubject_tasks.backends.registry import register

_SIDE = 96  # crops are resized to this before the statistics are taken


class ClassicalEmbedder:
    name = "classical"

    def __init__(self, colour_weight: float = 0.6, texture_weight: float = 0.2,
                 keypoint_weight: float = 0.2) -> None:
        self.weights = (colour_weight, texture_weight, keypoint_weight)
        self._orb = cv2.ORB_create(nfeatures=200, edgeThreshold=8, patchSize=15)
        self.dim = 16 * 4 + 8 + 10 + 4 * 9 + 256

    def embed(self, images: Sequence[Image]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._one(img) for img in images]).astype(np.float32)

    def _one(self, image: Image) -> np.ndarray:
        img = np.ascontiguousarray(image, dtype=np.uint8)
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        if img.shape[0] < 1 or img.shape[1] < 1:
            return np.zeros(self.dim, np.float32)
        img = cv2.resize(img, (_SIDE, _SIDE), interpolation=cv2.INTER_AREA if min(img.shape[:2]) > _SIDE
                         else cv2.INTER_LINEAR)
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        # histograms are centred on the flat (uninformative) histogram, so that
        # unrelated crops score near zero instead of sharing a large common part
        blocks = [_centre(self._colour(img)), _centre(self._texture(grey)), self._keypoints(grey)]
        vec = np.concatenate([w * _unit(b) for w, b in zip(self.weights, blocks, strict=True)])
        return _unit(vec)

    @staticmethod
    def _colour(img: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        yy, xx = np.mgrid[0:_SIDE, 0:_SIDE].astype(np.float32)
        c = (_SIDE - 1) / 2
        # boxes hold some background at their edges: weight the centre more
        weight = np.exp(-(((xx - c) ** 2 + (yy - c) ** 2) / (2 * (0.35 * _SIDE) ** 2))).astype(np.float32)
        h_bin = np.minimum(hsv[..., 0].astype(int) * 16 // 180, 15)
        s_bin = np.minimum(hsv[..., 1].astype(int) * 4 // 256, 3)
        v_bin = np.minimum(hsv[..., 2].astype(int) * 8 // 256, 7)
        hs = np.bincount((h_bin * 4 + s_bin).ravel(), weight.ravel(), 64)
        v = np.bincount(v_bin.ravel(), weight.ravel(), 8)
        return np.sqrt(np.concatenate([hs / hs.sum(), 0.5 * v / v.sum()]))

    @staticmethod
    def _texture(grey: np.ndarray) -> np.ndarray:
        lbp = local_binary_pattern(grey, 8, 1, method="uniform")
        lbp_hist = np.bincount(lbp.astype(int).ravel(), minlength=10)[:10].astype(np.float64)
        g = grey.astype(np.float32)
        gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)
        mag, ang = cv2.cartToPolar(gx, gy)
        ori = np.minimum((ang % np.pi) / np.pi * 9, 8).astype(int)  # unsigned orientation
        half = _SIDE // 2
        cells = []
        for y in (0, half):
            for x in (0, half):
                o, m = ori[y:y + half, x:x + half].ravel(), mag[y:y + half, x:x + half].ravel()
                cells.append(np.bincount(o, m, 9))
        grad = np.concatenate(cells)
        return np.sqrt(np.concatenate([lbp_hist / max(lbp_hist.sum(), 1), grad / max(grad.sum(), 1e-6)]))

    def _keypoints(self, grey: np.ndarray) -> np.ndarray:
        _, des = self._orb.detectAndCompute(grey, None)
        if des is None or len(des) == 0:
            return np.zeros(256)
        bits = np.unpackbits(des, axis=1).astype(np.float64)
        return bits.mean(axis=0) - 0.5


def _centre(v: np.ndarray) -> np.ndarray:
    flat = np.full_like(v, np.linalg.norm(v) / np.sqrt(len(v)))
    return v - flat


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return (v / n if n > 0 else v).astype(np.float32)


@register("embedder", "classical")
def make_classical_embedder(device: str = "cpu", dtype: str = "auto", batch_size: int = 1,
                            **options: Any) -> ClassicalEmbedder:
    return ClassicalEmbedder(**options)

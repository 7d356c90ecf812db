"""Class-agnostic subject proposals without downloaded weights.

A subject is what moves against the scene. For each keyframe of a clip:
1. the camera's motion to every other keyframe is estimated (ORB feature homography
   with RANSAC, ECC affine as the fallback), so pans and zooms are compensated;
2. every other keyframe is warped onto it and compared with a 1-pixel registration
   tolerance; a pixel is "moving" when it differs from most of the other keyframes
   (a low quantile of the differences, so the subject's former places, which differ
   in only one frame each, do not count);
3. the moving pixels, above a threshold set from the frame's own noise level, are
   cleaned up and grouped into connected regions; each region's score fuses its motion
   strength with its spectral-residual saliency contrast (cv2.saliency);
4. regions are linked across keyframes into tracks by colour similarity and by
   overlap after camera-motion compensation (Detection.track).

It cannot name what it finds: every detection is labelled ``object``. Categories come
from a VLM; the mining stage attaches them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from opensubject_tasks.backends.base import Detection, Image
from opensubject_tasks.backends.registry import register

GENERIC = "object"


@dataclass
class _Frame:
    rgb: np.ndarray        # working-size RGB, uint8, lightly blurred
    grey: np.ndarray       # working-size uint8
    sx: float              # full-size pixels per working pixel
    sy: float
    kps: Any
    des: np.ndarray | None
    saliency: np.ndarray   # working-size float32 in [0, 1]


class MotionSaliencyDetector:
    name = "classical"

    def __init__(self, work_side: int = 320, min_area: float = 0.002, threshold: float = 20.0,
                 noise_k: float = 6.0, quantile: float = 0.3, saliency_weight: float = 0.3,
                 min_score: float = 0.3, link_min: float = 0.45, max_gap: int = 2,
                 max_proposals: int = 8) -> None:
        self.work_side = work_side            # frames are analysed at this longest side
        self.min_area = min_area              # smallest region, as a share of the frame
        self.threshold = threshold            # smallest colour difference (0-255) that counts as motion
        self.noise_k = noise_k                # ...or this many robust std devs above the frame's noise
        self.quantile = quantile              # which of the sorted per-frame differences decides
        self.saliency_weight = saliency_weight
        self.min_score = min_score
        self.link_min = link_min              # smallest affinity that links two boxes
        self.max_gap = max_gap                # keyframes a track may skip
        self.max_proposals = max_proposals    # per keyframe
        self._features = cv2.SIFT_create(nfeatures=3000, contrastThreshold=0.02)
        self._saliency = cv2.saliency.StaticSaliencySpectralResidual_create()

    # -- public -------------------------------------------------------------------------
    def detect(self, frames: Sequence[Image], categories: Sequence[str]) -> list[list[Detection]]:
        if len(frames) == 0:
            return []
        fs = [self._prepare(f) for f in frames]
        n = len(fs)
        homog = self._register_all(fs)
        plain = [self._differences(fs, homog, i) for i in range(n)]
        first = [self._regions(fs[i], *self._motion(plain[i], shape=fs[i].grey.shape)) for i in range(n)]
        # Second pass: compare a keyframe with another one only where that one shows the
        # scene, not a subject found by the first pass. A slow subject then no longer
        # hides itself (it overlaps its own other views) nor leaves negative ghosts.
        seen = [self._subject_mask(fs[j], regions) for j, regions in enumerate(first)]
        second = [self._regions(fs[i], *self._motion(self._differences(fs, homog, i, seen), plain[i],
                                                     fs[i].grey.shape)) for i in range(n)]
        per_frame = [[(box, score) for box, score, _ in regions] for regions in second]
        tracks = self._link(fs, homog, per_frame)
        out: list[list[Detection]] = []
        for i, regions in enumerate(per_frame):
            dets = []
            for k, (box, score) in enumerate(regions):
                f = fs[i]
                full = [box[0] * f.sx, box[1] * f.sy, box[2] * f.sx, box[3] * f.sy]
                dets.append(Detection(box=[round(v, 2) for v in full], score=round(score, 4),
                                      category=GENERIC, track=tracks[i][k]))
            out.append(dets)
        return out

    # -- steps ----------------------------------------------------------------------------
    def _prepare(self, frame: Image) -> _Frame:
        h, w = frame.shape[:2]
        scale = min(1.0, self.work_side / max(h, w))
        sw, sh = max(8, round(w * scale)), max(8, round(h * scale))
        small = cv2.resize(np.ascontiguousarray(frame), (sw, sh), interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        kps, des = self._features.compute(grey, _spread(self._features.detect(grey, None), sw, sh))
        ok, sal = self._saliency.computeSaliency(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        sal = sal.astype(np.float32) if ok else np.zeros((sh, sw), np.float32)
        sal = cv2.GaussianBlur(sal, (0, 0), 2)
        sal /= float(sal.max()) + 1e-6
        rgb = cv2.GaussianBlur(small, (0, 0), 1.0)
        return _Frame(rgb, grey, w / sw, h / sh, kps, des, sal)

    def _register_all(self, fs: list[_Frame]) -> dict[tuple[int, int], np.ndarray]:
        """Camera motion between every two keyframes: homog[(i, j)] maps frame j to frame i.
        Neighbours are registered directly; distant pairs by chaining neighbours, then
        refined on the feature matches that agree with the chain (same motion layer)."""
        n = len(fs)
        homog: dict[tuple[int, int], np.ndarray] = {}
        for i in range(n - 1):
            h = self._register(fs[i], fs[i + 1])
            if h is not None:
                homog[(i, i + 1)] = h
        for gap in range(2, n):
            for i in range(n - gap):
                j = i + gap
                chain = homog.get((i, j - 1)), homog.get((j - 1, j))
                prior = chain[0] @ chain[1] if chain[0] is not None and chain[1] is not None else None
                h = self._register(fs[i], fs[j], prior)
                if h is not None:
                    homog[(i, j)] = h
        for (i, j), h in list(homog.items()):
            homog[(j, i)] = np.linalg.inv(h)
        return homog

    def _register(self, a: _Frame, b: _Frame, prior: np.ndarray | None = None) -> np.ndarray | None:
        """Homography taking frame b's pixels to frame a's, or None when none is found.

        Motion layers are fitted one after another by RANSAC, each on the matches the
        previous ones left, on strict and on loose feature matches (a loose ratio test
        recovers a scene that repetitive texture or a large shift starves of strict
        matches). Without a prior, the camera's layer is the one whose inliers spread
        over the largest part of the frame: a subject is compact, the scene is
        everywhere. With a prior (a chained estimate) only the matches that agree with
        it are used, so the estimate stays on the scene's layer."""
        sh, sw = a.grey.shape
        best, best_spread = None, 0.0
        if a.des is not None and b.des is not None and len(a.des) >= 8 and len(b.des) >= 8:
            pairs = [p for p in cv2.BFMatcher(cv2.NORM_L2).knnMatch(b.des, a.des, k=2) if len(p) == 2]
            for ratio in (0.8, 0.95):
                good = [m for m, n2 in pairs if m.distance < ratio * n2.distance]
                src = np.float32([b.kps[m.queryIdx].pt for m in good]).reshape(-1, 2)
                dst = np.float32([a.kps[m.trainIdx].pt for m in good]).reshape(-1, 2)
                if prior is not None and len(src):
                    pred = cv2.perspectiveTransform(src[None], prior)[0]
                    near = np.linalg.norm(pred - dst, axis=1) < 0.03 * np.hypot(sw, sh)
                    src, dst = src[near], dst[near]
                for hmat, inliers in _layers(src, dst, max_layers=1 if prior is not None else 3):
                    hull = cv2.convexHull(dst[inliers].reshape(-1, 1, 2))
                    spread = cv2.contourArea(hull) / float(sw * sh)
                    if spread > best_spread:
                        best, best_spread = hmat, spread
        if best is not None and best_spread >= 0.02:
            return best
        return prior if prior is not None else self._register_ecc(a, b)

    @staticmethod
    def _register_ecc(a: _Frame, b: _Frame) -> np.ndarray | None:
        warp = np.eye(2, 3, dtype=np.float32)
        try:
            _, warp = cv2.findTransformECC(a.grey, b.grey, warp, cv2.MOTION_AFFINE,
                                           (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 60, 1e-4),
                                           None, 5)
        except cv2.error:
            return None
        # ECC's warp maps a's pixels into b; invert it to map b into a
        hmat = np.linalg.inv(np.vstack([warp, [0, 0, 1]]).astype(np.float64))
        return hmat if _sane(hmat) else None

    @staticmethod
    def _subject_mask(f: _Frame, regions: list[tuple[list[float], float, np.ndarray]]) -> np.ndarray:
        mask = np.zeros(f.grey.shape, np.uint8)
        for _, _, region in regions:
            mask |= region.astype(np.uint8)
        k = max(3, int(0.02 * max(mask.shape)) | 1)
        return cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))

    def _differences(self, fs: list[_Frame], homog: dict[tuple[int, int], np.ndarray], i: int,
                     exclude: list[np.ndarray] | None = None) -> np.ndarray | None:
        """Per other keyframe, how much keyframe i differs from it once the camera motion
        is undone: (others, h, w), +inf where the other keyframe does not see the pixel
        (or, with ``exclude``, shows a subject there)."""
        f = fs[i]
        sh, sw = f.grey.shape
        kernel = np.ones((3, 3), np.uint8)
        lo_i, hi_i = cv2.erode(f.rgb, kernel), cv2.dilate(f.rgb, kernel)
        diffs = []
        for j in range(len(fs)):
            if j == i or (i, j) not in homog or fs[j].grey.shape != f.grey.shape:
                continue
            h_ij = homog[(i, j)]
            warped = cv2.warpPerspective(fs[j].rgb, h_ij, (sw, sh), flags=cv2.INTER_LINEAR)
            valid = cv2.warpPerspective(np.ones((sh, sw), np.uint8), h_ij, (sw, sh),
                                        flags=cv2.INTER_NEAREST)
            valid = cv2.erode(valid, np.ones((5, 5), np.uint8)) > 0
            if exclude is not None:
                valid &= cv2.warpPerspective(exclude[j], h_ij, (sw, sh), flags=cv2.INTER_NEAREST) == 0
            lo_j, hi_j = cv2.erode(warped, kernel), cv2.dilate(warped, kernel)
            # differences that a one-pixel misregistration would explain do not count
            # (saturating uint8 subtraction: negative differences become 0)
            d1 = cv2.max(cv2.subtract(f.rgb, hi_j), cv2.subtract(lo_j, f.rgb))
            d2 = cv2.max(cv2.subtract(warped, hi_i), cv2.subtract(lo_i, warped))
            d = np.minimum(_channel_max(d1), _channel_max(d2)).astype(np.float32)
            d[~valid] = np.inf
            diffs.append(d)
        return np.sort(np.stack(diffs), axis=0) if diffs else None

    def _motion(self, stack: np.ndarray | None, fallback: np.ndarray | None = None,
                shape: tuple[int, int] = (1, 1)) -> tuple[np.ndarray, float]:
        """Motion map (a low quantile of the sorted differences) and its threshold.
        Pixels ``stack`` has no comparison for take their value from ``fallback`` where
        that one compared the pixel with at least three keyframes (with fewer, a
        subject's former places would show up as motion)."""
        if stack is None:
            stack, fallback = fallback, None
        if stack is None:
            return np.zeros(shape, np.float32), float("inf")
        motion, n_valid = self._quantile(stack)
        if fallback is not None:
            motion2, n_valid2 = self._quantile(fallback)
            use = (n_valid == 0) & (n_valid2 >= 3)
            motion = np.where(use, motion2, motion)
            n_valid = np.where(use, n_valid2, n_valid)
        seen = motion[n_valid > 0]
        if seen.size == 0:
            return motion, float("inf")
        med = float(np.median(seen))
        mad = float(np.median(np.abs(seen - med))) * 1.4826
        return motion, max(self.threshold, med + self.noise_k * mad)

    def _quantile(self, stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_valid = np.isfinite(stack).sum(axis=0)
        k = np.floor(self.quantile * np.maximum(n_valid - 1, 0)).astype(int)
        motion = np.take_along_axis(stack, k[None], axis=0)[0]
        motion[n_valid == 0] = 0
        return motion.astype(np.float32), n_valid

    def _regions(self, f: _Frame, motion: np.ndarray, thr: float
                 ) -> list[tuple[list[float], float, np.ndarray]]:
        if not np.isfinite(thr):
            return []
        sh, sw = motion.shape
        # hysteresis: regions of weak motion, kept when they hold enough strong motion
        strong = motion > thr
        binary = (motion > 0.5 * thr).astype(np.uint8)
        k = max(5, int(0.03 * max(sh, sw)) | 1)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        binary = ndimage.binary_fill_holes(binary).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        out = []
        min_px = self.min_area * sh * sw
        sal_total = float(f.saliency.sum())
        for c in range(1, count):
            x, y, w, h, area = stats[c]
            if area < min_px:
                continue
            region = labels == c
            if strong[region].sum() < 0.25 * min_px:
                continue
            strength = float(np.clip(motion[region].mean() / (3 * thr), 0, 1))
            sal_in = float(f.saliency[region].mean())
            sal_out = (sal_total - float(f.saliency[region].sum())) / max(region.size - area, 1)
            contrast = sal_in / (sal_in + sal_out + 1e-6)
            score = (1 - self.saliency_weight) * (0.5 + 0.5 * strength) + self.saliency_weight * contrast
            if score >= self.min_score:
                out.append(([float(x), float(y), float(x + w), float(y + h)], score, region))
        out.sort(key=lambda r: -r[1])
        return out[: self.max_proposals]

    def _link(self, fs: list[_Frame], homog: dict[tuple[int, int], np.ndarray],
              per_frame: list[list[tuple[list[float], float]]]) -> list[list[int]]:
        """Give each region a track id; a track continues when colour and compensated
        position agree (Hungarian assignment per keyframe)."""
        hists = [[_hist(fs[i].rgb, box) for box, _ in regions] for i, regions in enumerate(per_frame)]
        ids: list[list[int]] = []
        tracks: list[tuple[int, int, list[float], np.ndarray]] = []  # (id, frame, box, hist)
        next_id = 0
        for i, regions in enumerate(per_frame):
            live = [t for t in tracks if i - t[1] <= self.max_gap + 1]
            aff = np.zeros((len(regions), len(live)))
            for a, (box, _) in enumerate(regions):
                for b, (_, j, tbox, thist) in enumerate(live):
                    app = 1.0 - cv2.compareHist(hists[i][a], thist, cv2.HISTCMP_BHATTACHARYYA)
                    moved = _warp_box(tbox, homog.get((i, j)))
                    geo = _iou(box, moved) if moved is not None else 0.0
                    aff[a, b] = 0.65 * app + 0.35 * geo if app >= 0.5 else 0.0
            assigned = [-1] * len(regions)
            if aff.size:
                rows, cols = linear_sum_assignment(-aff)
                for a, b in zip(rows, cols, strict=True):
                    if aff[a, b] >= self.link_min:
                        assigned[a] = live[b][0]
            frame_ids = []
            for a, (box, _) in enumerate(regions):
                tid = assigned[a]
                if tid < 0:
                    tid, next_id = next_id, next_id + 1
                tracks = [t for t in tracks if t[0] != tid] + [(tid, i, box, hists[i][a])]
                frame_ids.append(tid)
            ids.append(frame_ids)
        return ids


def _channel_max(a: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def _layers(src: np.ndarray, dst: np.ndarray, max_layers: int = 3, min_inliers: int = 12
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Homographies fitted one after another, each on the matches the others left:
    [(H, indices of its inliers)]."""
    out = []
    idx = np.arange(len(src))
    for _ in range(max_layers):
        if len(idx) < min_inliers:
            break
        hmat, inl = cv2.findHomography(src[idx], dst[idx], cv2.USAC_MAGSAC, 2.5)
        if hmat is None or inl is None or int(inl.sum()) < min_inliers:
            break
        inl = inl.ravel().astype(bool)
        if _sane(hmat):
            out.append((hmat, idx[inl]))
        idx = idx[~inl]
    return out


def _spread(kps: Sequence[Any], w: int, h: int, grid: tuple[int, int] = (8, 6), per_cell: int = 25
            ) -> list[Any]:
    """Keep the strongest keypoints of each grid cell: a textured subject must not
    outvote the scene around it when the camera motion is estimated."""
    cells: dict[tuple[int, int], list[Any]] = {}
    for kp in kps:
        key = (min(int(kp.pt[0] * grid[0] / w), grid[0] - 1), min(int(kp.pt[1] * grid[1] / h), grid[1] - 1))
        cells.setdefault(key, []).append(kp)
    out = []
    for key in sorted(cells):
        out.extend(sorted(cells[key], key=lambda k: -k.response)[:per_cell])
    return out


def _sane(h: np.ndarray) -> bool:
    """Reject homographies no camera produces between keyframes of one shot."""
    if not np.all(np.isfinite(h)) or abs(h[2, 2]) < 1e-9:
        return False
    h = h / h[2, 2]
    det = float(np.linalg.det(h[:2, :2]))
    return 0.2 < det < 5.0 and abs(h[2, 0]) < 2e-3 and abs(h[2, 1]) < 2e-3


def _hist(rgb: np.ndarray, box: list[float]) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    crop = np.clip(rgb[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)], 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [18, 4], [0, 180, 0, 256])
    return cv2.normalize(hist, None).astype(np.float32)


def _warp_box(box: list[float], h: np.ndarray | None) -> list[float] | None:
    if h is None:
        return None
    pts = np.float32([[box[0], box[1]], [box[2], box[1]], [box[0], box[3]], [box[2], box[3]]])
    p = cv2.perspectiveTransform(pts[None], h)[0]
    return [float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())]


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@register("detector", "classical")
def make_motion_saliency_detector(device: str = "cpu", dtype: str = "auto", batch_size: int = 1,
                                  **options: Any) -> MotionSaliencyDetector:
    return MotionSaliencyDetector(**options)

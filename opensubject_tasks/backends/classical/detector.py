"""Class-agnostic subject proposals without downloaded weights.

A subject is what moves against the scene. For the keyframes of one clip:
1. Camera motion (pan, zoom, shake) between keyframes: SIFT matches, several motion
   layers fitted one after another (RANSAC/MAGSAC); the camera's layer is the one
   whose matches spread over the frame (a subject is compact). Where only a compact
   layer is found (a textured subject on a plain scene), an ECC fit that ignores it is
   preferred unless the layer explains the rest of the frame clearly better.
   Distant keyframes are registered by chaining neighbours and refining.
2. Every other keyframe is warped onto a keyframe, its exposure matched, and compared
   with a one-pixel registration tolerance. A pixel moves when it differs from most
   other keyframes (a low quantile of the differences), above a threshold set from
   the frame's own noise level.
3. A second pass compares a keyframe only with keyframes that show the scene (not a
   first-pass subject) at that pixel, so a slow subject does not hide against its own
   other views and its former places leave no ghosts; where no such keyframe exists,
   GrabCut seeded by the certain pixels decides by colour.
4. Moving regions become boxes; regions of two subjects touching through a narrow
   neck are split (watershed on the distance transform). Each box is scored by its
   motion strength fused with its spectral-residual saliency contrast (cv2.saliency).
5. Boxes are linked across keyframes into tracks (``Detection.track``) by colour and
   by overlap after camera-motion compensation.

It cannot name what it finds: every detection is labelled ``object``. Categories come
from a VLM; the mining stage attaches them. Known limits (docs/mining.md): a subject
that never moves against the scene is not found; two subjects overlapping in the image
while moving together come out as one box (the mining stage splits it where both are
seen apart on keyframes before and after); on an almost textureless scene the camera
motion can be mistaken.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from opensubject_tasks.backends.base import Detection, Image
from opensubject_tasks.backends.registry import register
from opensubject_tasks.geometry import iou

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

    def __init__(self, work_side: int = 448, min_area: float = 0.002, threshold: float = 20.0,
                 noise_k: float = 6.0, quantile: float = 0.3, saliency_weight: float = 0.3,
                 min_score: float = 0.3, link_min: float = 0.45, max_gap: int = 2,
                 max_proposals: int = 8, scene_spread: float = 0.15, grabcut_side: int = 200) -> None:
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
        self.scene_spread = scene_spread      # a motion layer spread over less of the frame may be a subject
        self.grabcut_side = grabcut_side      # resolution of the colour refinement
        self._features = cv2.SIFT_create(nfeatures=3000, contrastThreshold=0.02)
        self._saliency = cv2.saliency.StaticSaliencySpectralResidual_create()

    # -- public -------------------------------------------------------------------------
    def detect(self, frames: Sequence[Image], categories: Sequence[str]) -> list[list[Detection]]:
        if len(frames) == 0:
            return []
        fs = [self._prepare(f) for f in frames]
        n = len(fs)
        homog = self._register_all(fs)
        plain = [self._motion(self._differences(fs, homog, i), fs[i].grey.shape) for i in range(n)]
        first = [self._regions(fs[i], m, t, self._candidates(m, t)) for i, (m, _, t) in enumerate(plain)]
        # Second pass: compare a keyframe with another one only where that one shows the
        # scene, not a subject found by the first pass. A slow subject then no longer
        # hides itself (it overlaps its own other views) nor leaves negative ghosts.
        seen = [self._subject_mask(fs[j], regions) for j, regions in enumerate(first)]
        second = []
        for i in range(n):
            m2, n2, t2 = self._motion(self._differences(fs, homog, i, seen), fs[i].grey.shape)
            m1, _, t1 = plain[i]
            binary = self._refine(fs[i], m1, t1, m2, n2, t2)
            score_map = np.where(n2 > 0, m2, m1)
            second.append(self._regions(fs[i], score_map, min(t1, t2), binary))
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
        best, best_spread, best_hull = None, 0.0, None
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
                        best, best_spread, best_hull = hmat, spread, hull
        if prior is not None:
            return best if best is not None and best_spread >= 0.02 else prior
        if best is not None and best_spread >= self.scene_spread:
            return best
        # Only a compact layer (or none): it may well be a textured subject on a plain
        # scene. Fit the camera on everything else by ECC and keep whichever of the two
        # explains the rest of the frame better.
        exclude = np.zeros((sh, sw), np.uint8)
        if best_hull is not None:
            cv2.fillConvexPoly(exclude, best_hull.reshape(-1, 2).astype(np.int32), 1)
            k = max(3, int(0.05 * max(sh, sw)) | 1)
            exclude = cv2.dilate(exclude, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        ecc = self._register_ecc(a, b, exclude)
        if best is None or ecc is None:
            return ecc if best is None else best
        # the compact layer must explain the rest of the frame clearly better: on a plain
        # scene both explain it about equally, and then the compact layer is the subject
        return best if _residual(a, b, best, exclude) + 1.0 < _residual(a, b, ecc, exclude) else ecc

    @staticmethod
    def _register_ecc(a: _Frame, b: _Frame, exclude: np.ndarray | None = None) -> np.ndarray | None:
        """Affine camera motion by ECC, coarse to fine, ignoring ``exclude`` (in a)."""
        warp = np.eye(2, 3, dtype=np.float32)
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 80, 1e-5)
        for scale in (0.25, 0.5, 1.0):
            ga = cv2.resize(a.grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            gb = cv2.resize(b.grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            mask = None
            if exclude is not None and exclude.any():
                mask = (cv2.resize(exclude, (ga.shape[1], ga.shape[0]), interpolation=cv2.INTER_NEAREST) == 0
                        ).astype(np.uint8)
            level = warp.copy()
            level[:, 2] *= scale
            try:
                _, level = cv2.findTransformECC(ga, gb, level, cv2.MOTION_AFFINE, criteria, mask, 5)
            except cv2.error:
                return None
            warp = level.copy()
            warp[:, 2] /= scale
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
            warped = _match_exposure(warped, f.rgb, valid)
            lo_j, hi_j = cv2.erode(warped, kernel), cv2.dilate(warped, kernel)
            # differences that a one-pixel misregistration would explain do not count
            # (saturating uint8 subtraction: negative differences become 0)
            d1 = cv2.max(cv2.subtract(f.rgb, hi_j), cv2.subtract(lo_j, f.rgb))
            d2 = cv2.max(cv2.subtract(warped, hi_i), cv2.subtract(lo_i, warped))
            d = np.minimum(_channel_max(d1), _channel_max(d2)).astype(np.float32)
            d[~valid] = np.inf
            diffs.append(d)
        return np.sort(np.stack(diffs), axis=0) if diffs else None

    def _motion(self, stack: np.ndarray | None, shape: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray, float]:
        """Motion map (a low quantile of the sorted differences), how many keyframes
        each pixel was compared with, and the threshold above which it counts."""
        if stack is None:
            return np.zeros(shape, np.float32), np.zeros(shape, int), float("inf")
        motion, n_valid = self._quantile(stack)
        seen = motion[n_valid > 0]
        if seen.size == 0:
            return motion, n_valid, float("inf")
        med = float(np.median(seen))
        mad = float(np.median(np.abs(seen - med))) * 1.4826
        return motion, n_valid, max(self.threshold, med + self.noise_k * mad)

    def _candidates(self, motion: np.ndarray, thr: float) -> np.ndarray:
        """Regions of weak motion (hysteresis at half the threshold), closed, holes filled."""
        if not np.isfinite(thr):
            return np.zeros(motion.shape, bool)
        binary = (motion > 0.5 * thr).astype(np.uint8)
        k = max(5, int(0.03 * max(motion.shape)) | 1)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        return ndimage.binary_fill_holes(binary)

    def _refine(self, f: _Frame, m1: np.ndarray, t1: float, m2: np.ndarray, n2: np.ndarray,
                t2: float) -> np.ndarray:
        """The moving pixels of a keyframe from both passes. Where the second pass had
        no keyframe showing the scene to compare with, colour decides (GrabCut seeded
        by the pixels whose motion or stillness is certain): a subject's part that only
        overlapped its own other views joins it, a former place of the subject that
        shows the scene again does not."""
        cand = self._candidates(m1, t1) | self._candidates(m2, t2)
        if not cand.any() or not np.isfinite(t2):
            return cand
        known = n2 > 0
        trimap = np.full(cand.shape, cv2.GC_BGD, np.uint8)
        # the colour model may grow a region a little past the moving pixels (a slow
        # subject's plain parts do not move against its own other views)
        k = max(5, int(0.05 * max(cand.shape)) | 1)
        near = cv2.dilate(cand.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))).astype(bool)
        trimap[near] = cv2.GC_PR_BGD
        trimap[cand & ~known] = cv2.GC_PR_FGD
        trimap[cand & known & (m2 > 0.5 * t2)] = cv2.GC_PR_FGD
        trimap[cand & known & (m2 > t2)] = cv2.GC_FGD
        if not (trimap == cv2.GC_FGD).any() or (cand & ~known).sum() == 0:
            return cand & (~known | (m2 > 0.5 * t2))
        ys, xs = np.nonzero(near)
        pad = int(0.1 * max(cand.shape))
        y0, y1 = max(0, ys.min() - pad), min(cand.shape[0], ys.max() + 1 + pad)
        x0, x1 = max(0, xs.min() - pad), min(cand.shape[1], xs.max() + 1 + pad)
        # GrabCut runs on the region's surroundings at most grabcut_side pixels across
        scale = min(1.0, self.grabcut_side / max(y1 - y0, x1 - x0))
        size = (max(2, round((x1 - x0) * scale)), max(2, round((y1 - y0) * scale)))
        sub = cv2.resize(np.ascontiguousarray(trimap[y0:y1, x0:x1]), size, interpolation=cv2.INTER_NEAREST)
        bgr = cv2.resize(cv2.cvtColor(np.ascontiguousarray(f.rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2BGR), size,
                         interpolation=cv2.INTER_AREA)
        if not ((sub == cv2.GC_FGD) | (sub == cv2.GC_PR_FGD)).any() or not (sub == cv2.GC_BGD).any():
            return cand & (~known | (m2 > 0.5 * t2))
        cv2.setRNGSeed(0)  # GrabCut's colour models are initialised from OpenCV's RNG
        try:
            cv2.grabCut(bgr, sub, None, np.zeros((1, 65)), np.zeros((1, 65)), 3, cv2.GC_INIT_WITH_MASK)
        except cv2.error:
            return cand & (~known | (m2 > 0.5 * t2))
        fg = ((sub == cv2.GC_FGD) | (sub == cv2.GC_PR_FGD)).astype(np.uint8)
        out = np.zeros(cand.shape, bool)
        out[y0:y1, x0:x1] = cv2.resize(fg, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST) > 0
        out &= near
        k = max(3, int(0.015 * max(cand.shape)) | 1)
        out = cv2.morphologyEx(out.astype(np.uint8), cv2.MORPH_OPEN,
                               cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        return ndimage.binary_fill_holes(out)

    def _quantile(self, stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_valid = np.isfinite(stack).sum(axis=0)
        k = np.floor(self.quantile * np.maximum(n_valid - 1, 0)).astype(int)
        motion = np.take_along_axis(stack, k[None], axis=0)[0]
        motion[n_valid == 0] = 0
        return motion.astype(np.float32), n_valid

    def _regions(self, f: _Frame, motion: np.ndarray, thr: float, binary: np.ndarray
                 ) -> list[tuple[list[float], float, np.ndarray]]:
        """Boxes of the connected moving regions (touching subjects split apart), each
        scored by its motion strength fused with its saliency contrast."""
        if not np.isfinite(thr) or not binary.any():
            return []
        sh, sw = motion.shape
        strong = motion > thr
        binary = binary.astype(np.uint8)
        count, labels = cv2.connectedComponents(binary, connectivity=8)
        out = []
        min_px = self.min_area * sh * sw
        sal_total = float(f.saliency.sum())
        for c in range(1, count):
            component = labels == c
            if component.sum() < min_px:
                continue
            for region in _split_touching(component):
                area = int(region.sum())
                if area < min_px or strong[region].sum() < 0.25 * min_px:
                    continue
                ys, xs = np.nonzero(region)
                strength = float(np.clip(motion[region].mean() / (3 * thr), 0, 1))
                sal_in = float(f.saliency[region].mean())
                sal_out = (sal_total - float(f.saliency[region].sum())) / max(region.size - area, 1)
                contrast = sal_in / (sal_in + sal_out + 1e-6)
                score = (1 - self.saliency_weight) * (0.5 + 0.5 * strength) + self.saliency_weight * contrast
                if score >= self.min_score:
                    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
                    out.append((box, score, region))
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
                    geo = iou(box, moved) if moved is not None else 0.0
                    aff[a, b] = 0.8 * app + 0.2 * geo if app >= 0.5 else 0.0
            assigned = [-1] * len(regions)
            if regions:
                # a region may also start a new track (worth link_min): no forced links
                padded = np.hstack([aff, np.full((len(regions), len(regions)), self.link_min)])
                rows, cols = linear_sum_assignment(-padded)
                for a, b in zip(rows, cols, strict=True):
                    if b < len(live) and aff[a, b] >= self.link_min:
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


def _split_touching(component: np.ndarray, min_share: float = 0.2, neck_ratio: float = 0.6,
                    side: int = 96) -> list[np.ndarray]:
    """Split a region made of two or more blobs that touch through a narrow neck (two
    subjects side by side). Watershed on the distance transform; two parts are merged
    back unless both are large (``min_share`` of the region) and the neck between them
    is narrow (under ``neck_ratio`` of the smaller part's thickness), so one subject's
    limbs or head stay with it. Shapes are analysed at most ``side`` pixels across."""
    ys, xs = np.nonzero(component)
    y0, x0 = ys.min(), xs.min()
    crop = component[y0:ys.max() + 1, x0:xs.max() + 1].astype(np.uint8)
    scale = min(1.0, side / max(crop.shape))
    small = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) if scale < 1 else crop
    small = np.pad(small, 1)
    dist = cv2.distanceTransform(small, cv2.DIST_L2, 5)
    peak = float(dist.max())
    if peak < 3:
        return [component]
    markers, n = ndimage.label(h_maxima(dist, 0.25 * peak))
    if n < 2:
        return [component]
    parts = watershed(-dist, markers, mask=small.astype(bool))
    total = float(small.sum())
    merged = True
    while merged:
        merged = False
        labels = [v for v in np.unique(parts) if v > 0]
        for a in labels:
            for b in labels:
                if b <= a:
                    continue
                pa, pb = parts == a, parts == b
                touch = cv2.dilate(pa.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & pb
                if not touch.any():
                    continue
                neck = float(dist[touch].max())
                thin = min(float(dist[pa].max()), float(dist[pb].max()))
                if min(pa.sum(), pb.sum()) < min_share * total or neck > neck_ratio * thin:
                    parts[pb] = a
                    merged = True
                    break
            if merged:
                break
    labels = [v for v in np.unique(parts) if v > 0]
    if len(labels) < 2:
        return [component]
    parts = cv2.resize(parts[1:-1, 1:-1].astype(np.float32), (crop.shape[1], crop.shape[0]),
                       interpolation=cv2.INTER_NEAREST).astype(int)
    # pixels the rescaling left unlabelled take the label of the nearest labelled pixel
    _, (iy, ix) = ndimage.distance_transform_edt(parts == 0, return_indices=True)
    parts = parts[iy, ix]
    out = []
    for v in labels:
        full = np.zeros_like(component)
        full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = (parts == v) & (crop > 0)
        out.append(full)
    return out


def _residual(a: _Frame, b: _Frame, h: np.ndarray, exclude: np.ndarray) -> float:
    """Median grey difference between frame a and frame b warped by h, outside ``exclude``."""
    sh, sw = a.grey.shape
    warped = cv2.warpPerspective(b.grey, h, (sw, sh), flags=cv2.INTER_LINEAR)
    valid = cv2.warpPerspective(np.ones((sh, sw), np.uint8), h, (sw, sh), flags=cv2.INTER_NEAREST) > 0
    valid &= exclude == 0
    if valid.sum() < 0.1 * sh * sw:
        return float("inf")
    return float(np.median(cv2.absdiff(a.grey, warped)[valid]))


def _match_exposure(image: np.ndarray, reference: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Scale each channel by the median ratio of reference to image over aligned pixels:
    exposure and lighting drift between keyframes is not motion. (A ratio per pixel:
    the scene's pixels agree on it, a subject's are outliers.)"""
    sample = valid.copy()
    sample[1::2, :] = False   # every other row and column is plenty for a median
    sample[:, 1::2] = False
    a_all, b_all = image[sample].astype(np.float32), reference[sample].astype(np.float32)
    gains = np.ones(3, np.float32)
    for c in range(3):
        a, b = a_all[:, c], b_all[:, c]
        lit = (a > 20) & (b > 20)
        if lit.sum() >= 50:
            gain = float(np.median(b[lit] / a[lit]))
            if 0.5 < gain < 2.0 and abs(gain - 1.0) > 0.02:
                gains[c] = gain
    if np.all(gains == 1.0):
        return image
    return np.clip(image.astype(np.float32) * gains + 0.5, 0, 255).astype(np.uint8)


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


@register("detector", "classical")
def make_motion_saliency_detector(device: str = "cpu", dtype: str = "auto", batch_size: int = 1,
                                  **options: Any) -> MotionSaliencyDetector:
    return MotionSaliencyDetector(**options)

"""Classical sample verifier: embeddings, keypoints, pixel statistics and mask geometry.

A sample (dict) carries the synthesized images: ``reference`` and its ``mask``,
``generation_input`` and ``generation_mask`` (where the subject sits in it),
``manipulation_input`` and ``manipulation_mask`` (the inpainted box region) and the
``target`` frame. Checks, each with a threshold from VerifySettings:

* same individual - the reference against the subject in the target frame (its box
  crop): is the pair one individual at all? Embedding cosine against the threshold
  calibrated for the embedder (``same_individual_min``). A sample without a target box
  fails this check: it cannot be shown to hold one individual;
* identity - the subject in the generation input against the reference subject:
  embedding cosine similarity, and (when the subject has enough texture) a keypoint
  match: ORB features related by one similarity transform (RANSAC), tried mirrored
  too, since synthesis flips, scales and rotates the subject;
* residual - is the subject still inside the inpainted box of the manipulation
  input? Embedding similarity of the box to the subject, placed between the scene
  around the box (0) and the target's box, which does hold the subject (1); the
  subject's keypoints found in the box; box pixels left equal to the target;
* subject visible - the subject's mask in the target (``target_mask``; its box may have
  held only part of it): the share of its pixels the manipulation input left as they
  were. A manipulation input that still shows the subject holds the answer already;
* artifact - seams: the gradient right on a mask/box edge against the gradient just
  inside and outside it; a blank synthesized image;
* mask sanity - the subject must cover a plausible share of the generation input and
  be mostly one connected piece; the inpainted box likewise.

Keypoint ratios follow Brown & Lowe (IJCV 2007): a match is accepted when the
RANSAC inliers exceed 5.9 + 0.22 x putative matches; the ratio of the two is >= 1 then.
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from opensubject_tasks.backends.base import Embedder, Verdict
from opensubject_tasks.backends.registry import get_backend, register
from opensubject_tasks.config import VerifySettings
from opensubject_tasks.geometry import as_mask



def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the True pixels, exclusive ends; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def subject_view(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The subject cropped to its mask's box, pixels outside the mask set to the subject's
    mean colour (adds no colour of its own and no texture to the comparison)."""
    if mask is None or mask.shape != image.shape[:2] or not mask.any():
        return image
    x0, y0, x1, y1 = bbox(mask)
    crop, m = image[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1]
    crop[~m] = crop[m].mean(axis=0).astype(np.uint8)
    return crop


def box_crop(image: np.ndarray, box: Sequence[float]) -> np.ndarray | None:
    """The pixels of a [x0, y0, x1, y1] box (outward to whole pixels), None when empty."""
    h, w = image.shape[:2]
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    return image[y0:y1, x0:x1] if x1 > x0 and y1 > y0 else None


def centre_crop(image: np.ndarray, share: float) -> np.ndarray:
    """The middle ``share`` of an image's width and height."""
    h, w = image.shape[:2]
    dy, dx = int(round(h * (1 - share) / 2)), int(round(w * (1 - share) / 2))
    return np.ascontiguousarray(image[dy:max(dy + 1, h - dy), dx:max(dx + 1, w - dx)])


def context_crops(image: np.ndarray, box: tuple[int, int, int, int], max_overlap: float = 0.25) -> list[np.ndarray]:
    """Box-sized patches of the scene next to ``box`` (left, right, above, below),
    clipped to the image; those overlapping the box too much or too small are dropped."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    out = []
    for dx, dy in ((-bw, 0), (bw, 0), (0, -bh), (0, bh)):
        cx0, cy0 = max(0, x0 + dx), max(0, y0 + dy)
        cx1, cy1 = min(w, x1 + dx), min(h, y1 + dy)
        if (cx1 - cx0) * (cy1 - cy0) < 0.5 * bw * bh:
            continue
        ix = max(0, min(cx1, x1) - max(cx0, x0)) * max(0, min(cy1, y1) - max(cy0, y0))
        if ix > max_overlap * bw * bh:
            continue
        out.append(image[cy0:cy1, cx0:cx1])
    return out


def seam_score(image: np.ndarray, mask: np.ndarray, band: int) -> float:
    """0 when the edge of ``mask`` is as smooth as its surroundings, towards 1 for a seam.

    Mean gradient magnitude on the edge (within 1.5 px) divided by the mean gradient in
    strips ``band`` px wide just inside and just outside; r -> (r - 1) / (r + 1).
    """
    if mask.shape != image.shape[:2] or not mask.any() or mask.all():
        return 0.0
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    grad = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3),
                         cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3))
    m = mask.astype(np.uint8)
    signed = np.where(mask, cv2.distanceTransform(m, cv2.DIST_L2, 3),
                      -cv2.distanceTransform(1 - m, cv2.DIST_L2, 3))  # > 0 inside, < 0 outside
    dist = np.abs(signed)
    edge = dist <= 1.5
    near = (dist > 2.5) & (dist <= 2.5 + band)  # beyond the Sobel kernel's reach of the edge
    frame = np.zeros_like(mask)
    frame[2:-2, 2:-2] = True                    # an edge on the image border is no seam
    edge &= frame
    near &= frame
    if edge.sum() < 8 or near.sum() < 8:
        return 0.0
    r = float(grad[edge].mean()) / (float(grad[near].mean()) + 4.0)  # +4: flat areas are no seam
    return float(max(0.0, (r - 1.0) / (r + 1.0)))


def largest_part_share(mask: np.ndarray) -> float:
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return 0.0
    areas = stats[1:, cv2.CC_STAT_AREA]
    return float(areas.max() / areas.sum())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.clip(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12), -1, 1))



def unchanged_share(man: np.ndarray, tgt: np.ndarray, mask: np.ndarray) -> float:
    """Share of ``mask``'s pixels the manipulation input left as they are in the target
    (every channel within 6 levels: encoder noise, not a repaint)."""
    diff = np.abs(man.astype(np.int16) - tgt.astype(np.int16)).max(axis=2)
    return float((diff[mask] <= 6).mean())

class KeypointMatcher:
    """Is the masked subject of one image present, up to a similarity transform and a
    mirror flip, in the masked region of another? Returns Brown & Lowe's ratio."""

    def __init__(self, n_features: int = 500) -> None:
        self.orb = cv2.ORB_create(nfeatures=n_features, edgeThreshold=8, patchSize=15, fastThreshold=10)
        self.matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)

    def features(self, image: np.ndarray, mask: np.ndarray | None):  # noqa: ANN201 - (keypoints, descriptors)
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        m = None if mask is None else mask.astype(np.uint8) * 255
        return self.orb.detectAndCompute(gray, m)

    def ratio(self, ref_feats, image: np.ndarray, mask: np.ndarray | None) -> float:  # noqa: ANN001
        kp_a, des_a = ref_feats
        best = 0.0
        for flip in (False, True):
            img = image[:, ::-1] if flip else image
            msk = None if mask is None else (mask[:, ::-1] if flip else mask)
            kp_b, des_b = self.features(np.ascontiguousarray(img),
                                        None if msk is None else np.ascontiguousarray(msk))
            if des_a is None or des_b is None or len(kp_b) < 4:
                continue
            matches = self.matcher.match(des_a, des_b)
            if len(matches) < 4:
                continue
            pa = np.float32([kp_a[m.queryIdx].pt for m in matches])
            pb = np.float32([kp_b[m.trainIdx].pt for m in matches])
            _, inliers = cv2.estimateAffinePartial2D(pa, pb, method=cv2.RANSAC, ransacReprojThreshold=3.0)
            if inliers is None:
                continue
            best = max(best, float(inliers.sum()) / (5.9 + 0.22 * len(matches)))
        return min(best, 10.0)


class ClassicalVerifier:
    """Scores samples; thresholds come per call so one warm instance serves any settings."""

    name = "classical"

    def __init__(self, embedder: Embedder | None = None, embedder_name: str = "classical",
                 device: str = "cpu", dtype: str = "auto", batch_size: int = 8) -> None:
        self._embedder = embedder
        self._embedder_name = embedder_name
        self._opts = {"device": device, "dtype": dtype, "batch_size": batch_size}
        self.keypoints = KeypointMatcher()

    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = get_backend("embedder", self._embedder_name, **self._opts)
        return self._embedder

    def verify(self, samples: Sequence[dict[str, Any]], thresholds: VerifySettings | None = None,
               embedder: Embedder | None = None, vlm: Any = None) -> list[Verdict]:  # no VLM here
        t = thresholds or VerifySettings()
        emb = embedder or self.embedder()
        emb_name = getattr(emb, "name", "embedder")
        same_min = t.same_individual_threshold(emb_name)  # before any work: a missing one is a config error
        prepared = [self._prepare(s, t.same_individual_centre) for s in samples]
        # One embedding call for every crop of every sample (batched on a GPU embedder).
        crops = [c for p in prepared for c in p["crops"].values()]
        vecs = emb.embed(crops) if crops else np.zeros((0, 1), np.float32)
        verdicts, i = [], 0
        for p in prepared:
            n = len(p["crops"])
            named = dict(zip(p["crops"], vecs[i:i + n], strict=True))
            verdicts.append(self._judge(p, named, t, emb_name, same_min))
            i += n
        return verdicts

    # -- internals -------------------------------------------------------------------
    @staticmethod
    def _prepare(s: dict[str, Any], centre: float = 1.0) -> dict[str, Any]:
        ref = s["reference"]
        ref_mask = as_mask(s.get("mask"))
        if ref_mask is not None and ref_mask.shape != ref.shape[:2]:
            ref_mask = cv2.resize(ref_mask.astype(np.uint8), (ref.shape[1], ref.shape[0]),
                                  interpolation=cv2.INTER_NEAREST).astype(bool)
        gen, gen_mask = s["generation_input"], as_mask(s.get("generation_mask"))
        man, man_mask = s["manipulation_input"], as_mask(s.get("manipulation_mask"))
        tgt = s.get("target")
        problems: list[str] = []
        if gen_mask is None or gen_mask.shape != gen.shape[:2]:
            problems.append("mask: generation mask missing or not the size of the generation input")
            gen_mask = None
        if man_mask is None or man_mask.shape != man.shape[:2] or not man_mask.any():
            problems.append("mask: manipulation mask missing, empty or not the size of the manipulation input")
            man_mask = None
        if tgt is not None and tgt.shape != man.shape:
            tgt = None  # cannot compare pixel by pixel; the other checks still run
        tgt_mask = as_mask(s.get("target_mask"))
        if tgt_mask is not None and (tgt_mask.shape != man.shape[:2] or not tgt_mask.any()):
            tgt_mask = None
        crops = {"ref": subject_view(ref, ref_mask), "gen": subject_view(gen, gen_mask)}
        # same individual: box crops on both sides, as mining compares them
        tgt_subject = box_crop(s["target"], s["tgt_box"]) if s.get("target") is not None and s.get("tgt_box") else None
        if tgt_subject is None:
            problems.append("same individual: no target box to compare the reference with")
        else:
            crops["ref_box"], crops["tgt_subject"] = centre_crop(ref, centre), centre_crop(tgt_subject, centre)
        if man_mask is not None:
            box = bbox(man_mask)
            x0, y0, x1, y1 = box
            crops["box"] = man[y0:y1, x0:x1]
            if tgt is not None:
                crops["tgt"] = tgt[y0:y1, x0:x1]
            for j, c in enumerate(context_crops(man, box)):
                crops[f"ctx{j}"] = c
        return {"ref": ref, "ref_mask": ref_mask, "gen": gen, "gen_mask": gen_mask, "man": man,
                "man_mask": man_mask, "tgt": tgt, "tgt_mask": tgt_mask, "crops": crops, "problems": problems}

    def _judge(self, p: dict[str, Any], v: dict[str, np.ndarray], t: VerifySettings, emb_name: str,
               same_min: float) -> Verdict:
        reasons = list(p["problems"])
        scores: dict[str, float] = {}

        # Same individual: the reference against the subject in the target frame.
        if "tgt_subject" in v:
            same = cosine(v["ref_box"], v["tgt_subject"])
            scores["same_individual"] = same
            if same < same_min:
                reasons.append(f"same individual: the target's subject differs from the reference "
                               f"(embedding {same:.2f} < min {same_min:.2f} for {emb_name})")
        ref_feats = self.keypoints.features(p["ref"], p["ref_mask"])
        textured = ref_feats[1] is not None and len(ref_feats[0]) >= t.min_keypoints

        # Identity: the subject in the generation input against the reference subject.
        identity = max(0.0, cosine(v["ref"], v["gen"]))
        scores["identity"] = identity
        if identity < t.min_identity:
            reasons.append(f"identity: subject differs from the reference "
                           f"(embedding {identity:.2f} < min {t.min_identity:.2f})")
        kp_identity = None
        if textured and p["gen_mask"] is not None:
            kp_identity = self.keypoints.ratio(ref_feats, p["gen"], p["gen_mask"])
            scores["identity_keypoints"] = kp_identity
            if kp_identity < t.min_keypoint_ratio:
                reasons.append(f"identity: reference keypoints not found on the subject "
                               f"(ratio {kp_identity:.2f} < min {t.min_keypoint_ratio:.2f})")

        # Residual: the inpainted box should no longer hold the subject.
        residual = 0.0
        if p["man_mask"] is not None:
            sim_box = max(0.0, cosine(v["ref"], v["box"]))
            ctx = [max(0.0, cosine(v["ref"], v[k])) for k in v if k.startswith("ctx")]
            floor = max(ctx) if ctx else 0.0
            top = max(0.0, cosine(v["ref"], v["tgt"])) if "tgt" in v else 1.0
            top = max(top, sim_box)
            # Where the box sits between the scene around it (0) and the subject itself (1).
            residual = (sim_box - floor) / (top - floor) if top - floor > 0.05 else 0.0
            residual = float(np.clip(residual, 0.0, 1.0))
            scores.update(residual_similarity=sim_box, residual_floor=floor)
            if residual > t.max_residual:
                reasons.append(f"residual: inpainted box still looks like the subject "
                               f"({residual:.2f} > max {t.max_residual:.2f})")
            if textured:
                kp_box = self.keypoints.ratio(ref_feats, p["man"], p["man_mask"])
                scores["residual_keypoints"] = kp_box
                if kp_box >= t.min_keypoint_ratio:
                    reasons.append(f"residual: subject keypoints found in the inpainted box "
                                   f"(ratio {kp_box:.2f} >= {t.min_keypoint_ratio:.2f})")
            if p["tgt"] is not None:
                unchanged = unchanged_share(p["man"], p["tgt"], p["man_mask"])
                scores["unchanged_in_box"] = unchanged
                if unchanged > t.max_unchanged_in_box:
                    reasons.append(f"residual: inpainted box left unchanged from the target "
                                   f"({unchanged:.0%} > max {t.max_unchanged_in_box:.0%})")
        scores["residual"] = residual

        # Subject visible: its mask in the target, left as it was in the manipulation input.
        if p["tgt"] is not None and p["tgt_mask"] is not None:
            visible = unchanged_share(p["man"], p["tgt"], p["tgt_mask"])
            scores["subject_visible"] = visible
            if visible > t.max_subject_visible:
                reasons.append(f"subject visible: {visible:.0%} of the subject's mask in the target is "
                               f"unchanged in the manipulation input (max {t.max_subject_visible:.0%})")

        # Artifacts: seams along the edges where synthesized pixels meet kept ones.
        seam_gen = seam_score(p["gen"], p["gen_mask"], t.seam_band_px) if p["gen_mask"] is not None else 0.0
        seam_man = seam_score(p["man"], p["man_mask"], t.seam_band_px) if p["man_mask"] is not None else 0.0
        blank = float(p["gen"].std() < 1.0 or p["man"].std() < 1.0)
        artifact = max(seam_gen, seam_man, blank)
        scores.update(seam_generation=seam_gen, seam_manipulation=seam_man, blank=blank, artifact=artifact)
        if blank:
            reasons.append("artifact: a synthesized image is blank")
        elif artifact > t.max_artifact:
            where = "generation mask edge" if seam_gen >= seam_man else "manipulation box edge"
            reasons.append(f"artifact: seam along the {where} ({artifact:.2f} > max {t.max_artifact:.2f})")

        # Mask sanity.
        if p["ref_mask"] is not None:
            scores["reference_mask_share"] = float(p["ref_mask"].mean())
            if p["ref_mask"].mean() < t.min_mask_share:
                reasons.append("mask: reference mask is empty or tiny")
        if p["gen_mask"] is not None:
            share, connected = float(p["gen_mask"].mean()), largest_part_share(p["gen_mask"])
            scores.update(mask_share=share, mask_connected=connected)
            if not t.min_mask_share <= share <= t.max_mask_share:
                reasons.append(f"mask: subject covers {share:.1%} of the generation input "
                               f"(allowed {t.min_mask_share:.1%} to {t.max_mask_share:.0%})")
            if connected < t.min_mask_connected:
                reasons.append(f"mask: subject mask is fragmented (largest part {connected:.0%} "
                               f"< {t.min_mask_connected:.0%})")
        if p["man_mask"] is not None:
            share = float(p["man_mask"].mean())
            scores["manipulation_mask_share"] = share
            if not t.min_mask_share <= share <= t.max_mask_share:
                reasons.append(f"mask: inpainted box covers {share:.1%} of the manipulation input "
                               f"(allowed {t.min_mask_share:.1%} to {t.max_mask_share:.0%})")

        # The weakest check, for ranking verified samples (1 = every check comfortably met).
        parts = [identity, 1.0 - residual, 1.0 - artifact]
        if kp_identity is not None:
            parts.append(min(1.0, kp_identity / (2 * t.min_keypoint_ratio)))
        scores["overall"] = float(min(parts))
        # JSON (and PostgreSQL's JSONB) has no NaN: a score that could not be computed is -1.
        scores = {k: round(float(x), 4) if np.isfinite(x) else -1.0 for k, x in scores.items()}
        return Verdict(passed=not reasons, scores=scores, reasons=reasons, source=f"classical:{emb_name}")


@register("verifier", "classical")
def make_classical_verifier(device: str = "cpu", dtype: str = "auto", batch_size: int = 8,
                            embedder: str = "classical") -> ClassicalVerifier:
    return ClassicalVerifier(embedder_name=embedder, device=device, dtype=dtype, batch_size=batch_size)


"""Same-individual thresholds per embedder, calibrated on ground-truth tracks.

The verifier asks whether the reference and the target's subject are the same
individual by the cosine similarity of their embeddings. A cosine means something only
for the embedder that produced it (a colour histogram and CLIP score two different
dogs very differently), so every embedder gets its own threshold
(``verify.same_individual_min``, keyed by the embedder's model), measured here:

* crops: the ground-truth boxes of the sample media (``opensubject samples make``) on
  evenly spaced frames of each shot, stored as JPEG like the curate stage stores
  keyframes; boxes a pair could never use (tiny, full-frame, on the border) are left out;
* same individual: two crops of one track (one subject, across its shots too);
* different individuals: crops of two tracks showing different subjects. Tracks of
  different videos that show the same photographed subject are the same individual and
  are left out of both sets.

The threshold maximises balanced accuracy (the mean of the two sets' accuracies);
among equal ones the highest is taken, since a wrong identity costs more than a lost
pair. In the sample media every individual is of a different category, so these
negatives are the easy kind: two individuals of one category (two dogs) need the
VLM's same-individual question, which the ``gpu`` profile asks.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from opensubject_tasks.backends.base import Embedder, Image
from opensubject_tasks.config import MineSettings


@dataclass
class Crop:
    video: str
    track: int
    individual: str            # what the track shows (the sample media name it by category)
    frame: int
    image: Image


@dataclass
class Calibration:
    embedder: str
    threshold: float
    same: int                  # same-individual pairs
    different: int             # different-individual pairs
    same_accuracy: float       # share of same-individual pairs at or above the threshold
    different_accuracy: float  # share of different-individual pairs below it
    same_quantiles: dict[str, float] = field(default_factory=dict)
    different_quantiles: dict[str, float] = field(default_factory=dict)

    @property
    def balanced_accuracy(self) -> float:
        return (self.same_accuracy + self.different_accuracy) / 2

    def as_dict(self) -> dict[str, Any]:
        return {"embedder": self.embedder, "threshold": self.threshold, "same": self.same,
                "different": self.different, "same_accuracy": self.same_accuracy,
                "different_accuracy": self.different_accuracy,
                "balanced_accuracy": self.balanced_accuracy,
                "same_quantiles": self.same_quantiles, "different_quantiles": self.different_quantiles}


def _shots(video: dict[str, Any]) -> list[tuple[int, int]]:
    """[start, end) of each shot, dissolve frames left out."""
    bounds = sorted([(c, c) for c in video["cuts"]] + [(a, b + 1) for a, b in video["gradual"]])
    spans, pos = [], 0
    for a, b in bounds:
        spans.append((pos, a))
        pos = b
    spans.append((pos, video["frames"]))
    return [s for s in spans if s[1] > s[0]]


def track_crops(media_dir: str | Path, per_shot: int = 6, max_side: int = 768, jpeg_quality: int = 92,
                mine: MineSettings | None = None) -> list[Crop]:
    """Ground-truth subject crops of the sample media in ``media_dir``."""
    import av

    from opensubject_tasks.steps.boxes import box_problem, crop

    mine = mine or MineSettings()
    media_dir = Path(media_dir)
    gt = json.loads((media_dir / "ground_truth.json").read_text())
    out: list[Crop] = []
    for video in gt["videos"]:
        if video.get("bad") or not video.get("subjects"):
            continue
        wanted = {int(round(v)) for a, b in _shots(video)
                  for v in np.linspace(a + min(2, (b - a) // 4), b - 1 - min(2, (b - a) // 4), per_shot)}
        scale = min(1.0, max_side / max(video["width"], video["height"]))
        with av.open(str(media_dir / video["file"])) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i not in wanted:
                    continue
                img = frame.to_ndarray(format="rgb24")
                if scale < 1:
                    img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                img = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                h, w = img.shape[:2]
                for s in video["subjects"]:
                    box = s["boxes"].get(str(i))
                    if box is None:
                        continue
                    box = [v * scale for v in box]
                    if box_problem(box, w, h, mine) is None:
                        out.append(Crop(video["file"], int(s["track"]), str(s["category"]), i,
                                        np.ascontiguousarray(crop(img, box))))
    return out


def pair_similarities(embedder: Embedder, crops: Sequence[Crop], centre: float = 1.0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of (same-track pairs, different-individual pairs), comparing the middle
    ``centre`` share of each box as the verifier does."""
    from opensubject_tasks.backends.classical.verifier import centre_crop

    images = [centre_crop(c.image, centre) for c in crops]
    vecs = embedder.embed(images) if crops else np.zeros((0, 1), np.float32)
    sims = vecs @ vecs.T
    same, different = [], []
    for i in range(len(crops)):
        for j in range(i + 1, len(crops)):
            a, b = crops[i], crops[j]
            if (a.video, a.track) == (b.video, b.track):
                if a.frame != b.frame:
                    same.append(sims[i, j])
            elif a.individual != b.individual:
                different.append(sims[i, j])
    return np.asarray(same, np.float64), np.asarray(different, np.float64)


def _quantiles(v: np.ndarray) -> dict[str, float]:
    if not len(v):
        return {}
    return {k: round(float(np.quantile(v, q)), 4) for k, q in
            (("min", 0.0), ("p05", 0.05), ("median", 0.5), ("p95", 0.95), ("max", 1.0))}


def accuracy(same: np.ndarray, different: np.ndarray, threshold: float) -> tuple[float, float]:
    """(share of same pairs >= threshold, share of different pairs < threshold)."""
    return (float((same >= threshold).mean()) if len(same) else math.nan,
            float((different < threshold).mean()) if len(different) else math.nan)


def best_threshold(same: np.ndarray, different: np.ndarray) -> float:
    """The threshold with the best balanced accuracy (the highest of equal ones),
    rounded down to 0.01 so that it is a setting a person can read."""
    if not len(same) or not len(different):
        raise ValueError("calibration needs same-individual and different-individual pairs")
    candidates = np.unique(np.concatenate([same, different]))
    best, best_t = -1.0, float(candidates[0])
    for t in candidates:
        tpr, tnr = accuracy(same, different, float(t))
        score = (tpr + tnr) / 2
        if score >= best - 1e-12:
            best, best_t = score, float(t)
    return math.floor(best_t * 100) / 100


def calibrate(embedder: Embedder, crops: Sequence[Crop], threshold: float | None = None,
              centre: float | None = None) -> Calibration:
    """Measure an embedder on the crops' pairs; ``threshold`` None picks the best one.
    ``centre``: the share of each box compared (default: the verifier's setting)."""
    from opensubject_tasks.config import VerifySettings

    centre = VerifySettings().same_individual_centre if centre is None else centre
    same, different = pair_similarities(embedder, crops, centre)
    t = best_threshold(same, different) if threshold is None else float(threshold)
    tpr, tnr = accuracy(same, different, t)
    return Calibration(getattr(embedder, "name", "embedder"), t, len(same), len(different), tpr, tnr,
                       _quantiles(same), _quantiles(different))


__all__ = ["Calibration", "Crop", "accuracy", "best_threshold", "calibrate", "pair_similarities",
           "track_crops"]

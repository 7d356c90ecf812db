"""Diversity-aware pairing (pure): the pairs of keyframes that show one subject.

Among usable keyframe pairs of one identity whose embedding similarity stays above
``min_identity``, near-duplicates are rejected and the most diverse pairs (temporal gap,
change of box scale/position/aspect, appearance distance) are chosen, at most
``max_pairs_per_subject``. ``prefer_target`` lets the subjects of one clip share a target
keyframe (``shared_target``), so that their samples can be combined into one
multi-subject sample.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from opensubject_tasks.config import MineSettings
from opensubject_tasks.geometry import box_area, iou
from opensubject_tasks.steps.identities import TrackedBox

# weights of the diversity score's parts (they sum to 1)
DIVERSITY_WEIGHTS = {"temporal": 0.25, "scale": 0.2, "position": 0.25, "aspect": 0.1, "appearance": 0.2}


def pair_scores(a: TrackedBox, b: TrackedBox, frame_a: int, frame_b: int, span: int, width: int, height: int,
                s: MineSettings) -> dict[str, float]:
    """Identity similarity and the diversity of two views of one subject (each part 0..1)."""
    ba, bb = a.det.box, b.det.box
    sim = float(a.emb @ b.emb)
    area_a, area_b = max(box_area(ba), 1e-6), max(box_area(bb), 1e-6)
    ca = ((ba[0] + ba[2]) / 2, (ba[1] + ba[3]) / 2)
    cb = ((bb[0] + bb[2]) / 2, (bb[1] + bb[3]) / 2)
    ar_a = max(ba[2] - ba[0], 1e-6) / max(ba[3] - ba[1], 1e-6)
    ar_b = max(bb[2] - bb[0], 1e-6) / max(bb[3] - bb[1], 1e-6)
    parts = {
        "temporal": min(1.0, abs(frame_b - frame_a) / max(span, 1)),
        "scale": min(1.0, abs(math.log(area_b / area_a)) / math.log(4)),
        "position": min(1.0, math.hypot(cb[0] - ca[0], cb[1] - ca[1]) / (0.5 * math.hypot(width, height))),
        "aspect": min(1.0, abs(math.log(ar_b / ar_a)) / math.log(2)),
        "appearance": min(1.0, max(0.0, 1.0 - sim) / max(1e-6, 1.0 - s.min_identity)),
    }
    diversity = sum(DIVERSITY_WEIGHTS[k] * v for k, v in parts.items())
    return {"identity": round(sim, 4), "diversity": round(diversity, 4),
            "box_iou": round(iou(ba, bb), 4), **{k: round(v, 4) for k, v in parts.items()}}


def choose_pairs(ident: list[TrackedBox], usable: set[int], frame_numbers: Sequence[int], width: int,
                 height: int, s: MineSettings, prefer_target: int | None = None
                 ) -> tuple[list[tuple[TrackedBox, TrackedBox, dict[str, float]]], Counter[str]]:
    """The most diverse non-duplicate pairs of usable views; also why others were dropped.

    ``prefer_target`` (a keyframe index): the most diverse pair that includes this view is
    taken first, with this view as the target, so that subjects of one clip share a target
    frame (the multi-subject samples of the export)."""
    views = [b for b in ident if b.frame in usable]
    span = max(frame_numbers) - min(frame_numbers)
    dropped: Counter[str] = Counter()
    cands = []
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            a, b = views[i], views[j]
            sc = pair_scores(a, b, frame_numbers[a.frame], frame_numbers[b.frame], span, width, height, s)
            if sc["identity"] < s.min_identity:
                dropped["identity below threshold"] += 1
                continue
            if sc["box_iou"] >= s.near_duplicate_iou and sc["identity"] >= s.near_duplicate_identity:
                dropped["near-duplicate"] += 1
                continue
            if sc["diversity"] < s.min_diversity:
                dropped["too little diversity"] += 1
                continue
            # the larger view is the reference: it carries the most detail of the identity
            ref, tgt = (a, b) if box_area(a.det.box) >= box_area(b.det.box) else (b, a)
            cands.append((ref, tgt, sc))
    chosen: list[tuple[TrackedBox, TrackedBox, dict[str, float]]] = []
    used: Counter[int] = Counter()
    shared = [i for i, (r, t, _) in enumerate(cands) if prefer_target in (r.frame, t.frame)]
    if shared:
        k = max(shared, key=lambda i: (cands[i][2]["diversity"], -cands[i][0].frame, -cands[i][1].frame))
        ref, tgt, sc = cands.pop(k)
        if ref.frame == prefer_target:
            ref, tgt = tgt, ref
        chosen.append((ref, tgt, sc))
        used[ref.frame] += 1
        used[tgt.frame] += 1
    while cands and len(chosen) < s.max_pairs_per_subject:
        # prefer pairs on keyframes not used yet, so the chosen pairs differ among themselves
        k = max(range(len(cands)), key=lambda i: (
            cands[i][2]["diversity"] * 0.85 ** (used[cands[i][0].frame] + used[cands[i][1].frame]),
            -cands[i][0].frame, -cands[i][1].frame))
        ref, tgt, sc = cands.pop(k)
        chosen.append((ref, tgt, sc))
        used[ref.frame] += 1
        used[tgt.frame] += 1
    return chosen, dropped


def shared_target(usable: Sequence[set[int]]) -> int | None:
    """The keyframe usable by the most subjects (at least two; the later one on a tie)."""
    counts = Counter(f for frames in usable for f in frames)
    best = max(counts.items(), key=lambda kv: (kv[1], kv[0]), default=None)
    return best[0] if best and best[1] >= 2 else None

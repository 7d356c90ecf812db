"""Boxes (pure): whether a box can serve as a reference or target, the crop it shows,
and the repair of boxes that hold two subjects or only part of one.

On a keyframe, pieces of one subject are joined, and a box around two overlapping
subjects is split, both judged against the boxes interpolated from the neighbouring
keyframes. A box that is tiny, fills the frame or touches the frame border is not used.
"""
from __future__ import annotations

import math
from typing import Collection, Sequence

import numpy as np

from opensubject_tasks.backends.base import Detection, Embedder, Image
from opensubject_tasks.config import MineSettings
from opensubject_tasks.geometry import box_area, intersection_area, iou
from opensubject_tasks.steps.identities import TrackedBox


def crop(image: Image, box: Sequence[float]) -> Image:
    h, w = image.shape[:2]
    x0, y0 = int(max(0, math.floor(box[0]))), int(max(0, math.floor(box[1])))
    x1, y1 = int(min(w, math.ceil(box[2]))), int(min(h, math.ceil(box[3])))
    if x1 <= x0 or y1 <= y0:
        return np.zeros((1, 1, 3), np.uint8)
    return image[y0:y1, x0:x1]


def box_problem(box: Sequence[float], width: int, height: int, s: MineSettings) -> str | None:
    """Why a box cannot serve as a reference or target, or None."""
    share = box_area(box) / float(width * height)
    if share < s.min_box_area:
        return "tiny"
    if share > s.max_box_area:
        return "full-frame"
    m = s.border_margin * min(width, height)
    if box[0] <= m or box[1] <= m or box[2] >= width - m or box[3] >= height - m:
        return "border"
    return None


# A missing identity's interpolated box that lies at least this much inside another
# identity's box, and covers at most this share of it, is taken to be in there too.
SPLIT_INSIDE = 0.7
SPLIT_MAX_SHARE = 0.8
# A box lying at least this much inside an identity's interpolated box is a piece of it
# when joining the two fits the interpolated box better by this much.
JOIN_INSIDE = 0.8
JOIN_GAIN = 0.15


def predict_box(ident: list[TrackedBox], frame: int, frame_numbers: Sequence[int], skip: Collection[int] = ()
                ) -> tuple[list[float], TrackedBox, TrackedBox] | None:
    """The identity's box at keyframe ``frame``, interpolated linearly in time between
    its nearest boxes before and after it (keyframes in ``skip`` left out), with those
    two boxes; None when it is not seen on both sides."""
    before = [b for b in ident if b.frame < frame and b.frame not in skip]
    after = [b for b in ident if b.frame > frame and b.frame not in skip]
    if not before or not after:
        return None
    a, b = max(before, key=lambda x: x.frame), min(after, key=lambda x: x.frame)
    t = (frame_numbers[frame] - frame_numbers[a.frame]) / max(frame_numbers[b.frame] - frame_numbers[a.frame], 1)
    return [float(va + t * (vb - va)) for va, vb in zip(a.det.box, b.det.box, strict=True)], a, b


def _share_inside(inner: Sequence[float], outer: Sequence[float]) -> float:
    return intersection_area(inner, outer) / max(box_area(inner), 1e-6)


def _clip_box(box: Sequence[float], outer: Sequence[float]) -> list[float]:
    x0, y0 = max(box[0], outer[0]), max(box[1], outer[1])
    return [x0, y0, max(x0 + 1, min(box[2], outer[2])), max(y0 + 1, min(box[3], outer[3]))]


def _union(boxes: Sequence[Sequence[float]]) -> list[float]:
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def join_pieces(idents: list[list[TrackedBox]], frame_numbers: Sequence[int]
                ) -> tuple[list[tuple[int, int, Detection]], set[tuple[int, int]]]:
    """Boxes that are pieces of a subject, joined: [(identity, keyframe, joined
    detection)] and the (identity, keyframe) of the pieces.

    Why: a subject whose parts move differently (limbs) or whose middle is plain can
    come out as two boxes on one keyframe, the smaller one soon dropped as a stray
    identity. Where another box lies inside the identity's box interpolated from its
    neighbouring keyframes and the two together fit that box clearly better than its
    own box alone, the piece is joined to it. A separate subject next to it does not
    lie inside where the identity is expected."""
    joins: list[tuple[int, int, Detection]] = []
    taken: set[tuple[int, int]] = set()      # (identity, keyframe) already joined, as piece or whole
    for ai, ident in enumerate(idents):
        for own in ident:
            k = own.frame
            got = None if own.split else predict_box(ident, k, frame_numbers)
            if got is None:
                continue
            pred = got[0]
            pieces = [(ci, b.det.box) for ci, other in enumerate(idents) if ci != ai and (ci, k) not in taken
                      for b in other if b.frame == k and not b.split and b.det.category == own.det.category
                      and _share_inside(b.det.box, pred) >= JOIN_INSIDE]
            if not pieces or (ai, k) in taken:
                continue
            joined = _union([own.det.box, *(box for _, box in pieces)])
            if iou(joined, pred) >= max(0.6, iou(own.det.box, pred) + JOIN_GAIN):
                joins.append((ai, k, Detection(joined, own.det.score, own.det.category, own.det.track)))
                taken.update({(ci, k) for ci, _ in pieces} | {(ai, k)})
    return joins, taken - {(i, k) for i, k, _ in joins}


def find_merged(idents: list[list[TrackedBox]], n: int, frame_numbers: Sequence[int]
                ) -> list[tuple[int, int, Detection]]:
    """Boxes around two (or more) subjects, split: (identity, keyframe, its part).

    Why: two subjects that overlap in the image move as one region, so a motion-based
    detector returns one box around both. Linking gives that box to one identity (A)
    and leaves a gap in the other (B) on that keyframe. When B, seen apart from A on
    the keyframes before and after (two separate subjects, not two pieces of one),
    is interpolated to a place inside A's box, and A's and B's interpolated boxes
    together explain the box better than A's alone, each gets its interpolated box
    clipped to the merged one."""
    present = [{b.frame: b for b in ident} for ident in idents]
    holders: dict[tuple[int, int], list[tuple[int, list[float]]]] = {}   # (A, keyframe) -> [(B, box)]
    for bi, ident in enumerate(idents):
        for k in range(n):
            got = None if k in present[bi] else predict_box(ident, k, frame_numbers)
            if got is None:
                continue
            pred, before, after = got
            inside = [(_share_inside(pred, present[ai][k].det.box), ai) for ai in range(len(idents))
                      if ai != bi and k in present[ai]
                      and box_area(pred) <= SPLIT_MAX_SHARE * box_area(present[ai][k].det.box)
                      and all(f not in present[ai] or iou(present[ai][f].det.box, seen.det.box) == 0
                              for f, seen in ((before.frame, before), (after.frame, after)))]
            share, ai = max(inside, default=(0.0, -1))
            if share >= SPLIT_INSIDE:
                holders.setdefault((ai, k), []).append((bi, pred))
    parts: list[tuple[int, int, Detection]] = []
    for (ai, k), inner in sorted(holders.items()):
        merged = present[ai][k].det
        # A's own box from its keyframes that held nobody else
        got = predict_box(idents[ai], k, frame_numbers, {kk for aa, kk in holders if aa == ai})
        own = got[0] if got is not None else None
        union = _union([p for _, p in inner] + ([own] if own is not None else []))
        if iou(merged.box, union) < 0.5 or (own is not None and iou(merged.box, union) <= iou(merged.box, own)):
            continue  # the box fits A alone (B hidden behind A, or not found), or fits neither
        if own is not None:
            parts.append((ai, k, Detection(_clip_box(own, merged.box), merged.score, merged.category, merged.track)))
        for bi, pred in inner:
            nearest = min(idents[bi], key=lambda x: abs(x.frame - k))
            parts.append((bi, k, Detection(_clip_box(pred, merged.box), merged.score, nearest.det.category,
                                           nearest.det.track)))
        if own is None:  # A keeps the merged box, but it holds B too
            parts.append((ai, k, merged))
    return parts


def replace_boxes(idents: list[list[TrackedBox]], changes: list[tuple[int, int, Detection]],
                  frames: Sequence[Image], embedder: Embedder, split: bool,
                  drop: Collection[tuple[int, int]] = ()) -> list[list[TrackedBox]]:
    """Each changed identity gets its new box on the keyframe; the boxes in ``drop``
    ((identity, keyframe): pieces joined into another) go, and identities left empty."""
    if not changes:
        return idents
    embs = embedder.embed([crop(frames[k], d.box) for _, k, d in changes])
    drop = set(drop) | {(i, k) for i, k, _ in changes}
    out = [[b for b in ident if (i, b.frame) not in drop] for i, ident in enumerate(idents)]
    for (i, k, det), emb in zip(changes, embs, strict=True):
        out[i].append(TrackedBox(k, det, emb, split=split))
    return [sorted(ident, key=lambda x: x.frame) for ident in out if ident]

"""Stage 2, mine & pair (pure): find the subjects of one clip and choose diverse pairs
of frames that show the same subject.

1. Category consensus: the VLM names the subjects on a few keyframes; categories
   named on at least ``consensus_share`` of the keyframes asked are kept, provided at
   least ``consensus_min_answers`` keyframes answered. A clip without consensus is
   rejected with the reason (or, when configured, grounded class-agnostically). Without
   a VLM the detector's class-agnostic proposals are used, labelled ``object`` with
   category source ``none``.
2. Local grounding: the detector gives boxes per keyframe for the kept categories.
3. Identities: boxes are linked across keyframes by detector track, overlap and
   embedding similarity; several subjects per clip are allowed. Pieces of one subject
   on a keyframe are joined, and a box around two overlapping subjects is split,
   both judged against the boxes interpolated from the neighbouring keyframes.
4. Checks: keyframes where a subject is tiny, fills the frame, or touches the frame
   border are not used; a subject left with fewer than two usable keyframes is
   rejected with the reason.
5. Diversity-aware pairing: among usable keyframe pairs of one identity whose
   embedding similarity stays above ``min_identity``, near-duplicates are rejected
   and the most diverse pairs (temporal gap, change of box scale/position/aspect,
   appearance distance) are chosen, at most ``max_pairs_per_subject``. With several
   subjects in a clip, each first takes its best pair whose target is the keyframe
   most of them are usable on (``shared_targets``), so their samples can be combined
   into one multi-subject sample.

Boxes are in keyframe pixels. Everything is deterministic for the same inputs.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

import numpy as np

from opensubject_tasks.backends.base import VLM, CategoryList, Detection, Detector, Embedder, Image
from opensubject_tasks.backends.categories import normalise_category
from opensubject_tasks.config import MineSettings
from opensubject_tasks.geometry import box_area, intersection_area, iou

GENERIC = "object"  # the label of a subject nobody named

# weights of the diversity score's parts (they sum to 1)
DIVERSITY_WEIGHTS = {"temporal": 0.25, "scale": 0.2, "position": 0.25, "aspect": 0.1, "appearance": 0.2}


@dataclass
class SubjectResult:
    idx: int
    category: str
    category_source: str                  # backend that named it; "none" for the generic label
    consensus: float                      # share of keyframes agreeing (category, or presence)
    boxes: dict[int, list[float]]         # frame number -> box
    scores: dict[int, float]              # frame number -> detector score
    usable: list[int]                     # frames fit to be a reference or target
    flags: dict[int, str]                 # frame number -> why it is not usable
    state: str = "kept"                   # kept | rejected
    reason: str | None = None


@dataclass
class PairResult:
    subject_idx: int
    ref_frame: int
    tgt_frame: int
    ref_box: list[float]
    tgt_box: list[float]
    scores: dict[str, float]


@dataclass
class MineResult:
    subjects: list[SubjectResult]
    pairs: list[PairResult]
    categories: dict[str, float]          # category -> share of asked keyframes naming it
    category_source: str                  # VLM name, or "none" when no VLM could name anything
    reason: str | None = None             # why the clip gave no pair
    details: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ helpers

def crop(image: Image, box: Sequence[float]) -> Image:
    h, w = image.shape[:2]
    x0, y0 = int(max(0, math.floor(box[0]))), int(max(0, math.floor(box[1])))
    x1, y1 = int(min(w, math.ceil(box[2]))), int(min(h, math.ceil(box[3])))
    if x1 <= x0 or y1 <= y0:
        return np.zeros((1, 1, 3), np.uint8)
    return image[y0:y1, x0:x1]


def spread_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


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


# --------------------------------------------------------------------- 1. consensus

@dataclass
class Consensus:
    """What the keyframes asked said about the clip's subject categories."""
    kept: dict[str, float]               # category -> share of the keyframes asked naming it
    named: dict[str, float]              # every valid category named, with its share
    asked: int
    answered: int                        # keyframes whose reply was a usable list
    rejected: dict[str, int]             # refused entries -> keyframes that gave them
    errors: list[str]                    # why the other keyframes gave no usable list
    reason: str | None = None            # why there is no consensus

    def as_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "named": self.named, "asked": self.asked, "answered": self.answered,
                "rejected": self.rejected, "errors": self.errors, "reason": self.reason}


def category_consensus(lists: Sequence[CategoryList], share: float, min_answers: int = 1) -> Consensus:
    """Categories named on at least ``share`` of the keyframes asked.

    A frame's valid entries count even when it also gave refused words ("dog, grass":
    a vote for dog, "grass" recorded apart); names are compared in their normal form
    ("Dogs" = "dog"). Shares divide by the frames asked, not by those that answered,
    so one frame of four cannot carry a category; and fewer than ``min_answers``
    answering frames are no consensus at all."""
    asked = len(lists)
    counts: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    errors: list[str] = []
    answered = 0
    for cl in lists:
        rejected.update(set(cl.rejected))
        if cl.error is not None:
            errors.append(cl.error)
            continue
        answered += 1
        counts.update({n for n in (normalise_category(c) for c in cl.categories if c) if n})
    named = {c: round(k / asked, 4) for c, k in sorted(counts.items())} if asked else {}
    kept = {c: v for c, v in named.items() if v >= share - 1e-9}
    reason = None
    need = min(min_answers, asked)
    if answered < max(need, 1):
        why = "; ".join(sorted(set(errors)))[:300]
        reason = (f"no category consensus: {answered} of {asked} keyframes gave a usable answer "
                  f"(at least {max(need, 1)} needed){': ' + why if why else ''}")
    elif not kept:
        seen = ", ".join(f"{c} {v:.0%}" for c, v in sorted(named.items(), key=lambda kv: -kv[1])[:5])
        reason = (f"no category consensus: no category named on {share:.0%} of {asked} keyframes"
                  f" ({seen or 'none named'})")
    if reason and rejected:
        reason += "; refused: " + ", ".join(sorted(rejected))[:200]
    return Consensus({} if reason else kept, named, asked, answered, dict(sorted(rejected.items())),
                     errors, reason)


# ------------------------------------------------------------------ 3. identities

@dataclass
class _Box:
    frame: int                 # index into the clip's keyframes
    det: Detection
    emb: np.ndarray
    split: bool = False        # cut out of a box that held another subject too


_NO_LINK = -1e3  # affinity of a box and an identity that must not be linked


def link_identities(boxes_per_frame: Sequence[Sequence[_Box]], s: MineSettings) -> list[list[_Box]]:
    """Link boxes across keyframes into identities (Hungarian assignment per keyframe).

    Affinity of a box to an identity: embedding similarity to the identity's mean,
    overlap with its latest box, and agreement of the detector's track id. A link
    needs the embedding similarity above ``min_identity`` and either overlap above
    ``link_iou``, the same track, or a clearly similar look. Fragments that never
    share a keyframe and look alike are merged afterwards."""
    idents: list[list[_Box]] = []
    for boxes in boxes_per_frame:
        if not boxes:
            continue
        aff = np.full((len(boxes), len(idents)), _NO_LINK)
        for a, bx in enumerate(boxes):
            for b, ident in enumerate(idents):
                last = ident[-1]
                if last.det.category != bx.det.category:
                    continue
                sim = float(bx.emb @ _mean_emb(ident))
                overlap = iou(bx.det.box, last.det.box)
                same_track = bx.det.track is not None and bx.det.track == last.det.track
                if sim < s.min_identity or not (overlap >= s.link_iou or same_track or sim >= 0.9):
                    continue
                aff[a, b] = 0.8 * sim + 0.1 * overlap + 0.1 * same_track
        assigned = assign(aff, 0.0)
        for a, bx in enumerate(boxes):
            if assigned[a] >= 0:
                idents[assigned[a]].append(bx)
            else:
                idents.append([bx])
    return _merge_fragments(idents, s)


def assign(aff: np.ndarray, floor: float) -> list[int]:
    """Rows to columns maximising the summed affinity; a row may instead stay alone
    (worth ``floor``), so a strong link is never traded for a forced bad one. Returns
    the column per row, -1 for none."""
    n_rows, n_cols = aff.shape
    if n_rows == 0:
        return []
    # imported here: SciPy's optimize package costs a third of a second of start-up to
    # every command and worker that never mines (`opensubject run --until curate`)
    from scipy.optimize import linear_sum_assignment

    padded = np.hstack([aff, np.full((n_rows, n_rows), floor)])
    rows, cols = linear_sum_assignment(-padded)
    out = [-1] * n_rows
    for a, b in zip(rows, cols, strict=True):
        if b < n_cols and aff[a, b] >= floor:
            out[a] = int(b)
    return out


def _mean_emb(ident: list[_Box]) -> np.ndarray:
    v = np.mean([b.emb for b in ident], axis=0)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _merge_fragments(idents: list[list[_Box]], s: MineSettings) -> list[list[_Box]]:
    merged = True
    while merged:
        merged = False
        best = None
        for i in range(len(idents)):
            for j in range(i + 1, len(idents)):
                a, b = idents[i], idents[j]
                if a[0].det.category != b[0].det.category:
                    continue
                if {x.frame for x in a} & {x.frame for x in b}:
                    continue
                sim = float(_mean_emb(a) @ _mean_emb(b))
                if sim >= max(s.min_identity, 0.9) and (best is None or sim > best[0]):
                    best = (sim, i, j)
        if best is not None:
            _, i, j = best
            idents[i] = sorted(idents[i] + idents[j], key=lambda x: x.frame)
            del idents[j]
            merged = True
    return idents


# ------------------------------------- 3b. boxes that hold two subjects, or part of one

# A missing identity's interpolated box that lies at least this much inside another
# identity's box, and covers at most this share of it, is taken to be in there too.
SPLIT_INSIDE = 0.7
SPLIT_MAX_SHARE = 0.8
# A box lying at least this much inside an identity's interpolated box is a piece of it
# when joining the two fits the interpolated box better by this much.
JOIN_INSIDE = 0.8
JOIN_GAIN = 0.15


def predict_box(ident: list[_Box], frame: int, frame_numbers: Sequence[int], skip: Collection[int] = ()
                ) -> tuple[list[float], _Box, _Box] | None:
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


def join_pieces(idents: list[list[_Box]], frame_numbers: Sequence[int]
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


def find_merged(idents: list[list[_Box]], n: int, frame_numbers: Sequence[int]
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


def replace_boxes(idents: list[list[_Box]], changes: list[tuple[int, int, Detection]], frames: Sequence[Image],
                  embedder: Embedder, split: bool, drop: Collection[tuple[int, int]] = ()) -> list[list[_Box]]:
    """Each changed identity gets its new box on the keyframe; the boxes in ``drop``
    ((identity, keyframe): pieces joined into another) go, and identities left empty."""
    if not changes:
        return idents
    embs = embedder.embed([crop(frames[k], d.box) for _, k, d in changes])
    drop = set(drop) | {(i, k) for i, k, _ in changes}
    out = [[b for b in ident if (i, b.frame) not in drop] for i, ident in enumerate(idents)]
    for (i, k, det), emb in zip(changes, embs, strict=True):
        out[i].append(_Box(k, det, emb, split=split))
    return [sorted(ident, key=lambda x: x.frame) for ident in out if ident]


# --------------------------------------------------------------------- 5. pairing

def pair_scores(a: _Box, b: _Box, frame_a: int, frame_b: int, span: int, width: int, height: int,
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


def choose_pairs(ident: list[_Box], usable: set[int], frame_numbers: Sequence[int], width: int, height: int,
                 s: MineSettings, prefer_target: int | None = None
                 ) -> tuple[list[tuple[_Box, _Box, dict[str, float]]], Counter[str]]:
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
    chosen: list[tuple[_Box, _Box, dict[str, float]]] = []
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


# ------------------------------------------------------------------------- the stage

def mine_clip(frames: Sequence[Image], frame_numbers: Sequence[int], *, vlm: VLM, detector: Detector,
              embedder: Embedder, settings: MineSettings) -> MineResult:
    """Subjects and diverse pairs of one clip from its keyframes (in time order)."""
    s = settings
    if len(frames) != len(frame_numbers):
        raise ValueError("frames and frame_numbers differ in length")
    if len(frames) < 2:
        return MineResult([], [], {}, "none", reason="no subject: fewer than two keyframes")
    height, width = frames[0].shape[:2]
    n = len(frames)

    # 1. category consensus (none without a VLM: the detector's subjects stay unnamed)
    kept: dict[str, float] = {}
    asked_info: dict[str, Any] = {"asked": 0, "reason": "no VLM configured"}
    if getattr(vlm, "name", "none") != "none":
        asked = spread_indices(n, s.consensus_frames)
        cons = category_consensus(vlm.list_categories([frames[i] for i in asked]), s.consensus_share,
                                  s.consensus_min_answers)
        asked_info, kept = cons.as_dict(), cons.kept
        if cons.reason and s.without_consensus == "reject":
            return MineResult([], [], {}, vlm.name, reason=cons.reason, details={"consensus": asked_info})
    source = vlm.name if kept else "none"

    # 2. local grounding
    dets = detector.detect(list(frames), sorted(kept))
    wanted = set(kept) | {GENERIC}
    per_frame = [[d for d in fd if normalise_category(d.category) in wanted] for fd in dets]
    flat = [(i, d) for i, fd in enumerate(per_frame) for d in fd]
    if not flat:
        what = f"of {', '.join(sorted(kept))} " if kept else ""
        return MineResult([], [], kept, source,
                          reason=f"no subject: the detector found no subject {what}in {n} keyframes",
                          details={"consensus": asked_info})

    # 3. identities
    embs = embedder.embed([crop(frames[i], d.box) for i, d in flat]) if flat else np.zeros((0, 1))
    boxes: list[list[_Box]] = [[] for _ in range(n)]
    for (i, d), e in zip(flat, embs, strict=True):
        boxes[i].append(_Box(i, Detection(d.box, d.score, normalise_category(d.category), d.track), e))
    idents = link_identities(boxes, s)
    # split first: a box around two subjects must not serve to predict where one of them is
    idents = replace_boxes(idents, find_merged(idents, n, frame_numbers), frames, embedder, split=True)
    joins, pieces = join_pieces(idents, frame_numbers)
    idents = replace_boxes(idents, joins, frames, embedder, split=False, drop=pieces)
    # subject 0 is the most consistently found one (then by score, then place: stable ids)
    idents.sort(key=lambda ident: (-len(ident), -float(np.mean([b.det.score for b in ident])),
                                   ident[0].frame, ident[0].det.box[0], ident[0].det.box[1]))

    subjects: list[SubjectResult] = []
    pairs: list[PairResult] = []
    dropped_total: Counter[str] = Counter()
    names = _name_identities(idents, frames, kept, vlm, source, n)
    usable_of: list[set[int]] = []
    for idx, ident in enumerate(idents):
        category, cat_source, consensus = names[idx]
        flags = {}
        for bx in ident:
            problem = "overlap" if bx.split else box_problem(bx.det.box, width, height, s)
            if problem:
                flags[frame_numbers[bx.frame]] = problem
        usable = {bx.frame for bx in ident if frame_numbers[bx.frame] not in flags}
        subj = SubjectResult(
            idx=idx, category=category, category_source=cat_source, consensus=round(consensus, 4),
            boxes={frame_numbers[bx.frame]: [round(float(v), 2) for v in bx.det.box] for bx in ident},
            scores={frame_numbers[bx.frame]: round(float(bx.det.score), 4) for bx in ident},
            usable=sorted(frame_numbers[i] for i in usable), flags=flags)
        subj.reason = subject_problem(subj, n, s)
        subjects.append(subj)
        usable_of.append(usable)
    # several subjects of the clip paired onto one target frame make a multi-subject sample
    prefer = shared_target([u for u, x in zip(usable_of, subjects, strict=True) if x.reason is None]) \
        if s.shared_targets else None
    for ident, subj, usable in zip(idents, subjects, usable_of, strict=True):
        if subj.reason is None:
            chosen, dropped = choose_pairs(ident, usable, frame_numbers, width, height, s, prefer)
            dropped_total.update(dropped)
            if not chosen:
                subj.reason = "no pair: " + (", ".join(f"{v} {k}" for k, v in sorted(dropped.items()))
                                            or "no two usable keyframes")
            for ref, tgt, sc in chosen:
                pairs.append(PairResult(subj.idx, frame_numbers[ref.frame], frame_numbers[tgt.frame],
                                        subj.boxes[frame_numbers[ref.frame]],
                                        subj.boxes[frame_numbers[tgt.frame]], sc))
        if subj.reason:
            subj.state = "rejected"

    reason = None
    if not pairs:
        reason = "no subject: " + "; ".join(f"subject {x.idx} ({x.category}): {x.reason}" for x in subjects)
    details = {"consensus": asked_info, "keyframes": n, "detections": len(flat), "identities": len(idents),
               "pairs": len(pairs), "dropped_pairs": dict(dropped_total)}
    return MineResult(subjects, pairs, kept, source, reason=reason, details=details)


def subject_problem(subj: SubjectResult, n: int, s: MineSettings) -> str | None:
    seen = len(subj.boxes)
    if subj.category_source == "none" and seen / n < s.consensus_share - 1e-9:
        return f"seen in only {seen} of {n} keyframes"
    if len(subj.usable) >= 2:
        return None
    counts = Counter(subj.flags.values())
    if not counts:
        return f"seen in only {seen} of {n} keyframes"
    problem, k = counts.most_common(1)[0]
    text = {
        "tiny": f"tiny subject: box under {s.min_box_area:.1%} of the frame",
        "full-frame": f"full-frame subject: box over {s.max_box_area:.0%} of the frame",
        "border": "subject touches the frame border",
        "overlap": "subject overlaps another subject",
    }[problem]
    return f"{text} in {k} of {seen} keyframes seen"


def _name_identities(idents: list[list[_Box]], frames: Sequence[Image], kept: dict[str, float], vlm: VLM,
                     source: str, n: int) -> list[tuple[str, str, float]]:
    """(category, category source, consensus) of each identity. Identities only a
    class-agnostic detector found are named by the VLM, all of the clip's in one call."""
    out: list[tuple[str, str, float] | None] = [None] * len(idents)
    views: dict[int, Image] = {}
    for i, ident in enumerate(idents):
        named = Counter(b.det.category for b in ident if b.det.category != GENERIC)
        if named:
            category = named.most_common(1)[0][0]
            out[i] = (category, source, kept.get(category, 0.0))
        elif not kept:
            out[i] = (GENERIC, "none", len({b.frame for b in ident}) / n)
        else:  # a class-agnostic detector with a VLM: ask the VLM what the subject is
            best = max(ident, key=lambda b: (b.det.score, box_area(b.det.box)))
            views[i] = crop(frames[best.frame], best.det.box)
    if views:
        cats = sorted(kept)
        order = sorted(views)
        answers = vlm.ask_yes_no([[views[i]] for i in order for _ in cats],
                                 [f"Is this a {c}? Answer yes or no." for _ in order for c in cats])
        for k, i in enumerate(order):
            got = answers[k * len(cats):(k + 1) * len(cats)]
            yes = [(a.p_yes if a.p_yes is not None else 1.0, c) for a, c in zip(got, cats, strict=True)
                   if a.answer is True]
            if yes:
                category = max(yes)[1]
                out[i] = (category, vlm.name, kept[category])
            else:
                out[i] = (GENERIC, "none", len({b.frame for b in idents[i]}) / n)
    return [x for x in out if x is not None]  # every identity got a name above

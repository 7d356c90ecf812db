"""Stage 2, mine & pair (pure): find the subjects of one clip and choose diverse pairs
of frames that show the same subject. ``mine_clip`` runs the steps in order:

1. Category consensus (``steps/consensus.py``): the VLM names the subjects on a few
   keyframes; a clip without consensus is rejected with the reason (or, when
   configured, grounded class-agnostically). Without a VLM the detector's
   class-agnostic proposals are used, labelled ``object`` with category source ``none``.
2. Local grounding: the detector gives boxes per keyframe for the kept categories.
3. Identities (``steps/identities.py``): boxes are linked across keyframes; several
   subjects per clip are allowed. Pieces of one subject on a keyframe are joined, and a
   box around two overlapping subjects is split (``steps/boxes.py``).
4. Checks: keyframes where a subject is tiny, fills the frame, or touches the frame
   border are not used (``boxes.box_problem``); a subject left with fewer than two
   usable keyframes is rejected with the reason.
5. Diversity-aware pairing (``steps/pairing.py``): the most diverse non-duplicate pairs
   of each subject's usable keyframes; with several subjects in a clip, each first takes
   its best pair whose target is the keyframe most of them are usable on
   (``shared_targets``), so their samples can be combined into one multi-subject sample.

Boxes are in keyframe pixels. Everything is deterministic for the same inputs.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from opensubject_tasks.backends.base import VLM, Detection, Detector, Embedder, Image
from opensubject_tasks.backends.categories import normalise_category
from opensubject_tasks.config import MineSettings
from opensubject_tasks.geometry import box_area
from opensubject_tasks.steps.boxes import box_problem, crop, find_merged, join_pieces, replace_boxes
from opensubject_tasks.steps.consensus import category_consensus, spread_indices
from opensubject_tasks.steps.identities import TrackedBox, link_identities
from opensubject_tasks.steps.pairing import choose_pairs, shared_target

GENERIC = "object"  # the label of a subject nobody named


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
    boxes: list[list[TrackedBox]] = [[] for _ in range(n)]
    for (i, d), e in zip(flat, embs, strict=True):
        boxes[i].append(TrackedBox(i, Detection(d.box, d.score, normalise_category(d.category), d.track), e))
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


def _name_identities(idents: list[list[TrackedBox]], frames: Sequence[Image], kept: dict[str, float],
                     vlm: VLM, source: str, n: int) -> list[tuple[str, str, float]]:
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

"""Identities (pure): a clip's boxes linked across its keyframes into subjects.

Boxes are linked by detector track, overlap and embedding similarity; several subjects
per clip are allowed, and fragments of one subject that never share a keyframe are merged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from opensubject_tasks.backends.base import Detection
from opensubject_tasks.config import MineSettings
from opensubject_tasks.geometry import iou


@dataclass
class TrackedBox:
    """A detection on one keyframe with the embedding of its crop: what an identity is made of."""
    frame: int                 # index into the clip's keyframes
    det: Detection
    emb: np.ndarray
    split: bool = False        # cut out of a box that held another subject too


_NO_LINK = -1e3  # affinity of a box and an identity that must not be linked


def link_identities(boxes_per_frame: Sequence[Sequence[TrackedBox]], s: MineSettings
                    ) -> list[list[TrackedBox]]:
    """Link boxes across keyframes into identities (Hungarian assignment per keyframe).

    Affinity of a box to an identity: embedding similarity to the identity's mean,
    overlap with its latest box, and agreement of the detector's track id. A link
    needs the embedding similarity above ``min_identity`` and either overlap above
    ``link_iou``, the same track, or a clearly similar look. Fragments that never
    share a keyframe and look alike are merged afterwards."""
    idents: list[list[TrackedBox]] = []
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


def _mean_emb(ident: list[TrackedBox]) -> np.ndarray:
    v = np.mean([b.emb for b in ident], axis=0)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _merge_fragments(idents: list[list[TrackedBox]], s: MineSettings) -> list[list[TrackedBox]]:
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

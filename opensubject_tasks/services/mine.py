"""Stage 2 service: mine the kept clips of one video, write subjects, pairs and one
pending sample per pair.

Idempotent: ids are derived from the clip, the subject's index and the pair's frames
(``<clip>-s<i>``, ``<subject>-p<ref>-<tgt>``, sample id = pair id), and the rows are
written with ``stage_done`` in one transaction. A re-run of a video that completed mining
changes nothing and hands on its unfinished samples: a VLM or detector that answers
differently the second time cannot replace the subjects and pairs that verified samples
were made from. Redoing it is an explicit recompute (services/rerun.py).
"""
from __future__ import annotations

import numpy as np
from sqlalchemy import Select, select

from opensubject_tasks.backends.base import Image
from opensubject_tasks.catalogue import SAMPLE_IN_FLIGHT, follow, stage_reached
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.lineage import lineage
from opensubject_tasks.db.models import Clip, Pair, Sample, Subject, Video
from opensubject_tasks.errors import BadInput, Rejected
from opensubject_tasks.services.common import StageResult, already_done, stage, utcnow
from opensubject_tasks.steps.subjects import MineResult, mine_clip
from opensubject_tasks.steps.verdict import sample_seed
from opensubject_tasks.storage import ObjectStore

MINABLE_CLIP_STATES = ("kept", "mined")


def decode_rgb(data: bytes, what: str) -> Image:
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise BadInput(f"{what} is not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_keyframes(store: ObjectStore, clip_id: str, keyframes: list[dict]) -> tuple[list[Image], list[int]]:
    frames, numbers = [], []
    for kf in sorted(keyframes, key=lambda k: int(k["frame"])):
        try:
            data = store.get_bytes(kf["key"])
        except FileNotFoundError as exc:
            raise BadInput(f"clip {clip_id}: keyframe {kf['key']} is missing from the store") from exc
        frames.append(decode_rgb(data, f"clip {clip_id} keyframe {kf['key']}"))
        numbers.append(int(kf["frame"]))
    return frames, numbers


def subject_id(clip_id: str, idx: int) -> str:
    return f"{clip_id}-s{idx}"


def pair_id(subj_id: str, ref_frame: int, tgt_frame: int) -> str:
    return f"{subj_id}-p{ref_frame}-{tgt_frame}"


@hot_query("stage run", lambda f: {"video_id": f.video})
def minable_clips(video_id: str) -> Select:
    return select(Clip).where(Clip.video_id == video_id, Clip.state.in_(MINABLE_CLIP_STATES)).order_by(Clip.idx)


@stage("mine")
def mine_video(ctx: Context, video_id: str) -> StageResult:
    with session_scope(ctx.sessions) as s:
        video = s.get(Video, video_id)
        if video is None:
            raise BadInput(f"video {video_id} does not exist")
        if stage_reached(video.stage_done, "mine"):
            return _mined_already(s, video)
        build_id = video.build_id
        clips = [(c.id, list(c.keyframes or [])) for c in s.scalars(minable_clips(video_id))]
    if not clips:
        raise Rejected("no subject: the video has no kept clip to mine")

    settings = ctx.settings
    vlm, detector, embedder = ctx.backend("vlm"), ctx.backend("detector"), ctx.backend("embedder")
    backends = {"vlm": vlm.name, "detector": detector.name, "embedder": embedder.name}
    results: list[tuple[str, MineResult]] = []
    for clip_id, keyframes in clips:
        frames, numbers = load_keyframes(ctx.store, clip_id, keyframes)
        if len({f.shape for f in frames}) > 1:
            raise BadInput(f"clip {clip_id}: keyframes differ in size")
        results.append((clip_id, mine_clip(frames, numbers, vlm=vlm, detector=detector,
                                           embedder=embedder, settings=settings.mine)))

    sample_ids = _write(ctx, video_id, build_id, results, backends)
    details = {"backends": backends, "clips": {
        cid: {"subjects": len(r.subjects), "kept": sum(x.state == "kept" for x in r.subjects),
              "pairs": len(r.pairs), "reason": r.reason, **r.details} for cid, r in results}}
    if not sample_ids:
        reasons = "; ".join(f"{cid}: {r.reason}" for cid, r in results)
        raise Rejected(f"no subject pair found ({reasons})"[:2000])

    with session_scope(ctx.sessions) as s:
        states = dict(s.execute(select(Sample.id, Sample.state).where(Sample.id.in_(sample_ids))).all())
    details["samples"] = len(sample_ids)
    return StageResult(next=_follow_up(video_id, states), details=details)


def _follow_up(video_id: str, states: dict[str, str]) -> list[tuple[str, str]]:
    """The video's samples unit, while any of its samples is unfinished."""
    return follow("mine", video_id) if any(st in SAMPLE_IN_FLIGHT for st in states.values()) else []


def _mined_already(s, video: Video) -> StageResult:  # noqa: ANN001 - an open session
    states = dict(s.execute(
        lineage(select(Sample.id, Sample.state), Sample, Clip).where(Clip.video_id == video.id)).all())
    if not states:
        return already_done("mine", "no subject pair", status="rejected",
                            reason=video.reason or "no subject pair found")
    return already_done("mine", f"{len(states)} sample(s)", next=_follow_up(video.id, states))


def _write(ctx: Context, video_id: str, build_id: str | None, results: list[tuple[str, MineResult]],
           backends: dict[str, str]) -> list[str]:
    """Upsert this video's subjects, pairs and samples in one transaction; returns the
    sample ids in a stable order."""
    base_seed = ctx.settings.synth.base_seed
    subjects, pairs, samples = [], [], []
    for clip_id, r in results:
        for subj in r.subjects:
            sid = subject_id(clip_id, subj.idx)
            subjects.append(Subject(
                id=sid, clip_id=clip_id, idx=subj.idx, category=subj.category,
                category_source=subj.category_source, consensus=subj.consensus,
                boxes={str(f): b for f, b in sorted(subj.boxes.items())},
                backends={**backends, "category": subj.category_source},
                state=subj.state, reason=subj.reason))
        for p in r.pairs:
            sid = subject_id(clip_id, p.subject_idx)
            pid = pair_id(sid, p.ref_frame, p.tgt_frame)
            pairs.append(Pair(id=pid, subject_id=sid, ref_frame=p.ref_frame, tgt_frame=p.tgt_frame,
                              ref_box=p.ref_box, tgt_box=p.tgt_box, scores=p.scores))
            samples.append(pid)
    with session_scope(ctx.sessions) as s:
        # A video that has not completed mining has no subject rows (they are written with
        # stage_done in this transaction, or dropped by a recompute); merge keeps a run that
        # races this one (it holds the video's lock) from failing on a taken id.
        for row in subjects:
            s.merge(row)
        s.flush()
        for row in pairs:
            s.merge(row)
        s.flush()
        existing = {sid: row for sid, row in
                    ((x.id, x) for x in s.scalars(select(Sample).where(Sample.id.in_(samples))))}
        now = utcnow()
        for sid in samples:
            row = existing.get(sid)
            if row is None:
                s.add(Sample(id=sid, pair_id=sid, build_id=build_id, state="pending", attempt=1,
                             seed=sample_seed(sid, 1, base_seed), keys={}, backends={}, history=[],
                             queued_at=now))
            elif row.build_id != build_id:
                row.build_id = build_id
        for clip_id, r in results:
            clip = s.get(Clip, clip_id)
            if clip is not None:
                clip.state, clip.reason = "mined", r.reason
        video = s.get(Video, video_id)
        if video is not None:
            video.stage_done = "mine"
            if samples and video.state in ("failed", "rejected"):  # a re-run found work again
                video.state, video.reason = "running", None
    return samples

"""Re-running one stage of one video, and the explicit recompute that may drop work.

A plain re-run goes through ``run_stage`` like any other run: a stage the video completed
returns what it produced the first time and changes nothing (services/curate.py,
services/mine.py), so clearing a task, retrying a video or re-running a build keeps every
verified sample.

``invalidate`` is the only code path that removes what later stages built on a video. It
runs when an operator asks for it (``opensubject rerun STAGE VIDEO --recompute``): it
deletes bottom-up (samples, pairs, subjects, then clips for curate), records one
``invalidations`` row per row it removes, with the store objects removed with it, the
reason and who asked, and resets the video so that the stage runs again from scratch.
"""
from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass

from sqlalchemy import delete, select

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.locks import entity_lock
from opensubject_tasks.db.models import Clip, Invalidation, Pair, Sample, StageAttempt, Subject, Video
from opensubject_tasks.errors import BadInput
from opensubject_tasks.storage.base import safe_key

RERUN_STAGES = ("curate", "mine")
# The video's last completed stage after a recompute of each stage.
_RESET_TO = {"curate": None, "mine": "curate"}


class WorkInFlight(BadInput):
    """The video is being worked on right now: recompute it once that has ended."""


@dataclass
class Invalidated:
    rows: int = 0       # rows removed (clips, subjects, pairs, samples)
    objects: int = 0    # store objects removed with them

    def __str__(self) -> str:
        return f"{self.rows} row(s) and {self.objects} object(s) invalidated"


def default_actor() -> str:
    """Who is asking: OPENSUBJECT_ACTOR (an orchestrator passes its run), else user@host."""
    actor = os.environ.get("OPENSUBJECT_ACTOR", "").strip()
    if actor:
        return actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def check_rerun(ctx: Context, stage: str, video_id: str) -> Video:
    """The video, or BadInput with a sentence saying what is wrong."""
    if stage not in RERUN_STAGES:
        raise BadInput(f"cannot re-run {stage!r}: re-runs take a video stage ({', '.join(RERUN_STAGES)})")
    with session_scope(ctx.sessions) as s:
        video = s.get(Video, video_id)
        if video is None:
            raise BadInput(f"no video with id {video_id!r} in this database "
                           "(`opensubject status --json` lists the video ids)")
        return video


def invalidate(ctx: Context, stage: str, video_id: str, *, reason: str, actor: str | None = None) -> Invalidated:
    """Drop what ``stage`` and every later stage produced for the video, recording each row
    and object removed; the video is left ready for ``stage`` to run from scratch."""
    check_rerun(ctx, stage, video_id)
    actor = actor or default_actor()
    # The video's lock: no curate or mine of it runs while its rows go.
    with entity_lock(ctx.engine, f"video:{video_id}", wait_s=5.0):
        with session_scope(ctx.sessions) as s:
            clips = list(s.scalars(select(Clip).where(Clip.video_id == video_id).order_by(Clip.idx)))
            subjects = list(s.scalars(select(Subject).where(Subject.clip_id.in_([c.id for c in clips]))
                                      .order_by(Subject.id)))
            pairs = list(s.scalars(select(Pair).where(Pair.subject_id.in_([x.id for x in subjects]))
                                   .order_by(Pair.id)))
            samples = list(s.scalars(select(Sample).where(Sample.pair_id.in_([p.id for p in pairs]))
                                     .order_by(Sample.id)))
            busy = s.scalars(select(StageAttempt.entity_id).where(
                StageAttempt.status == "running",
                ((StageAttempt.entity_type == "video") & (StageAttempt.entity_id == video_id))
                | ((StageAttempt.entity_type == "sample") & StageAttempt.entity_id.in_([x.id for x in samples])))
                .limit(1)).first()
            if busy is not None:
                raise WorkInFlight(f"video {video_id} has a stage running now ({busy}); "
                                   "recompute it once that has ended")
            # (kind, id): a sample's id is its pair's id
            objects = {("sample", x.id): _listed(ctx, safe_key("videos", video_id, "samples", x.id) + "/")
                       for x in samples}
            if stage == "curate":
                objects.update({("clip", c.id): _listed(ctx, safe_key("videos", video_id, "clips", c.id) + "/")
                                for c in clips})

            def record(kind: str, entity_id: str, state: str | None) -> None:
                s.add(Invalidation(actor=actor, reason=reason, stage=stage, video_id=video_id,
                                   entity_type=kind, entity_id=entity_id, state=state,
                                   objects=objects.get((kind, entity_id), [])))

            for x in samples:
                record("sample", x.id, x.state)
            for p in pairs:
                record("pair", p.id, None)
            for x in subjects:
                record("subject", x.id, x.state)
            s.execute(delete(Sample).where(Sample.id.in_([x.id for x in samples])))
            s.execute(delete(Pair).where(Pair.id.in_([p.id for p in pairs])))
            s.execute(delete(Subject).where(Subject.id.in_([x.id for x in subjects])))
            removed = len(samples) + len(pairs) + len(subjects)
            if stage == "curate":
                for c in clips:
                    record("clip", c.id, c.state)
                s.execute(delete(Clip).where(Clip.video_id == video_id))
                removed += len(clips)
            else:
                for c in clips:
                    if c.state == "mined":
                        c.state, c.reason = "kept", None
            row = s.get(Video, video_id)
            row.stage_done = _RESET_TO[stage]
            row.state = "running" if row.build_id else "registered"
            row.reason = None
    # Rows first, then objects: a crash in between leaves unreferenced objects (harmless,
    # recorded above), never a row that points to a missing object.
    keys = [k for ks in objects.values() for k in ks]
    for key in keys:
        ctx.store.delete(key)
    return Invalidated(rows=removed, objects=len(keys))


def _listed(ctx: Context, prefix: str) -> list[str]:
    return sorted(info.key for info in ctx.store.list(prefix))

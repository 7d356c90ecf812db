"""Handing work to the queues, recorded on its row first.

PostgreSQL is the source of truth for work; a broker message is only derived from it.
Every unit of work is a stage of a video (curate, mine, samples: a video's samples are
synthesized and verified together, in batches), and every hand-off writes
``videos.queued_stage`` / ``queued_task_id`` / ``queued_at`` before the message is sent. A
message the broker loses
(a restart without persistence, a flush, a dropped publish) therefore loses no work: the
reconciler (services/reconcile.py) finds the unit outstanding and sends it again.

The caller passes ``send(stage, entity_id, task_id=...)``: nothing here knows Celery.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Update, bindparam, update
from sqlalchemy.orm import Session

from opensubject_tasks.catalogue import VIDEO_STAGES
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.models import Video, utcnow
from opensubject_tasks.services.common import Send

__all__ = ["Send", "hand_out_videos", "record_hand_out"]


@hot_query("hand-out", lambda f: {"stage": "curate", "now": utcnow(), "again": True},
           binds=lambda f: {"vid": f.video, "tid": "task"})
def hand_out_statement(stage: str, now: datetime, again: bool) -> Update:
    """Record one hand-off (run once per video, parameters ``vid`` and ``tid``)."""
    table = Video.__table__
    values = {"queued_stage": stage, "queued_task_id": bindparam("tid"), "queued_at": now, "updated_at": now}
    if again:
        values["resends"] = table.c.resends + 1
    return update(table).where(table.c.id == bindparam("vid")).values(**values)


def hand_out_videos(ctx: Context, stage: str, video_ids: Iterable[str], send: Send,
                    again: bool = False) -> list[str]:
    """Hand ``stage`` of each video to its queue, recording it first (one round trip for
    all of them); returns the Celery task ids, in the order of ``video_ids``. ``again``:
    the videos were handed out before (lost, retried, resumed): counted in ``resends``."""
    ids = list(video_ids)
    with session_scope(ctx.sessions) as s:
        task_ids = record_hand_out(s, stage, ids, again)
    for vid, tid in zip(ids, task_ids, strict=True):
        send(stage, vid, task_id=tid)
    return task_ids


def record_hand_out(s: Session, stage: str, video_ids: list[str], again: bool = False) -> list[str]:
    """Record the hand-off of ``stage`` of each video in the caller's transaction; returns
    the task ids to send them under once it has committed."""
    if stage not in VIDEO_STAGES:
        raise ValueError(f"{stage!r} is not a video stage ({', '.join(VIDEO_STAGES)})")
    if not video_ids:
        return []
    task_ids = [str(uuid.uuid4()) for _ in video_ids]
    s.connection().execute(hand_out_statement(stage, utcnow(), again),
                           [{"vid": v, "tid": t} for v, t in zip(video_ids, task_ids, strict=True)])
    return task_ids

"""Handing work to the queues, recorded on its row first.

PostgreSQL is the source of truth for work; a broker message is only derived from it.
Every hand-off writes the row it is for before the message is sent: a video stage sets
``videos.queued_stage`` / ``queued_task_id`` / ``queued_at``; a sample's next stage
follows from its state and sets ``samples.queued_at``. A message the broker loses
(a restart without persistence, a flush, a dropped publish) therefore loses no work: the
reconciler (services/reconcile.py) finds the unit outstanding and sends it again.

The caller passes ``send(stage, entity_id, task_id=...)``: nothing here knows Celery.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from sqlalchemy import bindparam, select, update

from opensubject_tasks.catalogue import NEXT_SAMPLE_STAGE, SAMPLE_IN_FLIGHT, SAMPLE_STAGES, VIDEO_STAGES
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Sample, Video, utcnow

Send = Callable[..., object]  # send(stage, entity_id, task_id=None)


def hand_out_videos(ctx: Context, stage: str, video_ids: Iterable[str], send: Send,
                    again: bool = False) -> list[str]:
    """Hand ``stage`` of each video to its queue, recording it first (one round trip for
    all of them); returns the Celery task ids, in the order of ``video_ids``. ``again``:
    the videos were handed out before (lost, retried, resumed): counted in ``resends``."""
    if stage not in VIDEO_STAGES:
        raise ValueError(f"{stage!r} is not a video stage ({', '.join(VIDEO_STAGES)})")
    ids = list(video_ids)
    if not ids:
        return []
    task_ids = [str(uuid.uuid4()) for _ in ids]
    now = utcnow()
    with session_scope(ctx.sessions) as s:
        table = Video.__table__
        values = {"queued_stage": stage, "queued_task_id": bindparam("tid"), "queued_at": now}
        if again:
            values["resends"] = table.c.resends + 1
        s.connection().execute(update(table).where(table.c.id == bindparam("vid")).values(**values),
                               [{"vid": v, "tid": t} for v, t in zip(ids, task_ids, strict=True)])
    for vid, tid in zip(ids, task_ids, strict=True):
        send(stage, vid, task_id=tid)
    return task_ids


def hand_out_samples(ctx: Context, sample_ids: Iterable[str], send: Send) -> list[tuple[str, str]]:
    """Hand each in-flight sample among ``sample_ids`` its next stage (synthesize when
    pending, verify when synthesized); finished samples are left alone. Returns the
    (stage, sample) pairs sent."""
    ids = sorted(set(sample_ids))
    if not ids:
        return []
    with session_scope(ctx.sessions) as s:
        rows = s.execute(select(Sample.id, Sample.state)
                         .where(Sample.id.in_(ids), Sample.state.in_(SAMPLE_IN_FLIGHT))
                         .order_by(Sample.id)).all()
        work = [(NEXT_SAMPLE_STAGE[state], sid) for sid, state in rows]
        if work:
            s.execute(update(Sample).where(Sample.id.in_([sid for _, sid in work]))
                      .values(queued_at=utcnow()).execution_options(synchronize_session=False))
    for stage, sid in work:
        send(stage, sid)
    return work


def hand_out_sample_stage(ctx: Context, stage: str, sample_id: str, send: Send) -> None:
    """Hand one sample stage to its queue (a sample's own next step: synthesize -> verify,
    or verify -> synthesize for a re-synthesis)."""
    if stage not in SAMPLE_STAGES:
        raise ValueError(f"{stage!r} is not a sample stage ({', '.join(SAMPLE_STAGES)})")
    with session_scope(ctx.sessions) as s:
        s.execute(update(Sample).where(Sample.id == sample_id).values(queued_at=utcnow())
                  .execution_options(synchronize_session=False))
    send(stage, sample_id)

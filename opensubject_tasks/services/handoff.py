"""Handing work to the queues, recorded on its row first.

PostgreSQL is the source of truth for work; a broker message is only derived from it.
Every unit of work is a stage of a video (curate, mine, samples: a video's samples are
synthesized and verified together, in batches), and every hand-off writes
``videos.queued_stage`` / ``queued_task_id`` / ``queued_at`` before the message is sent. A
message the broker loses
(a restart without persistence, a flush, a dropped publish) therefore loses no work: the
reconciler (services/reconcile.py) finds the unit outstanding and sends it again.

The caller passes ``send(stage, entity_id, task_id=...)``: nothing here knows Celery.

A build hands its videos out continuously, not in waves: a chunk registers its videos as
waiting (``videos.flow = 'waiting'``), at most ``celery.max_videos_in_flight`` videos are
queued or running at once (``flow = 'queued'``), and each video that leaves the queues pulls
the next waiting one, from any chunk of any build, in the transaction that records its end
(``leave_flight``, called by the chain). A slow or lost video holds one place, never a
wave. The reconciler frees the places of videos that ended outside the chain (a task that
gave up) and fills them (``top_up``).
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import datetime

from sqlalchemy import Select, Update, bindparam, func, select, text, update
from sqlalchemy.orm import Session

from opensubject_tasks.catalogue import FIRST_STAGE, VIDEO_STAGES, VIDEO_TERMINAL, settled
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.models import Video, utcnow

# send(stage, entity_id, task_id=None): puts a task on its queue
Send = Callable[..., object]

__all__ = ["Send", "hand_out_videos", "leave_flight", "pull_waiting", "record_hand_out", "top_up", "wait_for_hand_out"]


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


# --- the bound on videos in flight ------------------------------------------------------------
# Serializes the count-then-fill of free places (a chunk's start, a reconcile pass) so that two
# fills never pass the bound together; held to the end of a short transaction (PostgreSQL
# only: the embedded SQLite runner has one writer). A video leaving the queues does not take
# it: it hands its own place to one waiting video, which leaves the count unchanged.
_FLOW_LOCK = 0x6F736266


@hot_query("video settled", lambda f: {})
def in_flight_count() -> Select:
    """Videos handed out and not yet left the queues (a partial index holds just them)."""
    return select(func.count()).select_from(Video).where(Video.flow == "queued")


@hot_query("video settled", lambda f: {"limit": 1})
def next_waiting(limit: int) -> Select:
    """The next waiting videos, from any chunk, skipping rows another pull holds."""
    return (select(Video.id).where(Video.flow == "waiting").order_by(Video.id).limit(limit)
            .with_for_update(skip_locked=True))


@hot_query("video settled", lambda f: {"video_id": f.video})
def flow_of(video_id: str) -> Select:
    return select(Video.state, Video.stage_done, Video.flow).where(Video.id == video_id)


def wait_for_hand_out(s: Session, video_ids: list[str], again: bool = False) -> None:
    """Register videos as waiting for a place in flight (their chunk's start). ``again``:
    handed out before (retried after an error): counted in ``resends``."""
    values = {"flow": "waiting", "queued_at": None, **({"resends": Video.resends + 1} if again else {})}
    for i in range(0, len(video_ids), 1000):
        s.execute(update(Video).where(Video.id.in_(video_ids[i:i + 1000])).values(**values)
                  .execution_options(synchronize_session=False))


def pull_waiting(s: Session, max_in_flight: int) -> list[tuple[str, str, str]]:
    """Hand waiting videos to the first stage while fewer than the bound are in flight, recorded
    in the caller's transaction; returns (stage, video, task id) to send once committed."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _FLOW_LOCK})
    return _hand_out_waiting(s, max_in_flight - int(s.scalar(in_flight_count()) or 0))


def _hand_out_waiting(s: Session, count: int) -> list[tuple[str, str, str]]:
    ids = list(s.scalars(next_waiting(count))) if count > 0 else []
    if not ids:
        return []
    s.execute(update(Video).where(Video.id.in_(ids)).values(flow="queued")
              .execution_options(synchronize_session=False))
    return [(FIRST_STAGE, v, t) for v, t in zip(ids, record_hand_out(s, FIRST_STAGE, ids), strict=True)]


def leave_flight(s: Session, video_id: str, until: str) -> list[tuple[str, str, str]]:
    """In the transaction that records a stage's end: a video its build needs nothing more
    from gives its place to the next waiting video (one for one: no lock, no count; a place
    no video waits for is filled by the next ``top_up``). Returns the messages to send."""
    row = s.execute(flow_of(video_id)).first()
    if row is None or row.flow != "queued" or not settled(row.state, row.stage_done, until):
        return []
    s.execute(update(Video).where(Video.id == video_id).values(flow=None)
              .execution_options(synchronize_session=False))
    return _hand_out_waiting(s, 1)


@hot_query("reconcile pass", lambda f: {})
def ended_in_flight() -> Update:
    """Videos counted in flight that ended outside the chain (a task that gave up)."""
    return (update(Video).where(Video.flow == "queued", Video.state.in_(VIDEO_TERMINAL))
            .values(flow=None).execution_options(synchronize_session=False))


def top_up(ctx: Context, send: Send, max_in_flight: int | None = None) -> list[tuple[str, str]]:
    """Free the places of videos that ended outside the chain and fill every free place
    (a reconcile pass, and a chunk's start); returns the (stage, video) handed out."""
    bound = ctx.settings.celery.max_videos_in_flight if max_in_flight is None else max_in_flight
    with session_scope(ctx.sessions) as s:
        s.execute(ended_in_flight())
        sends = pull_waiting(s, bound)
    for stage, vid, tid in sends:
        send(stage, vid, task_id=tid)
    return [(stage, vid) for stage, vid, _ in sends]

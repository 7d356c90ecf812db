"""Send again the work whose queue message is gone.

PostgreSQL is the source of truth for work; a message on the broker is only derived from
it. Every hand-off to a queue is recorded on the row it is for before the message is
sent: ``samples.queued_at`` (the next stage follows from the sample's state),
``videos.queued_stage/queued_task_id/queued_at`` (curate, mine) and the same columns on
``builds`` (export). A broker that loses its messages (a restart without persistence, a
flush, a dropped publish) therefore loses no work: ``reconcile`` finds every unit still
outstanding long after it was queued and hands it out again. Stages are idempotent, so a
duplicate is harmless; video and build stages go out under the task id recorded at the
first hand-off, so whoever waits on that id (an Airflow trigger) sees it finish.

A unit is outstanding when its entity is not finished, its build is running, it was
queued more than ``older_than_s`` ago, its message is not on the broker (``waiting``,
when the caller can tell: queued, or delivered and not yet acknowledged) and no attempt
on it is still running. A task runs with its message unacknowledged (``acks_late``), so
with the broker's view an attempt marked running for longer than ``older_than_s`` whose
message is gone is dead (its final status could not be written: the database was down,
the process was killed); without it, only one older than the stage's hard time limit
is. The broker's view also keeps a long backlog from being duplicated at every pass.

This module knows nothing of Celery: the caller passes ``enqueue(stage, entity_id)``.
"""
from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Collection
from datetime import datetime, timedelta

from sqlalchemy import select, update

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Build, Sample, StageAttempt, Video
from opensubject_tasks.services.common import stage_reached, utcnow
from opensubject_tasks.services.resynth import IN_FLIGHT, NEXT_STAGE

Enqueue = Callable[[str, str], object]  # (stage, entity_id) -> anything

VIDEO_STAGES = ("curate", "mine")
BUILD_STAGES = ("export",)
TERMINAL_VIDEO = ("done", "rejected", "failed")
ENDED = ("ok", "rejected", "failed")  # attempt statuses after which a stage needs no resend


# --- recording hand-offs -------------------------------------------------------------------
def record_queued(ctx: Context, stage: str, entity_id: str) -> str | None:
    """Record that ``stage`` of a video or build is being handed to a queue; returns the
    Celery task id to send it under (None for work this module does not track: samples
    record their own hand-offs, ingest and maintenance tasks need none)."""
    model = Video if stage in VIDEO_STAGES else Build if stage in BUILD_STAGES else None
    if model is None:
        return None
    task_id = str(uuid.uuid4())
    with session_scope(ctx.sessions) as s:
        s.execute(update(model).where(model.id == entity_id)
                  .values(queued_stage=stage, queued_task_id=task_id, queued_at=utcnow())
                  .execution_options(synchronize_session=False))
    return task_id


def queued_task_id(ctx: Context, stage: str, entity_id: str) -> str | None:
    """The task id a video or build stage was first handed out under (None: a new one)."""
    model = Video if stage in VIDEO_STAGES else Build if stage in BUILD_STAGES else None
    if model is None:
        return None
    with session_scope(ctx.sessions) as s:
        return s.scalar(select(model.queued_task_id).where(model.id == entity_id,
                                                           model.queued_stage == stage))


# --- finding outstanding work --------------------------------------------------------------------
def _alive_since(ctx: Context, older_than_s: float, stages: Collection[str], now: datetime,
                 broker_known: bool) -> datetime:
    """Running attempts that started after this time may still be working."""
    if broker_known:
        return now - timedelta(seconds=older_than_s)
    hard = max(ctx.settings.celery.limits(st).hard_s for st in stages)
    return now - timedelta(seconds=max(older_than_s, hard))


def _running(s, entity_type: str, ids: list[str], since: datetime) -> set[str]:  # noqa: ANN001
    if not ids:
        return set()
    return set(s.scalars(select(StageAttempt.entity_id).where(
        StageAttempt.entity_type == entity_type, StageAttempt.entity_id.in_(ids),
        StageAttempt.status == "running", StageAttempt.started_at > since)))


def reconcile(ctx: Context, enqueue: Enqueue, *, older_than_s: float,
              waiting: Collection[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Hand out again every outstanding unit of work queued more than ``older_than_s``
    seconds ago; returns the ``(stage, entity_id)`` pairs sent.

    ``waiting``: ``(stage, entity_id)`` of the messages on the broker now (None: unknown;
    then age alone decides, and running attempts are trusted up to the hard time limit).
    Rows are locked (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and their ``queued_at``
    moved to now in the transaction that picks them, so two reconcilers never hand out the
    same unit.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=older_than_s)
    known = waiting is not None
    waiting = set(waiting or ())
    with session_scope(ctx.sessions) as s:
        running_builds = select(Build.id).where(Build.state == "running")
        synth_on = Build.params["synthesize"].as_boolean()

        # Samples: the next stage follows from the state.
        rows = s.execute(
            select(Sample.id, Sample.state).join(Build, Build.id == Sample.build_id)
            .where(Build.state == "running", Sample.state.in_(IN_FLIGHT),
                   Sample.queued_at.is_not(None), Sample.queued_at < cutoff,
                   synth_on.is_not(False))
            .order_by(Sample.id).with_for_update(of=Sample, skip_locked=True)).all()
        busy = _running(s, "sample", [r.id for r in rows],
                        _alive_since(ctx, older_than_s, NEXT_STAGE.values(), now, known))
        samples = [(NEXT_STAGE[r.state], r.id) for r in rows
                   if r.id not in busy and (NEXT_STAGE[r.state], r.id) not in waiting]

        # Videos: the stage handed out last, until the video records it done.
        rows = s.execute(
            select(Video.id, Video.queued_stage, Video.stage_done)
            .where(Video.build_id.in_(running_builds), Video.state.not_in(TERMINAL_VIDEO),
                   Video.queued_stage.in_(VIDEO_STAGES), Video.queued_at < cutoff)
            .order_by(Video.id).with_for_update(of=Video, skip_locked=True)).all()
        rows = [r for r in rows if not stage_reached(r.stage_done, r.queued_stage)]
        busy = _running(s, "video", [r.id for r in rows],
                        _alive_since(ctx, older_than_s, VIDEO_STAGES, now, known))
        videos = [(r.queued_stage, r.id) for r in rows
                  if r.id not in busy and (r.queued_stage, r.id) not in waiting]

        # Builds: export, until an export attempt has ended after the hand-off.
        rows = s.execute(
            select(Build.id, Build.queued_stage, Build.queued_at)
            .where(Build.state == "running", Build.queued_stage.in_(BUILD_STAGES), Build.queued_at < cutoff)
            .order_by(Build.id).with_for_update(of=Build, skip_locked=True)).all()
        ended = set(s.execute(
            select(StageAttempt.stage, StageAttempt.entity_id)
            .join(Build, Build.id == StageAttempt.entity_id)
            .where(StageAttempt.entity_type == "build", StageAttempt.entity_id.in_([r.id for r in rows]),
                   StageAttempt.status.in_(ENDED), StageAttempt.finished_at >= Build.queued_at)).tuples())
        rows = [r for r in rows if (r.queued_stage, r.id) not in ended]
        busy = _running(s, "build", [r.id for r in rows],
                        _alive_since(ctx, older_than_s, BUILD_STAGES, now, known))
        builds = [(r.queued_stage, r.id) for r in rows
                  if r.id not in busy and (r.queued_stage, r.id) not in waiting]

        for model, units in ((Sample, samples), (Video, videos), (Build, builds)):
            if units:
                s.execute(update(model).where(model.id.in_([e for _, e in units])).values(queued_at=now)
                          .execution_options(synchronize_session=False))
        work = samples + videos + builds
    for stage, entity_id in work:
        enqueue(stage, entity_id)
    return work


# --- what the broker still holds -----------------------------------------------------------------
# kombu's Redis transport: one list per queue (and per priority step), plus a hash of the
# messages delivered to a worker and not yet acknowledged (countdown retries wait there).
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
_UNACKED = "unacked"


def _unit(raw: bytes | str, prefix: str) -> tuple[str, str] | None:
    """(stage, first argument) of one Celery message (protocol 2, JSON body)."""
    try:
        msg = json.loads(raw)
        if isinstance(msg, list):  # an unacked entry: [message, exchange, routing_key]
            msg = msg[0]
        name = msg["headers"]["task"]
        body = json.loads(base64.b64decode(msg["body"])) if msg.get("properties", {}).get(
            "body_encoding") == "base64" else json.loads(msg["body"])
        args = body[0]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    if not (isinstance(name, str) and name.startswith(prefix) and args):
        return None
    return name[len(prefix):], str(args[0])


def waiting_in_redis(broker_url: str, queues: Collection[str], task_prefix: str,
                     key_prefix: str = "") -> set[tuple[str, str]] | None:
    """``(stage, entity_id)`` of every message a Redis broker holds for ``queues``, queued
    or delivered and unacknowledged; None when the broker is not Redis. ``key_prefix``:
    the transport's ``global_keyprefix``."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        raw: list[bytes] = []
        for q in queues:
            for key in (q, *(f"{q}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS)):
                raw += client.lrange(key_prefix + key, 0, -1)
        raw += client.hvals(key_prefix + _UNACKED)
    finally:
        client.close()
    return {u for u in (_unit(r, task_prefix) for r in raw) if u is not None}

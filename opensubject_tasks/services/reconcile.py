"""Send again the work whose queue message is gone: the one repair path.

PostgreSQL is the source of truth for work; a message on the broker is only derived from
it. Every hand-off is recorded on its video's row before the message is sent
(services/handoff.py: ``videos.queued_stage/queued_at``, for curate, mine and samples). A
broker that loses its
messages (a restart without persistence, a flush, a dropped publish) therefore loses no
work: ``reconcile`` finds every unit still outstanding and hands it out again.

A unit is outstanding when its entity is not finished, its build is running and runs that
stage (``builds.params.until``), it was handed out more than ``older_than_s`` ago, its
message is not on the broker (``waiting``: queued, or delivered and not yet acknowledged)
and no attempt on it is still running. A task runs with its message unacknowledged
(``acks_late``), so with the broker's view an attempt marked running long after the
hand-off whose message is gone is dead; without it (a broker whose contents cannot be
read), only one older than the stage's hard time limit is. The broker's view is what keeps
a long GPU backlog, queued and waiting its turn, from being sent twice.

Each unit sent again counts on its row (``resends``). No row is held locked while the
broker is read: candidates are read without locks, then each page's rows are locked
(``FOR UPDATE SKIP LOCKED``) in a short transaction that sends again only those whose
hand-off did not change since (same task id) and moves their ``queued_at`` to now, so two
passes never hand out the same unit and a worker updating a video never waits on a pass.

With a broker whose contents cannot be read (not Redis), a queued backlog looks exactly
like lost work: a unit is sent again only after ``celery.reconcile_blind_after_s`` (6 h),
and at most ``celery.reconcile_blind_max`` (100) per pass; duplicates that still happen are
harmless (a stage run finds its work done and skips it).

Cost: one indexed query per page of candidates (a partial index holds only unfinished
videos); the broker is read only when there are candidates, page by page.

This module knows nothing of Celery: the caller passes ``send(stage, entity_id, task_id=...)``.
"""
from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Collection, Iterator
from datetime import datetime, timedelta

from sqlalchemy import Select, bindparam, select, tuple_, update

from opensubject_tasks.catalogue import VIDEO_STAGES, VIDEO_TERMINAL, runs, stage_reached
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.models import Build, StageAttempt, Video
from opensubject_tasks.services.common import utcnow

Send = Callable[..., object]
Waiting = Collection[tuple[str, str]] | Callable[[], Collection[tuple[str, str]] | None] | None


def _alive_since(ctx: Context, older_than_s: float, stages: Collection[str], now: datetime,
                 broker_known: bool) -> datetime:
    """Running attempts that started after this time may still be working."""
    if broker_known:
        return now - timedelta(seconds=older_than_s)
    hard = max(ctx.settings.celery.limits(st).hard_s for st in stages)
    return now - timedelta(seconds=max(older_than_s, hard))


_PASS_PAGE = 1000  # candidates per query and per locking transaction


@hot_query("reconcile pass", lambda f: {"cutoff": utcnow() - timedelta(hours=1), "after": None,
                                        "limit": _PASS_PAGE})
def candidates(cutoff: datetime, after: tuple[datetime, str] | None, limit: int) -> Select:
    """Videos in flight whose last hand-off is older than ``cutoff``, oldest first, after the
    keyset ``after`` (queued_at, id): a partial index holds the unfinished videos only."""
    q = (select(Video.id, Video.queued_stage, Video.queued_task_id, Video.queued_at, Video.stage_done,
                Build.params)
         .join(Build, Build.id == Video.build_id)
         .where(Build.state == "running", Video.state.not_in(VIDEO_TERMINAL),
                Video.queued_stage.in_(VIDEO_STAGES), Video.queued_at < cutoff))
    if after is not None:
        q = q.where(tuple_(Video.queued_at, Video.id) > tuple_(*after))
    return q.order_by(Video.queued_at, Video.id).limit(limit)


@hot_query("reconcile pass", lambda f: {"entity_type": "video", "ids": f.video_ids,
                                        "since": utcnow() - timedelta(hours=1)})
def running_attempts(entity_type: str, ids: list[str], since: datetime) -> Select:
    return select(StageAttempt.entity_id).where(
        StageAttempt.entity_type == entity_type, StageAttempt.entity_id.in_(ids),
        StageAttempt.status == "running", StageAttempt.started_at > since)


@hot_query("reconcile pass", lambda f: {"ids": f.video_ids})
def lock_unchanged(ids: list[str]) -> Select:
    """The candidates' rows, locked, skipping those a worker holds right now."""
    return (select(Video.id, Video.queued_task_id).where(Video.id.in_(ids))
            .with_for_update(skip_locked=True))


def _until(params: dict | None) -> str:
    return (params or {}).get("until") or "verify"


def reconcile(ctx: Context, send: Send, *, older_than_s: float, waiting: Waiting = None,
              blind_older_than_s: float | None = None, blind_max: int | None = None) -> list[tuple[str, str]]:
    """Hand out again every outstanding unit of work handed out more than ``older_than_s``
    seconds ago; returns the ``(stage, entity_id)`` pairs sent.

    ``waiting``: ``(stage, entity_id)`` of the messages on the broker now, or a function
    that reads them (called only when there are candidates); None: unknown. With a broker
    it cannot read, a queued backlog looks exactly like lost work, so a unit is sent again
    only once its hand-off is older than ``blind_older_than_s`` (default
    ``celery.reconcile_blind_after_s``), and at most ``blind_max`` (default
    ``celery.reconcile_blind_max``) per pass, oldest first: never a mass re-send.

    Cost: candidates are read a page at a time through an index that holds only unfinished
    videos; no row is locked while the broker is read; each page's rows are then locked
    briefly (``SKIP LOCKED``: a row a worker is updating is left to the next pass) and sent
    again only if no hand-off happened since they were read (same task id)."""
    from opensubject_tasks.services.handoff import top_up

    c = ctx.settings.celery
    # places in flight freed outside the chain (a task that gave up) go to waiting videos
    topped = top_up(ctx, send)
    now = utcnow()
    cutoff = now - timedelta(seconds=older_than_s)
    first = _candidate_page(ctx, cutoff, None)
    if not first:
        return topped
    held = waiting() if callable(waiting) else waiting
    known = held is not None
    held = set(held or ())
    if not known:
        blind_after = max(older_than_s, c.reconcile_blind_after_s if blind_older_than_s is None else blind_older_than_s)
        cutoff = now - timedelta(seconds=blind_after)
        first = [r for r in first if r.queued_at < cutoff]
    budget = (c.reconcile_blind_max if blind_max is None else blind_max) if not known else None
    since = _alive_since(ctx, older_than_s, VIDEO_STAGES, now, known)
    sent: list[tuple[str, str]] = []
    page = first
    while page and (budget is None or len(sent) < budget):
        units = _resend_page(ctx, page, held, since, now, None if budget is None else budget - len(sent))
        for stage, entity_id, task_id in units:
            send(stage, entity_id, task_id=task_id)
            sent.append((stage, entity_id))
        if len(page) < _PASS_PAGE:
            break
        page = _candidate_page(ctx, cutoff, (page[-1].queued_at, page[-1].id))
    return topped + sent


def _candidate_page(ctx: Context, cutoff: datetime, after: tuple[datetime, str] | None) -> list:
    with session_scope(ctx.sessions) as s:
        return s.execute(candidates(cutoff, after, _PASS_PAGE)).all()


def _resend_page(ctx: Context, page: list, held: set[tuple[str, str]], since: datetime, now: datetime,
                 budget: int | None) -> list[tuple[str, str, str]]:
    """Of a page of candidates, those still outstanding: not finished, run by their build,
    not on the broker, not running, and handed out by nobody since they were read; each
    gets a new task id and hand-off time in one short transaction. Returns (stage, id, task id)."""
    wanted = {r.id: r for r in page
              if not stage_reached(r.stage_done, r.queued_stage) and runs(r.queued_stage, _until(r.params))
              and (r.queued_stage, r.id) not in held}
    if not wanted:
        return []
    with session_scope(ctx.sessions) as s:
        busy = set(s.scalars(running_attempts("video", list(wanted), since)))
        locked = s.execute(lock_unchanged([v for v in wanted if v not in busy])).all()
        ids = [vid for vid, task_id in locked if task_id == wanted[vid].queued_task_id]
        ids = ids[:budget] if budget is not None else ids
        units = [(wanted[v].queued_stage, v, str(uuid.uuid4())) for v in ids]
        if units:
            table = Video.__table__
            s.connection().execute(
                update(table).where(table.c.id == bindparam("vid"))
                .values(queued_at=now, queued_task_id=bindparam("tid"), resends=table.c.resends + 1),
                [{"vid": v, "tid": t} for _, v, t in units])
    return units


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


_PAGE = 1000


def waiting_in_redis(broker_url: str, queues: Collection[str], task_prefix: str,
                     key_prefix: str = "") -> set[tuple[str, str]] | None:
    """``(stage, entity_id)`` of every message a Redis broker holds for ``queues``, queued
    or delivered and unacknowledged; None when the broker is not Redis. ``key_prefix``:
    the transport's ``global_keyprefix``. Read a page at a time: memory stays bounded by
    the set of units, not by the messages' bodies."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        return {u for raw in _messages(client, queues, key_prefix) if (u := _unit(raw, task_prefix)) is not None}
    finally:
        client.close()


def _messages(client, queues: Collection[str], key_prefix: str) -> Iterator[bytes]:  # noqa: ANN001
    for q in queues:
        for key in (q, *(f"{q}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS)):
            start = 0
            while page := client.lrange(key_prefix + key, start, start + _PAGE - 1):
                yield from page
                start += _PAGE
    for _, raw in client.hscan_iter(key_prefix + _UNACKED, count=_PAGE):
        yield raw

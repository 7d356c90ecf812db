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

Each unit sent again counts on its row (``resends``). Rows are locked
(``FOR UPDATE SKIP LOCKED``) and their ``queued_at`` moved to now in the transaction that
picks them, so two passes never hand out the same unit.

Cost: one indexed query for candidates; the broker is read only when there
are candidates, page by page.

This module knows nothing of Celery: the caller passes ``send(stage, entity_id, task_id=...)``.
"""
from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Collection, Iterator
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select, update

from opensubject_tasks.catalogue import VIDEO_STAGES, VIDEO_TERMINAL, runs, stage_reached
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
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


def _running(s, entity_type: str, ids: list[str], since: datetime) -> set[str]:  # noqa: ANN001
    if not ids:
        return set()
    return set(s.scalars(select(StageAttempt.entity_id).where(
        StageAttempt.entity_type == entity_type, StageAttempt.entity_id.in_(ids),
        StageAttempt.status == "running", StageAttempt.started_at > since)))


def _until(params: dict | None) -> str:
    return (params or {}).get("until") or "verify"


def reconcile(ctx: Context, send: Send, *, older_than_s: float, waiting: Waiting = None,
              video_ids: Collection[str] | None = None) -> list[tuple[str, str]]:
    """Hand out again every outstanding unit of work handed out more than ``older_than_s``
    seconds ago; returns the ``(stage, entity_id)`` pairs sent.

    ``waiting``: ``(stage, entity_id)`` of the messages on the broker now, or a function
    that reads them (called only when there are candidates); None: unknown, and age alone
    decides. ``video_ids``: only these videos (a chunk being retried)."""
    now = utcnow()
    cutoff = now - timedelta(seconds=older_than_s)
    with session_scope(ctx.sessions) as s:
        # The stage handed out last, until the video records it done (samples: until the
        # video is settled).
        q = (select(Video.id, Video.queued_stage, Video.stage_done, Build.params)
             .join(Build, Build.id == Video.build_id)
             .where(Build.state == "running", Video.state.not_in(VIDEO_TERMINAL),
                    Video.queued_stage.in_(VIDEO_STAGES), Video.queued_at < cutoff))
        if video_ids is not None:
            q = q.where(Video.id.in_(list(video_ids)))
        rows = [r for r in s.execute(q.order_by(Video.id).with_for_update(of=Video, skip_locked=True))
                if not stage_reached(r.stage_done, r.queued_stage) and runs(r.queued_stage, _until(r.params))]
        if not rows:
            return []

        held = waiting() if callable(waiting) else waiting
        known = held is not None
        held = set(held or ())
        busy = _running(s, "video", [r.id for r in rows],
                        _alive_since(ctx, older_than_s, VIDEO_STAGES, now, known))
        units = [(r.queued_stage, r.id) for r in rows if r.id not in busy and (r.queued_stage, r.id) not in held]
        task_ids = {e: str(uuid.uuid4()) for _, e in units}
        if units:
            table = Video.__table__
            s.connection().execute(
                update(table).where(table.c.id == bindparam("vid"))
                .values(queued_at=now, queued_task_id=bindparam("tid"), resends=table.c.resends + 1),
                [{"vid": e, "tid": task_ids[e]} for _, e in units])
    for stage, entity_id in units:
        send(stage, entity_id, task_id=task_ids[entity_id])
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

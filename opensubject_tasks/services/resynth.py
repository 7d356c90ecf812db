"""Re-synthesis bookkeeping: hand in-flight samples their next stage, and find lost work.

A sample cycles ``pending -> synthesize -> synthesized -> verify -> pending (attempt+1) ...``
until verified or rejected. Every time its next stage is handed to a queue,
``samples.queued_at`` is set. A sample that is still in flight long after that time
lost its message (a broker restart, a dropped publish): ``sweep_stuck`` hands it its
next stage again. Stages are idempotent, so a duplicate is harmless.

The caller passes ``send(stage, sample_id)``: this module knows nothing of Celery.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta

from sqlalchemy import or_, select, true, update

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Build, Sample
from opensubject_tasks.services.common import utcnow

IN_FLIGHT = ("pending", "synthesized")
NEXT_STAGE = {"pending": "synthesize", "synthesized": "verify"}
SAMPLE_STAGES = frozenset(NEXT_STAGE.values())

Send = Callable[[str, str], object]  # (stage, sample_id) -> anything


def mark_queued(ctx: Context, sample_ids: Iterable[str]) -> None:
    """Record that work for these samples was just handed to a queue."""
    ids = list(sample_ids)
    if not ids:
        return
    with session_scope(ctx.sessions) as s:
        s.execute(update(Sample).where(Sample.id.in_(ids)).values(queued_at=utcnow()))


def requeue(ctx: Context, stage: str, sample_id: str, send: Send) -> None:
    """Hand one sample stage to the queue: the time is recorded first, so a message
    lost after this point is found by the sweep."""
    if stage not in SAMPLE_STAGES:
        raise ValueError(f"{stage!r} is not a sample stage ({', '.join(sorted(SAMPLE_STAGES))})")
    mark_queued(ctx, [sample_id])
    send(stage, sample_id)


def enqueue_in_flight(ctx: Context, sample_ids: Iterable[str], send: Send) -> list[tuple[str, str]]:
    """Hand each in-flight sample among ``sample_ids`` its next stage (synthesize for
    pending, verify for synthesized); finished samples are left alone."""
    ids = sorted(set(sample_ids))
    with session_scope(ctx.sessions) as s:
        rows = s.execute(select(Sample.id, Sample.state)
                         .where(Sample.id.in_(ids), Sample.state.in_(IN_FLIGHT))
                         .order_by(Sample.id)).all()
        work = [(NEXT_STAGE[state], sid) for sid, state in rows]
        if work:
            s.execute(update(Sample).where(Sample.id.in_([sid for _, sid in work]))
                      .values(queued_at=utcnow()))
    for stage, sid in work:
        send(stage, sid)
    return work


def sweep_stuck(ctx: Context, older_than_s: float, send: Send) -> list[str]:
    """Re-enqueue samples in flight whose last hand-off is older than ``older_than_s``.

    Rows are locked (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and their ``queued_at``
    moved to now in the same transaction, so two sweeps never hand out the same sample.
    Samples without ``queued_at`` are not touched, nor those of a build started with
    synthesis switched off (``builds.params.synthesize`` false). Returns the ids handed out
    again.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    synth_param = Build.params["synthesize"].as_boolean()
    with session_scope(ctx.sessions) as s:
        rows = s.execute(
            select(Sample.id, Sample.state)
            .outerjoin(Build, Build.id == Sample.build_id)
            .where(Sample.state.in_(IN_FLIGHT), Sample.queued_at.is_not(None), Sample.queued_at < cutoff,
                   or_(synth_param.is_(None), synth_param.is_(true())))
            .order_by(Sample.id)
            .with_for_update(of=Sample, skip_locked=True)
        ).all()
        if rows:
            s.execute(update(Sample).where(Sample.id.in_([sid for sid, _ in rows]))
                      .values(queued_at=utcnow()))
    for sid, state in rows:
        send(NEXT_STAGE[state], sid)
    return [sid for sid, _ in rows]

"""The service layer's shared shell: run one stage on one entity, record the attempt.

Stage services (``services/<stage>.py``, and ``export/service.py``) are plain functions
``fn(ctx, entity_id) -> StageResult``. The embedded runner and the Celery tasks both call
``run_stage``; neither knows what a stage does. What a run knows of its entity and the
result it records are in services/entity.py; what follows a run is services/chain.py.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import Select, Update, select, update
from sqlalchemy.orm import Session

from opensubject_tasks.catalogue import SUCCEEDED
from opensubject_tasks.catalogue import STAGES as CATALOGUE
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.lineage import video_of_sample_query
from opensubject_tasks.db.locks import EntityLock, new_lock, wait_for
from opensubject_tasks.db.models import Build, Sample, StageAttempt, Video, utcnow
from opensubject_tasks.errors import BadInput, Rejected
from opensubject_tasks.services.chain import hand_on
from opensubject_tasks.services.entity import EntityFacts, StageResult, entity_facts, settle_video
from opensubject_tasks.services.handoff import Send


@dataclass(frozen=True)
class StageSpec:
    name: str
    entity_type: str                   # the catalogue's entity: video | sample | build | export_part
    fn: Callable[[Context, str], StageResult]


# The one registry of stage functions, keyed by the catalogue's stage names.
STAGE_FUNCTIONS: dict[str, StageSpec] = {}


def already_done(stage: str, why: str, **kw: Any) -> StageResult:
    """The result of a re-run that finds its stage completed: what the stage produced the
    first time, and nothing changed. Finished work is redone only on an explicit
    recompute (``opensubject rerun STAGE VIDEO --recompute``), which records what it drops."""
    return StageResult(**kw, details={"skipped": f"{stage} already done: {why}; later work kept "
                                                 "(rerun --recompute to redo it)"})


StageFn = Callable[[Context, str], StageResult]


def stage(name: str) -> Callable[[StageFn], StageFn]:
    """Register a stage service function under its catalogue name (which says the entity it
    works on and its queue)."""
    def deco(fn: StageFn) -> StageFn:
        STAGE_FUNCTIONS[name] = StageSpec(name, CATALOGUE[name].entity, fn)
        return fn
    return deco


def load_stages() -> dict[str, StageSpec]:
    """Import the service module of each catalogue stage so that its function registers itself
    (a worker does it once at start, before its pool forks)."""
    for name, st in CATALOGUE.items():
        if st.service:
            stage_spec(name)
    return STAGE_FUNCTIONS


def stage_spec(name: str) -> StageSpec:
    """One stage's registered function, its service module imported on first use: a command
    that runs only curation does not import mining, synthesis or the export (and pyarrow)."""
    if name not in STAGE_FUNCTIONS:
        import importlib

        if CATALOGUE[name].service is None:
            raise KeyError(f"stage {name} runs no stage function (it has no service module)")
        importlib.import_module(f"opensubject_tasks.{CATALOGUE[name].service}")
        if name not in STAGE_FUNCTIONS:
            raise RuntimeError(f"stage {name} declared in the catalogue but not registered by its service")
    return STAGE_FUNCTIONS[name]


def build_of(ctx: Context, entity_type: str, entity_id: str) -> str | None:
    """The build a video, sample or build belongs to (None for other entities)."""
    with session_scope(ctx.sessions) as s:
        return entity_facts(s, entity_type, entity_id).build_id


def set_terminal(s: Session, entity_type: str, entity_id: str, state: str, reason: str,
                 error_stage: str | None = None) -> None:
    """``mark_terminal`` inside the caller's transaction."""
    model = {"video": Video, "sample": Sample, "build": Build}.get(entity_type)
    if model is None:
        return
    row = s.get(model, entity_id, with_for_update=True)
    if row is None or (state != row.state and row.state == SUCCEEDED.get(entity_type)):
        return
    row.state = state
    if hasattr(row, "reason"):
        row.reason = reason[:2000]
    if hasattr(row, "error_stage"):
        row.error_stage = error_stage


def mark_terminal(ctx: Context, entity_type: str, entity_id: str, state: str, reason: str,
                  error_stage: str | None = None) -> None:
    """Give a video, sample or build a terminal state, with its reason where the row keeps
    one (a build does not). ``error_stage``: the stage whose error (not bad input) caused
    it, so that a retry redoes exactly that. A finished video or verified sample keeps its
    state: an error in a later re-run is recorded on its attempt only."""
    with session_scope(ctx.sessions) as s:
        set_terminal(s, entity_type, entity_id, state, reason, error_stage)


def set_bad_input(s: Session, entity_type: str, entity_id: str, exc: BadInput) -> None:
    """Record a terminal rejection/failure with its reason on the entity itself."""
    set_terminal(s, entity_type, entity_id, "rejected" if isinstance(exc, Rejected) else "failed", exc.reason)


def mark_bad_input(ctx: Context, entity_type: str, entity_id: str, exc: BadInput) -> None:
    with session_scope(ctx.sessions) as s:
        set_bad_input(s, entity_type, entity_id, exc)


LOST_ERROR = ("the process running this attempt was lost (killed, out of memory or a crash in native "
              "code); the stage ran again")


@hot_query("stage run, and each sample of a batch",
           lambda f: {"stage": "verify", "entity_id": f.sample_ids, "status": "lost", "error": "lost"})
def close_running_attempts(stage: str, entity_id: str | list[str], status: str, error: str) -> Update:
    """Close the attempts of a stage on an entity (or a batch's entities) that are still
    marked running."""
    ids = [entity_id] if isinstance(entity_id, str) else list(entity_id)
    return (update(StageAttempt)
            .where(StageAttempt.entity_type == CATALOGUE[stage].entity, StageAttempt.entity_id.in_(ids),
                   StageAttempt.stage == stage, StageAttempt.status == "running")
            .values(status=status, finished_at=utcnow(), error=error)
            .execution_options(synchronize_session=False))


@hot_query("stage run", lambda f: {"stage": "curate", "entity_id": f.video})
def recent_attempt_statuses(stage: str, entity_id: str, limit: int = 100) -> Select:
    return (select(StageAttempt.status)
            .where(StageAttempt.entity_type == CATALOGUE[stage].entity, StageAttempt.entity_id == entity_id,
                   StageAttempt.stage == stage)
            .order_by(StageAttempt.id.desc()).limit(limit))


def close_lost(s: Session, stage: str, entity_ids: list[str]) -> None:
    """Close this stage's attempts on the entities that are still marked running. Called
    with the entities' lock held: whoever ran those attempts no longer holds it, so they
    are dead."""
    s.execute(close_running_attempts(stage, entity_ids, "lost", LOST_ERROR))


def lost_in_a_row(s: Session, stage: str, entity_id: str) -> int:
    """How many times in a row this stage's process was lost on the entity."""
    statuses = s.scalars(recent_attempt_statuses(stage, entity_id)).all()
    lost = 0
    for st in statuses:
        if st != "lost":
            break
        lost += 1
    return lost


def close_lost_attempts(ctx: Context, stage: str, entity_id: str) -> int:
    """Close the entity's lost attempts of this stage; how many times in a row it was lost."""
    with session_scope(ctx.sessions) as s:
        close_lost(s, stage, [entity_id])
        return lost_in_a_row(s, stage, entity_id)


# settling a video after a sample step run alone
hot_query("stage run of a sample", lambda f: {"sample_id": f.sample})(video_of_sample_query)


def lock_name(entity_type: str, entity_id: str, facts: EntityFacts) -> str:
    """The lock a stage run holds: a sample's steps take its video's lock, which the video's
    samples unit holds while it works through them."""
    if entity_type == "sample" and facts.video_id is not None:
        return f"video:{facts.video_id}"
    return f"{entity_type}:{entity_id}"


@dataclass
class _Start:
    facts: EntityFacts
    attempt_id: int | None = None          # None: given up (lost too often), already recorded
    given_up: StageResult | None = None


def run_stage(ctx: Context, stage_name: str, entity_id: str, attempt: int = 1,
              max_lost: int | None = None, send: Send | None = None) -> StageResult:
    """Run one stage on one entity; bad input becomes a recorded result, other errors
    are recorded and re-raised (the caller decides whether to retry).

    One run per entity at a time: a second copy (a redelivery racing the original, a
    re-run during a build) waits for the first, then finds its work done and skips it.
    ``max_lost``: after this many runs in a row whose process died (a video that crashes
    its decoder or exhausts memory), the entity fails instead of killing another worker.
    ``send``: hand the entity on down its chain (services/chain.py), recorded in the
    transaction that records the result and sent once that has committed.

    The bookkeeping takes two transactions: one takes the entity's lock, closes its lost
    attempts and opens the attempt row; one closes the attempt, records bad input, the
    hand-off and the video's settling, and releases the lock."""
    spec = stage_spec(stage_name)
    wait_s = ctx.settings.celery.limits(stage_name).hard_s
    lock: EntityLock | None = None
    start: _Start | None = None

    def try_start() -> bool:
        nonlocal lock, start
        with session_scope(ctx.sessions) as s:
            facts = entity_facts(s, spec.entity_type, entity_id)
            if lock is None:
                lock = new_lock(ctx.engine, lock_name(spec.entity_type, entity_id, facts),
                                ctx.settings.db.lease_ttl_s)
            if not lock.try_take(s):
                return False
            start = _open_attempt(s, ctx, spec, entity_id, attempt, max_lost, facts, lock)
        return True

    try:
        waited = wait_for(try_start, f"{spec.entity_type}:{entity_id}", wait_s)
    except BaseException:
        if lock is not None:
            lock.release(None)   # a flock taken by a start whose transaction failed
        raise
    assert lock is not None and start is not None
    if start.given_up is not None:
        lock.release(None)
        return start.given_up
    lock.keep()
    t0 = time.perf_counter()
    bad: BadInput | None = None
    try:
        result = spec.fn(ctx, entity_id)
    except BadInput as exc:
        bad = exc
        result = StageResult(status="rejected" if isinstance(exc, Rejected) else "failed", reason=exc.reason)
    except BaseException as exc:
        status = "timeout" if type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded") else "error"
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        _finish(ctx, spec, entity_id, start, lock, (status, error, {}), t0, waited)
        raise
    sends = _finish(ctx, spec, entity_id, start, lock, (result.status, result.reason, result.details), t0, waited,
                    bad=bad, result=result, send=send is not None)
    for st, e, task_id in sends:
        send(st, e, task_id=task_id)  # type: ignore[misc]
    return result


def _open_attempt(s: Session, ctx: Context, spec: StageSpec, entity_id: str, attempt: int,
                  max_lost: int | None, facts: EntityFacts, lock: EntityLock) -> _Start:
    """With the lock just taken in this transaction: close the entity's lost attempts and
    open this run's attempt row, or give up on an entity whose runs keep dying."""
    close_lost(s, spec.name, [entity_id])
    lost = lost_in_a_row(s, spec.name, entity_id) if max_lost is not None else 0
    if max_lost is not None and lost >= max_lost:
        reason = (f"worker lost {lost} times running {spec.name} (killed, out of memory or a crash in "
                  "native code); not tried again")
        s.add(StageAttempt(build_id=facts.build_id, entity_type=spec.entity_type, entity_id=entity_id,
                           stage=spec.name, attempt=attempt, worker=ctx.worker, status="error", error=reason,
                           finished_at=utcnow(), duration_s=0.0))
        set_terminal(s, spec.entity_type, entity_id, "failed", reason, error_stage=spec.name)
        lock.release(s)
        return _Start(facts, given_up=StageResult(status="failed", reason=reason))
    row = StageAttempt(build_id=facts.build_id, entity_type=spec.entity_type, entity_id=entity_id,
                       stage=spec.name, attempt=attempt, worker=ctx.worker, status="running")
    s.add(row)
    s.flush()
    return _Start(facts, attempt_id=row.id)


def _finish(ctx: Context, spec: StageSpec, entity_id: str, start: _Start, lock: EntityLock,
            outcome: tuple[str, str | None, dict[str, Any]], t0: float, waited: float, *,
            bad: BadInput | None = None, result: StageResult | None = None,
            send: bool = False) -> list[tuple[str, str, str]]:
    """One transaction: close the attempt, record bad input on the entity, hand the entity
    on (returns the messages to send once committed) and release the lock."""
    status, error, details = outcome
    try:
        with session_scope(ctx.sessions) as s:
            # A run that stalled past its lease finds its attempt closed by the run that took
            # over (or the worker's hard-limit handler closed it): theirs stands, and the
            # hand-off is theirs too.
            values: dict[str, Any] = {"status": status, "error": error[:8000] if error else None,
                                      "finished_at": utcnow(), "duration_s": time.perf_counter() - t0}
            details = dict(details or {})
            if waited >= 1.0:
                details["waited_for_other_run_s"] = round(waited, 1)
            if details:
                values["details"] = details
            closed = s.execute(update(StageAttempt).where(StageAttempt.id == start.attempt_id,
                                                          StageAttempt.status == "running").values(**values)
                               .execution_options(synchronize_session=False)).rowcount
            sends: list[tuple[str, str, str]] = []
            if closed:
                if bad is not None:
                    set_bad_input(s, spec.entity_type, entity_id, bad)
                if send and result is not None:
                    sends = hand_on(s, spec.name, entity_id, result, start.facts)
            lock.release(s)
        return sends
    finally:
        lock.release(None)   # the flock, and the lease's renewal, whatever happened above


# A step over a batch of samples: each sample's outcome (its result, or the bad input that
# ends it), from one call of each model for the whole batch.
BatchFn = Callable[[Context, list[str]], dict[str, "StageResult | BadInput"]]


def one_sample(batch_fn: BatchFn, ctx: Context, sample_id: str) -> StageResult:
    """A batch step on one sample, as a stage function (its bad input raised for run_stage)."""
    out = batch_fn(ctx, [sample_id])[sample_id]
    if isinstance(out, BadInput):
        raise out
    return out


def run_steps(ctx: Context, step: str, sample_ids: list[str], batch_fn: BatchFn) -> dict[str, StageResult]:
    """Run one sample step (synthesize, verify) on a batch of one video's samples, with the
    video's lock held by the caller (the samples unit). Each sample gets its own attempt
    row and its own outcome, exactly as when it runs alone: bad input is recorded on the
    sample; an error is recorded on every attempt of the batch and raised (the unit is
    retried; samples already recorded are skipped then). One transaction opens the
    batch's attempts (closing those a dead process left running), one closes them."""
    with session_scope(ctx.sessions) as s:
        build_id = s.scalar(select(Sample.build_id).where(Sample.id == sample_ids[0])) if sample_ids else None
        if sample_ids:   # attempts of a process that died under an earlier batch
            close_lost(s, step, sample_ids)
        rows = [StageAttempt(build_id=build_id, entity_type="sample", entity_id=sid, stage=step, attempt=1,
                             worker=ctx.worker, status="running", details={"batch": len(sample_ids)})
                for sid in sample_ids]
        s.add_all(rows)
        s.flush()
        attempt_ids = {sid: row.id for sid, row in zip(sample_ids, rows, strict=True)}
    t0 = time.perf_counter()
    try:
        outcomes = batch_fn(ctx, sample_ids)
    except BaseException as exc:
        status, error = _cut_short(exc)
        with session_scope(ctx.sessions) as s:
            _close_attempts(s, attempt_ids, dict.fromkeys(sample_ids, (status, error, None)),
                            time.perf_counter() - t0)
        raise
    results: dict[str, StageResult] = {}
    closing = {}
    with session_scope(ctx.sessions) as s:
        for sid in sample_ids:
            out = outcomes[sid]
            if isinstance(out, BadInput):
                set_bad_input(s, "sample", sid, out)
                out = StageResult(status="rejected" if isinstance(out, Rejected) else "failed", reason=out.reason)
            results[sid] = out
            closing[sid] = (out.status, out.reason, out.details)
        _close_attempts(s, attempt_ids, closing, time.perf_counter() - t0)
    return results


def _cut_short(exc: BaseException) -> tuple[str, str]:
    """The status of a batch's attempts when an exception ends it: a time limit; the process
    being stopped (the unit's hard limit or a shutdown: what is left of it is lost); an error."""
    if type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded"):
        return "timeout", f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):
        return "lost", f"the process running this batch was stopped ({type(exc).__name__})"
    return "error", f"{type(exc).__name__}: {exc}"


def _close_attempts(s: Session, attempt_ids: dict[str, int], outcome: dict[str, tuple], batch_s: float) -> None:
    """Close a batch's attempts: each with its own status; the batch's time shared out."""
    rows = s.scalars(select(StageAttempt).where(StageAttempt.id.in_(list(attempt_ids.values())))).all()
    by_id = {row.id: row for row in rows}
    for sid, attempt_id in attempt_ids.items():
        row = by_id.get(attempt_id)
        if row is None or row.status != "running":
            continue
        status, error, details = outcome[sid]
        row.status, row.error, row.finished_at = status, (error or "")[:8000] or None, utcnow()
        row.duration_s = batch_s / max(len(attempt_ids), 1)
        row.details = {**(row.details or {}), **(details or {}), "batch_s": round(batch_s, 3)}


def finalize_video(ctx: Context, video_id: str) -> str:
    """Give a video its terminal state once mining has completed and none of its samples
    is in flight: done (at least one verified sample) or rejected (none). Decided on
    evidence only: a video whose mining never completed keeps its state."""
    with session_scope(ctx.sessions) as s:
        return settle_video(s, video_id)

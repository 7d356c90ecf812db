"""The service layer's shared shell: run one stage on one entity, record the attempt.

Stage services (``services/<stage>.py``) are plain functions ``fn(ctx, entity_id)
-> StageResult``. The embedded runner and the Celery tasks both call ``run_stage``;
neither knows what a stage does.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import Select, Update, select, update

from opensubject_tasks.catalogue import SAMPLE_IN_FLIGHT, SUCCEEDED, stage_reached
from opensubject_tasks.catalogue import STAGES as CATALOGUE
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.locks import entity_lock
from opensubject_tasks.db.models import Build, Sample, StageAttempt, Video, utcnow
from opensubject_tasks.errors import BadInput, Rejected

# Follow-up work: (stage, entity_id) pairs an orchestrator should run next.
Next = list[tuple[str, str]]


@dataclass
class StageResult:
    status: str = "ok"                 # ok | rejected | failed
    reason: str | None = None
    next: Next = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason,
                "next": [list(n) for n in self.next], "details": self.details}


@dataclass(frozen=True)
class StageSpec:
    name: str
    entity_type: str                   # the catalogue's entity: video | sample | build | export_part
    fn: Callable[[Context, str], StageResult]


STAGES: dict[str, StageSpec] = {}


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
        STAGES[name] = StageSpec(name, CATALOGUE[name].entity, fn)
        return fn
    return deco


def load_stages() -> dict[str, StageSpec]:
    """Import the stage modules so that they register themselves."""
    import importlib

    for mod in ("curate", "mine", "synthesize", "verify", "samples", "export"):  # services/<module>.py
        try:
            importlib.import_module(f"opensubject_tasks.services.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"opensubject_tasks.services.{mod}":
                raise
    return STAGES


def build_of(ctx: Context, entity_type: str, entity_id: str) -> str | None:
    """The build a video, sample or build belongs to (None for other entities)."""
    with session_scope(ctx.sessions) as s:
        if entity_type == "video":
            return s.scalar(select(Video.build_id).where(Video.id == entity_id))
        if entity_type == "sample":
            return s.scalar(select(Sample.build_id).where(Sample.id == entity_id))
        if entity_type == "build":
            return entity_id
        if entity_type == "export_part":
            return entity_id.rpartition("#")[0]
    return None


def mark_terminal(ctx: Context, entity_type: str, entity_id: str, state: str, reason: str,
                  error_stage: str | None = None) -> None:
    """Give a video, sample or build a terminal state, with its reason where the row keeps
    one (a build does not). ``error_stage``: the stage whose error (not bad input) caused
    it, so that a retry redoes exactly that. A finished video or verified sample keeps its
    state: an error in a later re-run is recorded on its attempt only."""
    model = {"video": Video, "sample": Sample, "build": Build}.get(entity_type)
    if model is None:
        return
    with session_scope(ctx.sessions) as s:
        row = s.get(model, entity_id, with_for_update=True)
        if row is None or (state != row.state and row.state == SUCCEEDED.get(entity_type)):
            return
        row.state = state
        if hasattr(row, "reason"):
            row.reason = reason[:2000]
        if hasattr(row, "error_stage"):
            row.error_stage = error_stage


def mark_bad_input(ctx: Context, entity_type: str, entity_id: str, exc: BadInput) -> None:
    """Record a terminal rejection/failure with its reason on the entity itself."""
    mark_terminal(ctx, entity_type, entity_id,
                  "rejected" if isinstance(exc, Rejected) else "failed", exc.reason)


@hot_query("stage run, and each sample of a batch",
           lambda f: {"stage": "verify", "entity_id": f.sample, "status": "lost", "error": "lost"})
def close_running_attempts(stage: str, entity_id: str, status: str, error: str) -> Update:
    """Close the attempts of a stage on an entity that are still marked running."""
    return (update(StageAttempt)
            .where(StageAttempt.entity_type == CATALOGUE[stage].entity, StageAttempt.entity_id == entity_id,
                   StageAttempt.stage == stage, StageAttempt.status == "running")
            .values(status=status, finished_at=utcnow(), error=error)
            .execution_options(synchronize_session=False))


@hot_query("stage run", lambda f: {"stage": "curate", "entity_id": f.video})
def recent_attempt_statuses(stage: str, entity_id: str, limit: int = 100) -> Select:
    return (select(StageAttempt.status)
            .where(StageAttempt.entity_type == CATALOGUE[stage].entity, StageAttempt.entity_id == entity_id,
                   StageAttempt.stage == stage)
            .order_by(StageAttempt.id.desc()).limit(limit))


def close_lost_attempts(ctx: Context, stage: str, entity_id: str) -> int:
    """Close this stage's attempts on the entity that are still marked running, and return
    how many times in a row its process was lost. Called with the entity's lock held:
    whoever ran those attempts no longer holds it, so they are dead."""
    with session_scope(ctx.sessions) as s:
        s.execute(close_running_attempts(
            stage, entity_id, "lost", "the process running this attempt was lost (killed, out of memory or a "
                                      "crash in native code); the stage ran again"))
        statuses = s.scalars(recent_attempt_statuses(stage, entity_id)).all()
    lost = 0
    for st in statuses:
        if st != "lost":
            break
        lost += 1
    return lost


@hot_query("stage run of a sample", lambda f: {"sample_id": f.sample})
def video_of_sample_query(sample_id: str) -> Select:
    from opensubject_tasks.db.models import Clip, Pair, Subject

    return (select(Clip.video_id).join(Subject, Subject.clip_id == Clip.id)
            .join(Pair, Pair.subject_id == Subject.id).join(Sample, Sample.pair_id == Pair.id)
            .where(Sample.id == sample_id))


def video_of_sample(ctx: Context, sample_id: str) -> str | None:
    with session_scope(ctx.sessions) as s:
        return s.scalar(video_of_sample_query(sample_id))


def lock_name(ctx: Context, entity_type: str, entity_id: str) -> str:
    """The lock a stage run holds: a sample's steps take its video's lock, which the video's
    samples unit holds while it works through them."""
    if entity_type == "sample" and (video_id := video_of_sample(ctx, entity_id)) is not None:
        return f"video:{video_id}"
    return f"{entity_type}:{entity_id}"


def run_stage(ctx: Context, stage_name: str, entity_id: str, attempt: int = 1,
              max_lost: int | None = None) -> StageResult:
    """Run one stage on one entity; bad input becomes a recorded result, other errors
    are recorded and re-raised (the caller decides whether to retry).

    One run per entity at a time: a second copy (a redelivery racing the original, a
    re-run during a build) waits for the first, then finds its work done and skips it.
    ``max_lost``: after this many runs in a row whose process died (a video that crashes
    its decoder or exhausts memory), the entity fails instead of killing another worker."""
    spec = load_stages()[stage_name]
    wait_s = ctx.settings.celery.limits(stage_name).hard_s
    with entity_lock(ctx.engine, lock_name(ctx, spec.entity_type, entity_id), wait_s) as waited:
        lost = close_lost_attempts(ctx, stage_name, entity_id)
        if max_lost is not None and lost >= max_lost:
            return _give_up_lost(ctx, spec, entity_id, attempt, lost)
        return _run_locked(ctx, spec, entity_id, attempt, waited)


def _give_up_lost(ctx: Context, spec: StageSpec, entity_id: str, attempt: int, lost: int) -> StageResult:
    reason = (f"worker lost {lost} times running {spec.name} (killed, out of memory or a crash in "
              "native code); not tried again")
    with session_scope(ctx.sessions) as s:
        s.add(StageAttempt(build_id=build_of(ctx, spec.entity_type, entity_id), entity_type=spec.entity_type,
                           entity_id=entity_id, stage=spec.name, attempt=attempt, worker=ctx.worker,
                           status="error", error=reason, finished_at=utcnow(), duration_s=0.0))
    mark_terminal(ctx, spec.entity_type, entity_id, "failed", reason, error_stage=spec.name)
    return StageResult(status="failed", reason=reason)


def _run_locked(ctx: Context, spec: StageSpec, entity_id: str, attempt: int, waited: float) -> StageResult:
    build_id = build_of(ctx, spec.entity_type, entity_id)
    with session_scope(ctx.sessions) as s:
        row = StageAttempt(build_id=build_id, entity_type=spec.entity_type, entity_id=entity_id,
                           stage=spec.name, attempt=attempt, worker=ctx.worker, status="running")
        s.add(row)
        s.flush()
        attempt_id = row.id
    t0 = time.perf_counter()
    status, error, result = "failed", None, None
    try:
        result = spec.fn(ctx, entity_id)
        status, error = result.status, result.reason
        return result
    except BadInput as exc:
        mark_bad_input(ctx, spec.entity_type, entity_id, exc)
        status = "rejected" if isinstance(exc, Rejected) else "failed"
        error = exc.reason
        result = StageResult(status=status, reason=exc.reason)
        return result
    except BaseException as exc:
        status = "timeout" if type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded") else "error"
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        raise
    finally:
        with session_scope(ctx.sessions) as s:
            row = s.get(StageAttempt, attempt_id)
            # Closed by someone else already (the worker's hard-limit handler): theirs stands.
            if row is not None and row.status == "running":
                row.status = status
                row.error = error[:8000] if error else None
                row.finished_at = utcnow()
                row.duration_s = time.perf_counter() - t0
                details = dict(result.details) if result is not None else {}
                if waited >= 1.0:
                    details["waited_for_other_run_s"] = round(waited, 1)
                if details:
                    row.details = details


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
    retried; samples already recorded are skipped then)."""
    build_id = build_of(ctx, "sample", sample_ids[0]) if sample_ids else None
    for sid in sample_ids:   # attempts of a process that died under an earlier batch
        close_lost_attempts(ctx, step, sid)
    with session_scope(ctx.sessions) as s:
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
        _close_attempts(ctx, attempt_ids, dict.fromkeys(sample_ids, (status, error, None)), time.perf_counter() - t0)
        raise
    results: dict[str, StageResult] = {}
    closing = {}
    for sid in sample_ids:
        out = outcomes[sid]
        if isinstance(out, BadInput):
            mark_bad_input(ctx, "sample", sid, out)
            out = StageResult(status="rejected" if isinstance(out, Rejected) else "failed", reason=out.reason)
        results[sid] = out
        closing[sid] = (out.status, out.reason, out.details)
    _close_attempts(ctx, attempt_ids, closing, time.perf_counter() - t0)
    return results


def _cut_short(exc: BaseException) -> tuple[str, str]:
    """The status of a batch's attempts when an exception ends it: a time limit; the process
    being stopped (the unit's hard limit or a shutdown: what is left of it is lost); an error."""
    if type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded"):
        return "timeout", f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):
        return "lost", f"the process running this batch was stopped ({type(exc).__name__})"
    return "error", f"{type(exc).__name__}: {exc}"


def _close_attempts(ctx: Context, attempt_ids: dict[str, int], outcome: dict[str, tuple], batch_s: float) -> None:
    """Close a batch's attempts: each with its own status; the batch's time shared out."""
    with session_scope(ctx.sessions) as s:
        for sid, attempt_id in attempt_ids.items():
            row = s.get(StageAttempt, attempt_id)
            if row is None or row.status != "running":
                continue
            status, error, details = outcome[sid]
            row.status, row.error, row.finished_at = status, (error or "")[:8000] or None, utcnow()
            row.duration_s = batch_s / max(len(attempt_ids), 1)
            row.details = {**(row.details or {}), **(details or {}), "batch_s": round(batch_s, 3)}


@hot_query("video settled", lambda f: {"video_id": f.video})
def sample_states_of_video(video_id: str) -> Select:
    from opensubject_tasks.db.models import Clip, Pair, Subject

    return (select(Sample.state).join(Pair, Sample.pair_id == Pair.id)
            .join(Subject, Pair.subject_id == Subject.id)
            .join(Clip, Subject.clip_id == Clip.id).where(Clip.video_id == video_id))


def finalize_video(ctx: Context, video_id: str) -> str:
    """Give a video its terminal state once mining has completed and none of its samples
    is in flight: done (at least one verified sample) or rejected (none). Decided on
    evidence only: a video whose mining never completed keeps its state."""
    with session_scope(ctx.sessions) as s:
        video = s.get(Video, video_id, with_for_update=True)
        if video is None or video.state in ("failed", "rejected") or not stage_reached(video.stage_done, "mine"):
            return video.state if video else "missing"
        states = list(s.scalars(sample_states_of_video(video_id)))
        if any(st in SAMPLE_IN_FLIGHT for st in states):
            return video.state
        if any(st == "verified" for st in states):
            video.state, video.reason = "done", None
        else:
            video.state = "rejected"
            video.reason = video.reason or ("no sample passed verification" if states
                                            else "no subject pair found")
        return video.state

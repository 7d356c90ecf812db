"""What an orchestrator (Airflow) asks of the package: start a build, hand stages to the
Celery workers, and read progress and outcomes. No Airflow import here.

Airflow tasks call these in short-lived processes; Airflow triggers call the read-only
ones from a long-lived event loop (in a thread), so contexts are cached per settings.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

from sqlalchemy import func, select, update

from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Build, Sample, StageAttempt, Video
from opensubject_tasks.storage.base import slug

log = logging.getLogger(__name__)

TERMINAL_VIDEO = ("done", "rejected", "failed")
# Attempt statuses that mean "the code or the system broke", not "the input was bad".
ERROR_STATUSES = ("error", "timeout", "lost")

_contexts: dict[str, Context] = {}


def context() -> Context:
    """A Context for the current settings (environment), built once per process."""
    settings = load_settings()
    key = hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
    if key not in _contexts:
        _contexts[key] = Context.from_settings(settings)
    return _contexts[key]


# --- builds ---------------------------------------------------------------------------------
def build_id_for(params: dict[str, Any], run_id: str) -> str:
    """The build name from the run's parameters, or one made from the run id."""
    return slug(params.get("build_name") or run_id, 64)


def start_build(params: dict[str, Any], run_id: str) -> str:
    """Create (or re-open) the build row; returns the build id. A source the workers may
    not read is refused here, before any work (``SourceNotAllowed``)."""
    from opensubject_tasks.services.ingest import check_source_allowed, ensure_build

    ctx = context()
    if (params.get("source") or "").strip():
        check_source_allowed(ctx, params["source"].strip())
    build_id = build_id_for(params, run_id)
    ensure_build(ctx, build_id, {k: v for k, v in params.items()}, params.get("profile") or "cpu")
    return build_id


def claim_build_videos(build_id: str, limit: int | None = None,
                       video_ids: list[str] | None = None) -> list[str]:
    """The videos this build runs: with ``video_ids``, exactly those (taking any that no
    build holds); otherwise up to ``limit`` registered videos that no build holds
    (``FOR UPDATE SKIP LOCKED``), plus the build's own unfinished videos (a re-run resumes)."""
    from opensubject_tasks.services.ingest import claim_videos

    ctx = context()
    with session_scope(ctx.sessions) as s:
        if video_ids:
            s.execute(update(Video).where(Video.id.in_(video_ids), Video.build_id.is_(None))
                      .values(build_id=build_id).execution_options(synchronize_session=False))
    if not video_ids:
        claim_videos(ctx, build_id, limit or None)
    with session_scope(ctx.sessions) as s:
        q = select(Video.id).where(Video.build_id == build_id, Video.state.not_in(TERMINAL_VIDEO))
        if video_ids:
            q = q.where(Video.id.in_(video_ids))
        return sorted(s.scalars(q))


def finalize(video_id: str) -> str:
    from opensubject_tasks.services.common import finalize_video

    return finalize_video(context(), video_id)


def build_report(build_id: str) -> dict[str, Any]:
    """The build's funnel and states; marks the build done."""
    from opensubject_tasks.runner import funnel

    ctx = context()
    doc = funnel(ctx, build_id)
    with session_scope(ctx.sessions) as s:
        doc["samples_by_state"] = dict(s.execute(
            select(Sample.state, func.count()).where(Sample.build_id == build_id)
            .group_by(Sample.state)).all())
        doc["videos_by_state"] = dict(s.execute(
            select(Video.state, func.count()).where(Video.build_id == build_id)
            .group_by(Video.state)).all())
        build = s.get(Build, build_id)
        if build is not None and build.state == "running":
            build.state = "done"
    doc["build_id"] = build_id
    return doc


# --- hand-off to Celery ----------------------------------------------------------------------
def send_stage(stage: str, args: list[Any]) -> str:
    """Put one task on its queue; returns the Celery task id.

    A video or build stage is recorded on its row first (stage, task id, time), so a
    message the broker loses is sent again by the reconciler under the same id."""
    from opensubject_tasks.services.reconcile import record_queued
    from opensubject_tasks.tasks import send

    task_id = record_queued(context(), stage, str(args[0])) if args else None
    return send(stage, *args, **({"task_id": task_id} if task_id else {}))


def rerun_on_workers(stage: str, video_id: str, timeout_s: float, poll_s: float = 1.0) -> dict[str, Any]:
    """Hand one video stage to the workers, as a build does, and wait for its outcome in
    the attempt rows (retries included); TimeoutError when it has not ended in time."""
    import time

    ctx = context()
    with session_scope(ctx.sessions) as s:
        before = s.scalar(select(func.max(StageAttempt.id))) or 0
    send_stage(stage, [video_id])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope(ctx.sessions) as s:
            last = s.execute(select(StageAttempt.status, StageAttempt.error, StageAttempt.details)
                             .where(StageAttempt.id > before, StageAttempt.stage == stage,
                                    StageAttempt.entity_id == video_id)
                             .order_by(StageAttempt.id.desc()).limit(1)).first()
            video_state = s.scalar(select(Video.state).where(Video.id == video_id))
        if last is not None and last.status in ("ok", "rejected", "failed"):
            return {"status": last.status, "reason": last.error, "details": last.details or {}, "next": []}
        if last is not None and last.status in ERROR_STATUSES and video_state == "failed":
            return {"status": "failed", "reason": last.error, "details": last.details or {}, "next": []}
        time.sleep(poll_s)
    raise TimeoutError(f"{stage} of video {video_id} has not ended after {timeout_s:.0f} s; "
                       "`opensubject status` shows where it stands")


def enqueue_samples(sample_ids: list[str]) -> list[tuple[str, str]]:
    """Hand every unfinished sample its next stage; returns the (stage, sample) pairs sent."""
    from opensubject_tasks.services.resynth import enqueue_in_flight
    from opensubject_tasks.tasks import send

    return enqueue_in_flight(context(), sample_ids, send)


# --- progress ------------------------------------------------------------------------------------
def task_outcome(task_id: str) -> dict[str, Any] | None:
    """None while the Celery task is queued, running or waiting to retry; else its outcome."""
    from celery.result import AsyncResult

    from opensubject_tasks.celery_app import app

    res = AsyncResult(task_id, app=app)
    state = res.state
    if state == "SUCCESS":
        return {"status": "success", "result": res.result}
    if state in ("FAILURE", "REVOKED"):
        exc = res.result
        return {"status": "failure", "state": state,
                "error": f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc),
                "traceback": res.traceback or ""}
    return None


def samples_outcome(sample_ids: list[str]) -> dict[str, Any] | None:
    """None while any of the samples is still in flight; else their states and, for samples
    that failed on an error (not on bad input), the error of their last attempt."""
    ctx = context()
    with session_scope(ctx.sessions) as s:
        states = dict(s.execute(select(Sample.id, Sample.state).where(Sample.id.in_(sample_ids))).all())
        if any(st in ("pending", "synthesized") for st in states.values()):
            return None
        errors = []
        for sid in sorted(i for i, st in states.items() if st == "failed"):
            last = s.execute(select(StageAttempt.stage, StageAttempt.status, StageAttempt.error)
                             .where(StageAttempt.entity_type == "sample", StageAttempt.entity_id == sid)
                             .order_by(StageAttempt.id.desc()).limit(1)).first()
            if last is None:  # failed before any stage ran on it
                errors.append({"sample": sid, "stage": None, "error": s.get(Sample, sid).reason})
            elif last.status in ERROR_STATUSES:
                errors.append({"sample": sid, "stage": last.stage, "error": last.error})
    counts: dict[str, int] = {}
    for st in states.values():
        counts[st] = counts.get(st, 0) + 1
    missing = sorted(set(sample_ids) - set(states))
    return {"states": counts, "errors": errors, "missing": missing}

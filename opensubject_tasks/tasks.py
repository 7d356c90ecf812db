"""One thin Celery task per stage, over the same stage services the embedded runner uses.

Arguments are ids only. Each worker process builds its Context once (per build profile)
and keeps it, so database pools and model backends stay warm between tasks.

Failure rules, the same for every stage:

* bad input (``BadInput``/``Rejected``): ``run_stage`` records it on the entity; the task
  succeeds with that result and is never retried;
* transient trouble (store, database, broker, connection errors) and the soft time limit:
  retried with exponential backoff up to ``celery.max_retries``;
* anything else, or retries used up: the entity is marked ``failed`` with the error and the
  task fails, so the orchestrator shows the error text;
* the hard time limit kills the pool process; the worker records the attempt as ``timeout``
  and sends the task again under the same rules.

Sample stages chain themselves: synthesize hands its sample to verify, and verify hands it
back to synthesize when a re-synthesis is due (``StageResult.next``).
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import worker_init, worker_process_init
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError, OperationalError

from opensubject_tasks.celery_app import app, task_name
from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Build, StageAttempt
from opensubject_tasks.errors import TransientError
from opensubject_tasks.services.common import StageResult, build_of, mark_terminal, run_stage, utcnow
from opensubject_tasks.services.resynth import SAMPLE_STAGES, requeue

log = logging.getLogger(__name__)

STAGE_ENTITY = {"curate": "video", "mine": "video", "synthesize": "sample", "verify": "sample",
                "export": "build"}

# --- per-process context ------------------------------------------------------------------
_contexts: dict[str, Context] = {}
_contexts_pid: int | None = None


def worker_context(profile: str | None = None) -> Context:
    """This process's Context for a build profile, built on first use and then kept.

    A forked child never reuses its parent's database connections: contexts are per pid.
    """
    global _contexts_pid
    if _contexts_pid != os.getpid():
        for ctx in _contexts.values():
            ctx.engine.dispose(close=False)
        _contexts.clear()
        _contexts_pid = os.getpid()
    key = profile or ""
    if key not in _contexts:
        base = load_settings()
        settings = base if not profile or profile == base.profile else load_settings(profile=profile)
        _contexts[key] = Context.from_settings(settings)
    return _contexts[key]


def build_profile(ctx: Context, stage: str, entity_id: str) -> str | None:
    """The profile the entity's build was started with (None: the worker's own)."""
    build_id = build_of(ctx, STAGE_ENTITY.get(stage, ""), entity_id)
    if build_id is None:
        return None
    with session_scope(ctx.sessions) as s:
        return s.scalar(select(Build.profile).where(Build.id == build_id))


# --- retry rules ----------------------------------------------------------------------------
def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the same call may succeed later."""
    # IntegrityError: a unique key taken by a concurrent run of the same work; the retry
    # finds that run's rows and skips.
    if isinstance(exc, (TransientError, SoftTimeLimitExceeded, OperationalError, DisconnectionError,
                        IntegrityError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError

    return isinstance(exc, (BrokerError, RedisConnectionError))


def backoff_s(retries: int) -> float:
    """Exponential backoff with jitter: base * 2^retries, capped."""
    c = load_settings().celery
    delay = min(c.retry_backoff_max_s, c.retry_backoff_s * (2 ** retries))
    return delay * random.uniform(0.8, 1.0)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def give_up(stage: str, entity_id: str, reason: str) -> None:
    """Give the entity its terminal failed state with the error, so nothing is left in
    flight; a database that is down too must not hide the first error."""
    try:
        mark_terminal(worker_context(), STAGE_ENTITY.get(stage, ""), entity_id, "failed", reason)
    except Exception:  # noqa: BLE001
        log.exception("could not record the failure of %s(%s): %s", stage, entity_id, reason)


def send(stage: str, *args: str, **options: Any) -> str:
    """Put a stage task on its queue; returns the Celery task id.

    The time limits are left to the worker that runs the task (its configuration).
    Celery would otherwise copy the limits the *sending* process's tasks had when it
    first loaded them (an Airflow worker's, another configuration's) into the message,
    where they win over the worker's own."""
    options.setdefault("time_limit", None)
    options.setdefault("soft_time_limit", None)
    return app.send_task(task_name(stage), args=list(args), **options).id


# --- the task class -----------------------------------------------------------------------------
class StageTask(Task):
    """Runs ``run_stage(ctx, stage, entity_id)`` under the failure rules above."""

    stage: str = ""
    typing = True

    def run_stage_task(self, entity_id: str) -> dict[str, Any]:
        stage, retries = self.stage, self.request.retries
        try:
            ctx = worker_context(build_profile(worker_context(), stage, entity_id))
            result = run_stage(ctx, stage, entity_id, attempt=retries + 1)
        except Exception as exc:  # noqa: BLE001 - sorted into retry / give up below
            max_retries = load_settings().celery.max_retries
            if is_transient(exc) and retries < max_retries:
                log.warning("%s(%s) attempt %d: %s; retrying", stage, entity_id, retries + 1, error_text(exc))
                raise self.retry(exc=exc, countdown=backoff_s(retries), max_retries=max_retries) from exc
            give_up(stage, entity_id, f"{stage} failed after {retries + 1} attempt(s): {error_text(exc)}")
            raise
        self.follow_up(ctx, result)
        return result.to_dict()

    def follow_up(self, ctx: Context, result: StageResult) -> None:
        """Keep a sample cycling through synthesize and verify (re-synthesis included)."""
        if self.stage not in SAMPLE_STAGES:
            return
        for next_stage, sample_id in result.next:
            if next_stage in SAMPLE_STAGES:
                requeue(ctx, next_stage, sample_id, send)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """The hard time limit, in the worker's main process: Celery calls this, then kills
        the pool process. Record the timeout and send the task again under the same id (the
        retry rules of any timeout), or give up.

        The count of kills travels with the message (``hard_timeouts``): the killed process
        may still write its attempt row before it dies, so rows cannot be counted on."""
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return  # other failures were handled in the task body
        entity_id = args[0]
        kills = int((kwargs or {}).get("hard_timeouts", 0)) + 1
        error = f"hard time limit exceeded ({exc}); the process was killed"
        try:
            ctx = worker_context()
            max_retries = ctx.settings.celery.max_retries
            # A row of its own: the attempt's row belongs to the pool process, which is still
            # alive here and writes it as it is terminated (an error "SystemExit"), or leaves
            # it running (closed as lost when the task starts again).
            entity_type = STAGE_ENTITY.get(self.stage, "video")
            build_id = build_of(ctx, entity_type, entity_id)
            with session_scope(ctx.sessions) as s:
                s.add(StageAttempt(build_id=build_id, entity_type=entity_type, entity_id=entity_id,
                                   stage=self.stage, attempt=kills, worker=ctx.worker, status="timeout",
                                   error=error, finished_at=utcnow(), duration_s=0.0))
        except Exception:  # noqa: BLE001 - the database is down too: Celery's FAILURE stands
            log.exception("could not record the hard time limit of %s(%s)", self.stage, entity_id)
            return
        if kills <= max_retries:
            log.warning("%s(%s) hit the hard time limit (%d time(s)); sending it again",
                        self.stage, entity_id, kills)
            # Same task id: whoever waits on this task sees it go on instead of failing.
            self.apply_async(args=list(args), kwargs={"hard_timeouts": kills}, task_id=task_id,
                             countdown=backoff_s(kills - 1), retries=kills)
            self.backend.mark_as_retry(task_id, exc)
        else:
            give_up(self.stage, entity_id, f"{self.stage} failed: hard time limit exceeded {kills} time(s)")


@worker_init.connect
def _import_stages(**_: Any) -> None:
    """Import the stage services once in the main process, before the pool forks: every
    pool process starts with them loaded (shared pages, no import on the first task)."""
    from opensubject_tasks.services.common import load_stages

    load_stages()


@worker_process_init.connect
def _warm_context(**_: Any) -> None:
    """Each pool process builds its Context (database pool, store client) at start."""
    worker_context()


def _stage_task(stage: str):  # noqa: ANN202 - returns the registered Celery task
    def run(self: StageTask, entity_id: str, hard_timeouts: int = 0) -> dict[str, Any]:
        return self.run_stage_task(entity_id)

    run.__name__ = stage
    run.__doc__ = f"Run the {stage} stage on one entity (ids only)."
    return app.task(bind=True, base=StageTask, name=task_name(stage), stage=stage)(run)


curate = _stage_task("curate")
mine = _stage_task("mine")
synthesize = _stage_task("synthesize")
verify = _stage_task("verify")
export = _stage_task("export")


@app.task(bind=True, name=task_name("ingest"))
def ingest(self: Task, source: str, build_id: str | None = None) -> dict[str, Any]:
    """Register the videos under a source (a folder on the worker, or store://prefix/;
    empty: the configured raw-videos prefix). Returns the ids registered now."""
    from opensubject_tasks.services.ingest import check_source_allowed, register_source

    ctx = worker_context()
    source = check_source_allowed(ctx, source.strip() or f"store://{ctx.settings.store.raw_prefix}")
    build_id = build_id or None
    try:
        result = register_source(ctx, source, build_id=build_id)
    except Exception as exc:
        if is_transient(exc) and self.request.retries < ctx.settings.celery.max_retries:
            raise self.retry(exc=exc, countdown=backoff_s(self.request.retries),
                             max_retries=ctx.settings.celery.max_retries) from exc
        raise
    return {"source": source, "build_id": build_id, "new_ids": list(result.new_ids)}


@app.task(name=task_name("resynth_sweep"))
def resynth_sweep(older_than_s: float | None = None) -> dict[str, Any]:
    """Re-enqueue samples whose hand-off is older than ``verify.resynth_stuck_after_s``,
    and drop expired task results."""
    from opensubject_tasks.services.resynth import sweep_stuck

    ctx = worker_context()
    age = older_than_s if older_than_s is not None else ctx.settings.verify.resynth_stuck_after_s
    ids = sweep_stuck(ctx, age, send)
    if ids:
        log.warning("re-enqueued %d sample(s) whose work was lost: %s", len(ids), ", ".join(ids[:20]))
    # Task results older than result_expires (a day) leave the result table; with the
    # database backend nothing else removes them (Celery beat is not part of the stack).
    app.backend.cleanup()
    return {"requeued": ids}


def resend(stage: str, entity_id: str) -> str:
    """Send a unit of work again; a video or build stage keeps the task id it was first
    handed out under, so whoever waits on that id sees this run's outcome."""
    from opensubject_tasks.services.reconcile import queued_task_id

    task_id = queued_task_id(worker_context(), stage, entity_id)
    return send(stage, entity_id, **({"task_id": task_id} if task_id else {}))


def waiting_in_broker() -> set[tuple[str, str]] | None:
    """(stage, entity_id) of the messages the broker holds now (None: cannot tell)."""
    from opensubject_tasks.celery_app import QUEUES, TASK_PREFIX
    from opensubject_tasks.services.reconcile import waiting_in_redis

    prefix = (app.conf.broker_transport_options or {}).get("global_keyprefix", "")
    return waiting_in_redis(app.conf.broker_url, QUEUES, TASK_PREFIX, key_prefix=prefix)


@app.task(name=task_name("reconcile"))
def reconcile(older_than_s: float | None = None) -> dict[str, Any]:
    """Send again every unit of work (video stage, sample stage, export) still outstanding
    ``older_than_s`` (default ``verify.resynth_stuck_after_s``) after it was queued whose
    message the broker no longer holds: a flushed or restarted broker loses no work."""
    from opensubject_tasks.services.reconcile import reconcile as reconcile_work

    ctx = worker_context()
    age = older_than_s if older_than_s is not None else ctx.settings.verify.resynth_stuck_after_s
    waiting = waiting_in_broker()
    sent = reconcile_work(ctx, resend, older_than_s=age, waiting=waiting)
    if sent:
        log.warning("sent again %d unit(s) of work whose message was lost: %s", len(sent),
                    ", ".join(f"{st}({e})" for st, e in sent[:20]))
    return {"resent": [list(u) for u in sent]}

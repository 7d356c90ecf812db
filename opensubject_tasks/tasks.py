"""One thin Celery task per stage, over the same stage services the embedded runner uses.

Arguments are ids only. Each worker process builds its Context once (per build profile)
and keeps it, so database pools and model backends stay warm between tasks.

Each video walks its own chain on the workers (services/chain.py): curate hands it to
mine, mine to samples, which synthesizes and verifies the video's samples in batches
(re-synthesis included) and gives the video its terminal state. Orchestrators hand a
video to curate once and then read the database.

Failure rules, the same for every stage:

* bad input (``BadInput``/``Rejected``): ``run_stage`` records it on the entity; the task
  succeeds with that result and is never retried;
* transient trouble (store, database, broker, connection errors, a unique key taken by a
  concurrent copy) and the soft time limit: retried with exponential backoff up to
  ``celery.max_retries``;
* anything else, or retries used up: the entity is marked ``failed`` with the error and the
  stage that raised it (so that a retry redoes exactly that), and the task fails;
* the hard time limit kills the pool process; the worker records the attempt as ``timeout``
  and sends the task again under the same rules;
* a process that dies under a task (out of memory, a crash in native code) gives the
  message back (``task_reject_on_worker_lost``); after ``celery.max_worker_lost`` such
  deaths in a row the entity fails instead of taking down another worker.

Tasks an orchestrator waits for (ingest, export, reconcile) record their outcome in the
``task_outcomes`` table, which Airflow's triggers read: Celery itself keeps no results.
"""
from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import worker_init, worker_process_init
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError, OperationalError

from opensubject_tasks.catalogue import STAGES
from opensubject_tasks.celery_app import app, task_name
from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import StageAttempt, TaskOutcome
from opensubject_tasks.errors import TransientError
from opensubject_tasks.services.common import (
    build_of,
    close_running_attempts,
    entity_facts,
    mark_terminal,
    run_stage,
    utcnow,
)
from opensubject_tasks.storage import make_store

log = logging.getLogger(__name__)

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
        first = next(iter(_contexts.values()), None)
        if first is not None and first.settings.database_url == settings.database_url \
                and first.settings.db == settings.db:
            # one pool per process whatever the builds' profiles: connections stay bounded
            _contexts[key] = Context(settings, first.engine, first.sessions, make_store(settings.store))
        else:
            _contexts[key] = Context.from_settings(settings)
    return _contexts[key]


def build_profile(ctx: Context, stage: str, entity_id: str) -> str | None:
    """The profile the entity's build was started with (None: the worker's own)."""
    with session_scope(ctx.sessions) as s:
        return entity_facts(s, STAGES[stage].entity, entity_id).profile


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
    """Give the entity its terminal failed state with the error and the stage that raised
    it, so nothing is left in flight (a sample's video is settled too); a database that
    is down as well must not hide the first error."""
    try:
        ctx = worker_context()
        mark_terminal(ctx, STAGES[stage].entity, entity_id, "failed", reason, error_stage=stage)
        if STAGES[stage].entity == "sample":
            from opensubject_tasks.services.chain import settle_video_of_sample

            settle_video_of_sample(ctx, entity_id)
    except Exception:  # noqa: BLE001
        log.exception("could not record the failure of %s(%s): %s", stage, entity_id, reason)


def record_outcome(task_id: str | None, task: str, status: str, result: Any = None, error: str | None = None) -> None:
    """The final outcome of a task an orchestrator waits for (an upsert: a redelivered
    task's outcome replaces the first)."""
    if not task_id:
        return
    ctx = worker_context()
    with session_scope(ctx.sessions) as s:
        s.merge(TaskOutcome(task_id=task_id, task=task, status=status, result=result,
                            error=(error or "")[:8000] or None, finished_at=utcnow()))


def send(stage: str, *args: Any, **options: Any) -> str:
    """Put a task on its queue; returns the Celery task id.

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
    # Tasks an orchestrator waits for record their outcome (task_outcomes).
    records_outcome: bool = False

    def run_stage_task(self, entity_id: str) -> dict[str, Any]:
        stage, retries = self.stage, self.request.retries
        try:
            ctx = worker_context(build_profile(worker_context(), stage, entity_id))
            # the result, the hand-off down the video's chain and its message: run_stage
            result = run_stage(ctx, stage, entity_id, attempt=retries + 1,
                               max_lost=ctx.settings.celery.max_worker_lost, send=send)
        except Exception as exc:  # noqa: BLE001 - sorted into retry / give up below
            max_retries = load_settings().celery.max_retries
            if is_transient(exc) and retries < max_retries:
                log.warning("%s(%s) attempt %d: %s; retrying", stage, entity_id, retries + 1, error_text(exc))
                raise self.retry(exc=exc, countdown=backoff_s(retries), max_retries=max_retries) from exc
            reason = f"{stage} failed after {retries + 1} attempt(s): {error_text(exc)}"
            give_up(stage, entity_id, reason)
            if self.records_outcome:
                record_outcome(self.request.id, stage, "failure", error=reason)
            raise
        if self.records_outcome:
            record_outcome(self.request.id, stage, "success", result.to_dict())
        return result.to_dict()

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """The hard time limit, in the worker's main process: Celery (>= 5.7) calls this,
        then kills the pool process. Record the timeout on the attempt and send the task
        again under the same id (the retry rules of any timeout), or give up.

        The count of kills travels with the message (``hard_timeouts``): rows written by a
        process being killed cannot be counted on. Were this hook not called, the message
        would be acknowledged and the reconciler would send the work again."""
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return  # other failures were handled in the task body
        entity_id = args[0]
        kills = int((kwargs or {}).get("hard_timeouts", 0)) + 1
        error = f"hard time limit exceeded ({exc}); the process was killed"
        try:
            ctx = worker_context()
            max_retries = ctx.settings.celery.max_retries
            entity_type = STAGES[self.stage].entity
            with session_scope(ctx.sessions) as s:
                # The attempt the pool process opened (it is being killed: not "lost").
                closed = s.execute(close_running_attempts(self.stage, entity_id, "timeout", error)).rowcount
                if not closed:
                    s.add(StageAttempt(build_id=build_of(ctx, entity_type, entity_id), entity_type=entity_type,
                                       entity_id=entity_id, stage=self.stage, attempt=kills, worker=ctx.worker,
                                       status="timeout", error=error, finished_at=utcnow(), duration_s=0.0))
        except Exception:  # noqa: BLE001 - the database is down too: the reconciler sends it again
            log.exception("could not record the hard time limit of %s(%s)", self.stage, entity_id)
            return
        if kills <= max_retries:
            log.warning("%s(%s) hit the hard time limit (%d time(s)); sending it again",
                        self.stage, entity_id, kills)
            self.apply_async(args=list(args), kwargs={"hard_timeouts": kills}, task_id=task_id,
                             countdown=backoff_s(kills - 1), retries=kills)
        else:
            reason = f"{self.stage} failed: hard time limit exceeded {kills} time(s)"
            give_up(self.stage, entity_id, reason)
            if self.records_outcome:
                record_outcome(task_id, self.stage, "failure", error=reason)


def _stage_task(stage: str, records_outcome: bool = False):  # noqa: ANN202 - the registered task
    def run(self: StageTask, entity_id: str, hard_timeouts: int = 0) -> dict[str, Any]:
        return self.run_stage_task(entity_id)

    run.__name__ = stage
    run.__doc__ = f"Run the {stage} stage on one entity (ids only)."
    return app.task(bind=True, base=StageTask, name=task_name(stage), stage=stage,
                    records_outcome=records_outcome)(run)


curate = _stage_task("curate")
mine = _stage_task("mine")
samples = _stage_task("samples")
# A single sample's step (an operator's re-run; messages sent before samples units existed).
synthesize = _stage_task("synthesize")
verify = _stage_task("verify")
export_plan = _stage_task("export_plan", records_outcome=True)
export_part = _stage_task("export_part", records_outcome=True)
export = _stage_task("export", records_outcome=True)


# --- worker start ---------------------------------------------------------------------------------
_consumed_queues: tuple[str, ...] = ()


@worker_init.connect
def _before_fork(sender: Any = None, **_: Any) -> None:
    """In the worker's main process, before the pool forks: import the stage services (every
    pool process starts with them loaded) and note the queues this worker consumes."""
    global _consumed_queues
    from opensubject_tasks.services.common import load_stages

    load_stages()
    try:
        _consumed_queues = tuple(sorted(sender.app.amqp.queues.consume_from))
    except AttributeError:
        _consumed_queues = ()


@worker_process_init.connect
def _warm(**_: Any) -> None:
    """Each pool process builds its Context and loads the models of the stages its worker
    consumes before it takes a task, so no model load runs inside a task's time limit;
    then it reports ready (the container health check waits for every process)."""
    from opensubject_tasks.workers import mark_ready, warm_backends

    ctx = worker_context()
    warm_backends(ctx, _consumed_queues)
    mark_ready()


# --- work an orchestrator waits for ---------------------------------------------------------------
def outcome_recorded(task: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Record a plain task's outcome in task_outcomes, success or final failure."""
    def deco(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        @functools.wraps(fn)
        def wrapper(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
            try:
                result = fn(self, *args, **kwargs)
            except Exception as exc:
                from celery.exceptions import Retry

                if not isinstance(exc, Retry):
                    record_outcome(self.request.id, task, "failure", error=error_text(exc))
                raise
            record_outcome(self.request.id, task, "success", result)
            return result
        return wrapper
    return deco


@app.task(bind=True, name=task_name("ingest"))
@outcome_recorded("ingest")
def ingest(self: Task, source: str, build_id: str | None = None) -> dict[str, Any]:
    """Register the videos under a source (a folder on the worker under an allowed root, or
    store://prefix/; empty: the configured raw-videos prefix). A store prefix is listed from
    where the last run left it (services/listing.py): O(new), and a retry continues."""
    from opensubject_tasks.services.ingest import check_source_allowed, register_source
    from opensubject_tasks.services.listing import list_and_register
    from opensubject_tasks.storage.sources import parse_source

    ctx = worker_context()
    source = check_source_allowed(ctx, source.strip() or f"store://{ctx.settings.store.raw_prefix}")
    build_id = build_id or None
    src = parse_source(source)
    try:
        if src.kind == "store":
            return {"source": source, "build_id": build_id, **list_and_register(ctx, src.key, build_id).to_dict()}
        result = register_source(ctx, source, build_id=build_id)
    except Exception as exc:
        if is_transient(exc) and self.request.retries < ctx.settings.celery.max_retries:
            raise self.retry(exc=exc, countdown=backoff_s(self.request.retries),
                             max_retries=ctx.settings.celery.max_retries) from exc
        raise
    return {"source": source, "build_id": build_id, **result.to_dict()}


def waiting_in_broker() -> set[tuple[str, str]] | None:
    """(stage, entity_id) of the messages the broker holds now (None: cannot tell)."""
    from opensubject_tasks.catalogue import QUEUES
    from opensubject_tasks.celery_app import TASK_PREFIX
    from opensubject_tasks.services.reconcile import waiting_in_redis

    prefix = (app.conf.broker_transport_options or {}).get("global_keyprefix", "")
    return waiting_in_redis(app.conf.broker_url, QUEUES, TASK_PREFIX, key_prefix=prefix)


@app.task(bind=True, name=task_name("reconcile"))
@outcome_recorded("reconcile")
def reconcile(self: Task, older_than_s: float | None = None) -> dict[str, Any]:
    """Send again every unit of work (video stage, sample stage) still outstanding
    ``older_than_s`` (default ``celery.reconcile_after_s``) after it was handed out whose
    message the broker no longer holds and that no worker runs."""
    from opensubject_tasks.services.reconcile import reconcile as reconcile_work

    ctx = worker_context()
    age = older_than_s if older_than_s is not None else ctx.settings.celery.reconcile_after_s
    # The broker is read only if there are candidates (reconcile calls it then).
    sent = reconcile_work(ctx, send, older_than_s=age, waiting=waiting_in_broker)
    by_stage: dict[str, int] = {}
    for st, _ in sent:
        by_stage[st] = by_stage.get(st, 0) + 1
    if sent:
        log.warning("sent again %d unit(s) of work whose message was lost: %s%s; by stage: %s", len(sent),
                    ", ".join(f"{st}({e})" for st, e in sent[:20]), " ..." if len(sent) > 20 else "",
                    " ".join(f"{st}={n}" for st, n in sorted(by_stage.items())))
    return {"resent": len(sent), "by_stage": by_stage}

"""The Celery application: broker Redis; queues ``cpu`` (decoding, curation, export),
``gpu`` (model stages) and ``maintenance`` (ingest, reconcile), from the catalogue.

Workers start with ``celery -A opensubject_tasks.celery_app worker -Q cpu`` (or ``gpu``,
``maintenance``). Settings come from the environment (``OPENSUBJECT_*``), read when the
configuration is first needed, so importing this module is cheap and does no I/O.
"""
from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from opensubject_tasks.catalogue import QUEUES, STAGES
from opensubject_tasks.config import Settings, load_settings

TASK_PREFIX = "opensubject."


def task_name(stage: str) -> str:
    """The Celery task name of a stage (``curate`` -> ``opensubject.curate``)."""
    return TASK_PREFIX + stage


def queue_for(stage: str) -> str:
    """The queue a stage's tasks go to (the catalogue's)."""
    if stage not in STAGES:
        raise KeyError(f"no stage named {stage!r}; known: {sorted(STAGES)}")
    return STAGES[stage].queue


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict | None:
    """Celery router: every ``opensubject.<stage>`` task goes to its stage's queue."""
    if name.startswith(TASK_PREFIX):
        return {"queue": queue_for(name[len(TASK_PREFIX):])}
    return None


def result_backend_url(settings: Settings) -> str | None:
    """Celery keeps no task results by default: the stages record their outcome in the
    project's own tables, which orchestrators read through pooled connections."""
    return settings.celery.result_backend or None


def celery_config(settings: Settings) -> dict[str, Any]:
    c = settings.celery
    stages = set(c.time_limits) | set(STAGES)
    backend = result_backend_url(settings)
    return {
        "broker_url": settings.broker_url,
        "result_backend": backend,
        "task_ignore_result": backend is None,
        "broker_connection_retry_on_startup": True,
        # A message comes back to the queue if its worker dies before acknowledging it.
        "broker_transport_options": {
            "visibility_timeout": c.visibility_timeout_s,
            "unacked_restore_interval": c.unacked_restore_interval_s,
            "unacked_restore_throttle": c.unacked_restore_throttle,
            **({"global_keyprefix": c.broker_key_prefix} if c.broker_key_prefix else {}),
        },
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        "task_default_queue": "cpu",
        "task_routes": (route_task,),
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Acknowledge after the task ran, give the message back if the process dies, and
        # take one message at a time: a crash loses nothing and no task waits behind a
        # long one on a busy worker.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A replacement pool process loads its models before it reports ready.
        "worker_proc_alive_timeout": c.worker_ready_timeout_s,
        "task_track_started": backend is not None,
        "result_extended": True,
        "database_engine_options": {"pool_pre_ping": True},
        # A result that cannot be stored fails the task outside its body, and its message
        # is acknowledged: ride out a database restart (about 30 s of backoff) instead.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        "result_backend_base_sleep_between_retries_ms": 200,
        "result_backend_max_sleep_between_retries_ms": 5000,
        "task_annotations": {
            task_name(s): {"soft_time_limit": c.limits(s).soft_s, "time_limit": c.limits(s).hard_s}
            for s in sorted(stages)
        },
        # Events for flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


app = Celery("opensubject", include=["opensubject_tasks.tasks"])
# Evaluated when the configuration is first read, not at import.
app.add_defaults(lambda: celery_config(load_settings()))


def configure(settings: Settings | None = None) -> Celery:
    """Apply the current settings again, for a process whose environment changed after the
    configuration was first read (a test harness pointing at fresh services)."""
    app.conf.update(celery_config(settings or load_settings()))
    app.close()  # pooled broker connections were made with the old settings
    # So were the producers (the broker key prefix) and the result backend (its URL).
    app.amqp._producer_pool = None
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)
    return app

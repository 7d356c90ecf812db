"""Triggers that wait, in the triggerer's event loop, for work done by the Celery workers.

They hold no Airflow worker slot. Every check is one small query on the project's own
tables (a chunk's video states, a task's outcome row), run in a thread so the event loop
never blocks, through one pooled engine per triggerer process (``orchestrate.context``):
the number of PostgreSQL connections does not grow with the number of waiting tasks.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

_CLASSPATH = "opensubject_airflow.triggers."


async def _poll(check: Callable[[], dict[str, Any] | None], interval: float, log: Any) -> dict[str, Any]:
    """Call ``check`` in a thread every ``interval`` s until it returns an outcome."""
    while True:
        try:
            outcome = await asyncio.to_thread(check)
        except Exception as exc:  # noqa: BLE001 - a database hiccup: look again later
            log.warning("progress check failed (%s: %s); trying again in %ss",
                        type(exc).__name__, exc, interval)
            outcome = None
        if outcome is not None:
            return outcome
        await asyncio.sleep(interval)


async def _resume_not_before(started: float, min_wait: float) -> None:
    """Hold an event that resumes the task until ``min_wait`` s after the trigger started:
    the scheduler must first see the deferring run's exit, or it may take the resumed task
    for a stray (apache/airflow#67287, #72716). An event that ends the task needs no wait:
    a finished task instance is not mistaken for one (the scheduler's check covers queued
    and running states only)."""
    await asyncio.sleep(max(0.0, started + min_wait - asyncio.get_running_loop().time()))


class ChunkTrigger(BaseTrigger):
    """Fires once every video of a build's chunk is settled (terminal, or as far as the
    build goes). When no work of the chunk failed on an error, it ends the task here, green,
    with the chunk's summary in this log and as its result: a build's chunks need no second
    task process each (one Airflow task start costs seconds of CPU). Otherwise it resumes
    the task (payload ``{"videos": n, "settled": n}``), which lists the errors and turns red."""

    def __init__(self, build_id: str, chunk: int, poll_interval: float = 5.0, min_wait: float = 0.0) -> None:
        super().__init__()
        self.build_id, self.chunk = build_id, int(chunk)
        self.poll_interval, self.min_wait = poll_interval, min_wait

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (_CLASSPATH + "ChunkTrigger", {"build_id": self.build_id, "chunk": self.chunk,
                                             "poll_interval": self.poll_interval, "min_wait": self.min_wait})

    def _check(self) -> dict[str, Any] | None:
        from opensubject_tasks.orchestrate import chunk_progress

        return chunk_progress(self.build_id, self.chunk)

    def _clean_summary(self) -> dict[str, Any] | None:
        """The chunk's summary when none of its work failed on an error; else None."""
        from opensubject_airflow.operators import chunk_summary, log_chunk_report
        from opensubject_tasks.orchestrate import chunk_report

        report = chunk_report(self.build_id, self.chunk)
        if report["errors"]:
            return None
        log_chunk_report(self.log, report)
        return chunk_summary(report)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        started = asyncio.get_running_loop().time()
        progress = await _poll(self._check, self.poll_interval, self.log)
        try:
            summary = await asyncio.to_thread(self._clean_summary)
        except Exception as exc:  # noqa: BLE001 - the resumed task reads the report again
            self.log.warning("chunk report failed here (%s: %s); the task reads it", type(exc).__name__, exc)
            summary = None
        if summary is None:
            await _resume_not_before(started, self.min_wait)
            yield TriggerEvent(progress)
        else:
            yield TaskSuccessEvent(xcoms={"return_value": summary})


class TaskOutcomeTrigger(BaseTrigger):
    """Fires once a worker task (ingest, export, reconcile) has recorded its outcome.

    Payload: ``{"status": "success", "result": ...}`` or ``{"status": "failure", "error": ...}``.
    With ``end_on_success`` a success ends the task here, the result as its return value (for
    operators with nothing more to do then): no second task process.
    """

    def __init__(self, celery_task_id: str, poll_interval: float = 5.0, min_wait: float = 0.0,
                 end_on_success: bool = False, label: str = "") -> None:
        super().__init__()
        self.celery_task_id = celery_task_id
        self.poll_interval, self.min_wait = poll_interval, min_wait
        self.end_on_success, self.label = end_on_success, label

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (_CLASSPATH + "TaskOutcomeTrigger", {"celery_task_id": self.celery_task_id,
                                                   "poll_interval": self.poll_interval, "min_wait": self.min_wait,
                                                   "end_on_success": self.end_on_success, "label": self.label})

    def _check(self) -> dict[str, Any] | None:
        from opensubject_tasks.orchestrate import task_outcome

        return task_outcome(self.celery_task_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        started = asyncio.get_running_loop().time()
        outcome = await _poll(self._check, self.poll_interval, self.log)
        if self.end_on_success and outcome["status"] == "success":
            self.log.info("%s ended: %s", self.label or self.celery_task_id, outcome["result"])
            yield TaskSuccessEvent(xcoms={"return_value": outcome["result"]})
        else:
            await _resume_not_before(started, self.min_wait)
            yield TriggerEvent(outcome)


try:  # Airflow >= 3.0
    from airflow.triggers.base import BaseEventTrigger
except ImportError:  # pragma: no cover - older Airflow: no event-driven scheduling
    BaseEventTrigger = BaseTrigger


class StoreEventsTrigger(BaseEventTrigger):
    """Watches the bucket-notification table (MinIO's PostgreSQL target writes it) for an
    ``AssetWatcher``: fires each time events newer than the last it saw are waiting. One
    index lookup per ``poll_interval``; runs forever. Payload: ``{"newest_event": id}`` (the
    newest row's id, never the objects)."""

    def __init__(self, poll_interval: float = 2.0) -> None:
        super().__init__()
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (_CLASSPATH + "StoreEventsTrigger", {"poll_interval": self.poll_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from opensubject_tasks.orchestrate import store_events_pending

        seen = 0
        while True:
            try:
                newest = await asyncio.to_thread(store_events_pending)
            except Exception as exc:  # noqa: BLE001 - a database hiccup: look again later
                self.log.warning("bucket events check failed (%s: %s)", type(exc).__name__, exc)
                newest = 0
            if newest > seen:
                yield TriggerEvent({"newest_event": newest})
                seen = newest
            await asyncio.sleep(self.poll_interval)

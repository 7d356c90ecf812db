"""Triggers that wait, in the triggerer's event loop, for work done by the Celery workers.

They hold no Airflow worker slot. Every check is one small database query (the Celery
result row, or the samples' states), run in a thread so the event loop never blocks.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

# A FAILURE that turns back into RETRY within this time was a hard time limit that the
# worker sent again (see opensubject_tasks.tasks.StageTask.on_failure).
CONFIRM_FAILURE_S = 2.0
_CLASSPATH = "opensubject_airflow.triggers."


async def _poll(check: Callable[[], dict[str, Any] | None], interval: float, log: Any,
                min_wait: float = 0.0) -> dict[str, Any]:
    """Call ``check`` in a thread every ``interval`` s until it returns an outcome; never
    return before ``min_wait`` s have passed."""
    earliest = asyncio.get_running_loop().time() + min_wait
    while True:
        try:
            outcome = await asyncio.to_thread(check)
        except Exception as exc:  # noqa: BLE001 - a database hiccup: look again later
            log.warning("progress check failed (%s: %s); trying again in %ss",
                        type(exc).__name__, exc, interval)
            outcome = None
        if outcome is not None:
            await asyncio.sleep(max(0.0, earliest - asyncio.get_running_loop().time()))
            return outcome
        await asyncio.sleep(interval)


class CeleryTaskTrigger(BaseTrigger):
    """Fires once the Celery task has succeeded or failed for good.

    Payload: ``{"status": "success", "result": ...}`` or
    ``{"status": "failure", "error": "...", "traceback": "..."}``.
    """

    def __init__(self, celery_task_id: str, poll_interval: float = 5.0, min_wait: float = 0.0) -> None:
        super().__init__()
        self.celery_task_id = celery_task_id
        self.poll_interval = poll_interval
        self.min_wait = min_wait

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (_CLASSPATH + "CeleryTaskTrigger", {"celery_task_id": self.celery_task_id,
                                                   "poll_interval": self.poll_interval, "min_wait": self.min_wait})

    def _check(self) -> dict[str, Any] | None:
        from opensubject_tasks.orchestrate import task_outcome

        return task_outcome(self.celery_task_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            outcome = await _poll(self._check, self.poll_interval, self.log, self.min_wait)
            if outcome["status"] == "failure":
                await asyncio.sleep(CONFIRM_FAILURE_S)
                again = await asyncio.to_thread(self._check)
                if again is None:  # sent again by the worker: keep waiting
                    continue
                outcome = again
            yield TriggerEvent(outcome)
            return


class SamplesTrigger(BaseTrigger):
    """Fires once none of the samples is in flight (pending or synthesized) any more:
    the synthesize/verify loop, re-synthesis included, has ended for each of them.

    Payload: ``{"states": {state: count}, "errors": [{"sample", "stage", "error"}], "missing": [...]}``.
    """

    def __init__(self, sample_ids: list[str], poll_interval: float = 5.0, min_wait: float = 0.0) -> None:
        super().__init__()
        self.sample_ids = list(sample_ids)
        self.poll_interval = poll_interval
        self.min_wait = min_wait

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (_CLASSPATH + "SamplesTrigger", {"sample_ids": self.sample_ids,
                                                "poll_interval": self.poll_interval, "min_wait": self.min_wait})

    def _check(self) -> dict[str, Any] | None:
        from opensubject_tasks.orchestrate import samples_outcome

        return samples_outcome(self.sample_ids)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(await _poll(self._check, self.poll_interval, self.log, self.min_wait))

"""The Airflow triggers' timing, on a real PostgreSQL: an event that ends its task fires at
once; one that resumes the task waits ``min_wait`` (an Airflow race, see triggers.py)."""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import TaskOutcome

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
from opensubject_airflow.triggers import TaskOutcomeTrigger  # noqa: E402
from airflow.triggers.base import TaskSuccessEvent  # noqa: E402

MIN_WAIT = 2.0


def first_event(trigger):
    async def first():
        async for event in trigger.run():
            return event
    t = time.monotonic()
    event = asyncio.run(asyncio.wait_for(first(), 30))
    return event, time.monotonic() - t


@pytest.mark.parametrize(("status", "end_on_success", "ends_task"), [
    ("success", True, True), ("success", False, False), ("failure", True, False)])
def test_only_an_event_that_resumes_the_task_waits_min_wait(orchestrate_ctx, status, end_on_success, ends_task):
    task_id = f"t-{status}-{end_on_success}"
    with session_scope(orchestrate_ctx.sessions) as s:
        s.add(TaskOutcome(task_id=task_id, task="register", status=status,
                          result={"registered": 3} if status == "success" else None,
                          error=None if status == "success" else "boom"))
    trigger = TaskOutcomeTrigger(task_id, poll_interval=0.05, min_wait=MIN_WAIT, end_on_success=end_on_success)
    event, took = first_event(trigger)
    assert isinstance(event, TaskSuccessEvent) is ends_task
    if ends_task:
        assert took < MIN_WAIT / 2 and event.xcoms == {"return_value": {"registered": 3}}
    else:
        assert took >= MIN_WAIT and event.payload["status"] == status

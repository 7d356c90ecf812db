"""Operators that hand OpenSubject work to the Celery workers and wait without a worker slot.

``execute`` puts the task on its Celery queue (a few milliseconds) and defers to a trigger;
the triggerer waits; ``execute_complete`` runs when the work has ended, logs the outcome
and fails the Airflow task with the worker's error text when the work failed.

A Celery failure is final here (``AirflowFailException``): the worker already applied the
retry rules and recorded the failure on the entity. Airflow's own retries cover what
happens on the Airflow side (the broker unreachable at hand-off, a lost trigger).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

DEFAULT_WAIT = timedelta(hours=24)
# "false": wait inside the task (holding an Airflow worker slot) instead of deferring to the
# triggerer, for installations without a triggerer. Read when a task runs, not at parse time.
DEFERRABLE_ENV = "OPENSUBJECT_AIRFLOW_DEFERRABLE"


def _deferrable() -> bool:
    import os

    return os.environ.get(DEFERRABLE_ENV, "true").strip().lower() not in ("0", "false", "no")


def _wait(operator: BaseOperator, trigger: Any, timeout: timedelta, context: Any) -> Any:
    """Defer to the triggerer; or, when deferral is off, run the same trigger here."""
    if _deferrable():
        operator.defer(trigger=trigger, method_name="execute_complete", timeout=timeout)
    import asyncio

    async def first_event() -> Any:
        async for event in trigger.run():
            return event.payload
        return None

    try:
        payload = asyncio.run(asyncio.wait_for(first_event(), timeout.total_seconds()))
    except TimeoutError:
        raise AirflowFailException(f"no outcome after {timeout}") from None
    return operator.execute_complete(context, payload)


def _timing(poll_interval: float | None) -> dict[str, float]:
    """The triggers' poll interval and minimum wait, from the settings."""
    from opensubject_tasks.config import load_settings

    c = load_settings().celery
    return {"poll_interval": c.poll_interval_s if poll_interval is None else poll_interval,
            "min_wait": c.trigger_min_wait_s}


def _switched_off(context: Any, toggle: str | None) -> bool:
    return bool(toggle) and not context["params"].get(toggle, True)


class CeleryStageOperator(BaseOperator):
    """Run ``opensubject.<stage>(*args)`` on a Celery worker and return its result.

    :param stage: a stage (curate, mine, export) or worker task (ingest, resynth_sweep).
    :param args: the task's arguments (ids only), templated.
    :param after: the previous stage's result (an XComArg); the stage runs only if that
        result's ``next`` lists ``(stage, args[0])``, so a rejected video stops here.
    :param toggle: name of a boolean run parameter that switches this stage off.
    """

    template_fields = ("args", "after")
    ui_color = "#e8f1fb"

    def __init__(self, *, stage: str, args: Any = (), after: Any = None, toggle: str | None = None,
                 poll_interval: float | None = None, wait_timeout: timedelta = DEFAULT_WAIT,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage = stage
        self.args = args
        self.after = after
        self.toggle = toggle
        self.poll_interval = poll_interval
        self.wait_timeout = wait_timeout

    def execute(self, context: Any) -> Any:
        from opensubject_airflow.triggers import CeleryTaskTrigger
        from opensubject_tasks.orchestrate import send_stage

        if _switched_off(context, self.toggle):
            raise AirflowSkipException(f"{self.stage} is switched off for this run")
        args = [self.args] if isinstance(self.args, str) else list(self.args)
        if self.after is not None:
            wanted = [self.stage, args[0]]
            if wanted not in [list(n) for n in self.after.get("next", [])]:
                raise AirflowSkipException(
                    f"nothing to {self.stage}: the previous stage ended {self.after.get('status')}"
                    f" ({self.after.get('reason') or 'no follow-up work'})")
        celery_id = send_stage(self.stage, args)
        self.log.info("Handed opensubject.%s%s to Celery as task %s", self.stage, tuple(args), celery_id)
        return _wait(self, CeleryTaskTrigger(celery_id, **_timing(self.poll_interval)),
                     self.wait_timeout, context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        if event["status"] == "success":
            result = event["result"]
            if isinstance(result, dict) and "status" in result:
                self.log.info("%s ended %s%s; next: %d item(s)", self.stage, result["status"],
                              f" ({result['reason']})" if result.get("reason") else "",
                              len(result.get("next") or []))
            return result
        self.log.error("Celery task for %s%s failed on the worker:\n%s\n%s", self.stage,
                       tuple(self.args) if not isinstance(self.args, str) else (self.args,),
                       event.get("error"), event.get("traceback", ""))
        raise AirflowFailException(f"{self.stage} failed on the Celery worker: {event.get('error')}")


class SamplesOperator(BaseOperator):
    """Synthesize and verify every sample a mining result lists, re-synthesis included.

    Each unfinished sample gets its next stage on the ``gpu`` queue; the workers then keep
    it cycling (synthesize -> verify -> synthesize ...) until it is verified or rejected.
    The task waits for all of them and fails, with the errors, if any sample failed on an
    error rather than on its input.
    """

    template_fields = ("after",)
    ui_color = "#fbeee8"

    def __init__(self, *, after: Any, toggle: str | None = None, poll_interval: float | None = None,
                 wait_timeout: timedelta = DEFAULT_WAIT, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.after = after
        self.toggle = toggle
        self.poll_interval = poll_interval
        self.wait_timeout = wait_timeout

    def execute(self, context: Any) -> Any:
        from opensubject_airflow.triggers import SamplesTrigger
        from opensubject_tasks.orchestrate import enqueue_samples

        if _switched_off(context, self.toggle):
            raise AirflowSkipException("synthesis is switched off for this run")
        sample_ids = sorted({i for st, i in (self.after or {}).get("next", []) if st == "synthesize"})
        if not sample_ids:
            raise AirflowSkipException("mining found no subject pair: no sample to synthesize")
        sent = enqueue_samples(sample_ids)
        self.log.info("%d sample(s); handed %d to Celery: %s", len(sample_ids), len(sent),
                      ", ".join(f"{st}({sid})" for st, sid in sent[:20]))
        return _wait(self, SamplesTrigger(sample_ids, **_timing(self.poll_interval)),
                     self.wait_timeout, context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        self.log.info("samples by state: %s", event["states"])
        if event.get("missing"):
            self.log.warning("samples no longer in the database: %s", ", ".join(event["missing"]))
        if event["errors"]:
            for err in event["errors"]:
                self.log.error("sample %s failed in %s on the Celery worker:\n%s",
                               err["sample"], err["stage"], err["error"])
            first = event["errors"][0]
            raise AirflowFailException(
                f"{len(event['errors'])} sample(s) failed on the Celery worker; first: "
                f"{first['sample']} in {first['stage']}: {(first['error'] or '').splitlines()[0]}")
        return event

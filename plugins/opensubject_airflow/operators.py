"""Operators that hand OpenSubject work to the Celery workers and wait without a worker slot.

``execute`` puts the work on its queue (milliseconds) and defers to a trigger; the
triggerer waits. Work that ended well and needs nothing more of the task ends it in the
trigger (its summary in the log, its result as the return value): an Airflow task process
costs about a second of CPU. Otherwise ``execute_complete`` runs, logs the outcome and
fails the Airflow task, with the errors, when work failed on an error.

* ``ChunkOperator``: one chunk of a build's videos (mapped over the chunks). The workers
  chain each video's stages; the task waits until the database says every video of the
  chunk is settled. It ends red when videos ended in an *error* (not bad input), listing
  each with its stage and error; clearing it retries exactly those (and anything lost).
* ``CeleryTaskOperator``: one worker task (ingest, export, reconcile) whose outcome the
  worker records in the project's tables.

A worker's failure is final here (``AirflowFailException``): the worker already applied the
retry rules and recorded the failure. Airflow's own retries cover the Airflow side (the
broker unreachable at hand-off, a lost trigger).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

DEFAULT_WAIT = timedelta(hours=24)
CHUNK_WAIT = timedelta(days=7)
# "false": wait inside the task (holding an Airflow worker slot) instead of deferring to the
# triggerer, for installations without a triggerer. Read when a task runs, not at parse time.
DEFERRABLE_ENV = "OPENSUBJECT_AIRFLOW_DEFERRABLE"
MAX_LISTED = 50  # failed videos listed one per line in a chunk's log


def _deferrable() -> bool:
    import os

    return os.environ.get(DEFERRABLE_ENV, "true").strip().lower() not in ("0", "false", "no")


def _wait(operator: BaseOperator, trigger: Any, timeout: timedelta, context: Any) -> Any:
    """Defer to the triggerer; or, when deferral is off, run the same trigger here."""
    if _deferrable():
        operator.defer(trigger=trigger, method_name="execute_complete", timeout=timeout)
    import asyncio

    from airflow.triggers.base import TaskSuccessEvent

    async def first_event() -> Any:
        async for event in trigger.run():
            return event
        return None

    try:
        event = asyncio.run(asyncio.wait_for(first_event(), timeout.total_seconds()))
    except TimeoutError:
        raise AirflowFailException(f"no outcome after {timeout}") from None
    if isinstance(event, TaskSuccessEvent):  # the trigger ended the task: its result is final
        return (event.xcoms or {}).get("return_value")
    return operator.execute_complete(context, event.payload if event is not None else None)


def _timing(poll_interval: float | None) -> dict[str, float]:
    """The triggers' poll interval and minimum wait, from the settings."""
    from opensubject_tasks.config import load_settings

    c = load_settings().celery
    return {"poll_interval": c.poll_interval_s if poll_interval is None else poll_interval,
            "min_wait": c.trigger_min_wait_s}


def _switched_off(context: Any, toggle: str | None) -> bool:
    return bool(toggle) and not context["params"].get(toggle, True)


def dashboard_url(build_id: str) -> str:
    """The dataset page of a build, as Airflow's UI users reach it."""
    from urllib.parse import quote

    from airflow.configuration import conf

    base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    return f"{base}/opensubject/?build={quote(build_id)}"


def log_chunk_report(log: Any, report: dict[str, Any]) -> None:
    """A settled chunk's videos by state and its bad inputs by reason (errors apart)."""
    log.info("chunk %s: %d video(s) by state %s", report["chunk"], report["videos"], report["states"])
    for reason, n in sorted(report["bad_input"].items(), key=lambda kv: -kv[1]):
        log.info("not used (input): %d x %s", n, reason)


def chunk_summary(report: dict[str, Any]) -> dict[str, Any]:
    """A chunk task's result."""
    return {k: report[k] for k in ("chunk", "videos", "states", "bad_input")}


class ChunkOperator(BaseOperator):
    """Hand one chunk of a build's videos to the workers and wait until all are settled.

    :param build_id: the build (templated; usually the ``start`` task's result).
    :param chunk: the chunk number (mapped over ``claim``'s list).
    """

    template_fields = ("build_id",)
    ui_color = "#e8f1fb"

    def __init__(self, *, build_id: Any, chunk: int, poll_interval: float | None = None,
                 wait_timeout: timedelta = CHUNK_WAIT, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.build_id, self.chunk = build_id, chunk
        self.poll_interval, self.wait_timeout = poll_interval, wait_timeout

    def execute(self, context: Any) -> Any:
        from opensubject_airflow.triggers import ChunkTrigger
        from opensubject_tasks.orchestrate import start_chunk

        counts = start_chunk(self.build_id, int(self.chunk))
        self.log.info("chunk %s of build %s: %d video(s); %d waiting for a place in flight (%d retried "
                      "after an error), sent %d lost unit(s) again; %d handed to the workers now",
                      self.chunk, self.build_id, counts["videos"], counts["waiting"] + counts["retried"],
                      counts["retried"], counts["resent"], counts["handed_out"])
        return _wait(self, ChunkTrigger(self.build_id, int(self.chunk), **_timing(self.poll_interval)),
                     self.wait_timeout, context)

    def execute_complete(self, context: Any, event: Any) -> dict[str, Any]:
        """Runs when the chunk's trigger found work failed on an error (a green chunk ends
        in the trigger), or where the trigger runs in this process (no triggerer, dag.test)."""
        from opensubject_tasks.orchestrate import chunk_report

        self.log.info("chunk %s resumed to read its outcome", self.chunk)
        report = chunk_report(self.build_id, int(self.chunk))
        log_chunk_report(self.log, report)
        errors = report["errors"]
        if errors:
            self.log.error("%d piece(s) of work failed on an error (details: %s):", len(errors),
                           dashboard_url(self.build_id))
            for e in errors[:MAX_LISTED]:
                where = f"sample {e['sample']}" if e["sample"] else "video"
                self.log.error("video %s (%s), %s, stage %s: %s", e["video"], e["name"], where, e["stage"],
                               (e["error"] or "").splitlines()[0] if e["error"] else "")
            if len(errors) > MAX_LISTED:
                self.log.error("... and %d more", len(errors) - MAX_LISTED)
            raise AirflowFailException(
                f"{len(errors)} piece(s) of work in chunk {self.chunk} failed on an error; clear this task "
                "to retry exactly those")
        return chunk_summary(report)


class CeleryTaskOperator(BaseOperator):
    """Run ``opensubject.<stage>(*args)`` on a worker and return its result.

    :param stage: ingest, export or reconcile.
    :param args: the task's arguments (ids or a source), templated.
    :param toggle: name of a boolean run parameter that switches this task off.
    """

    template_fields = ("args",)
    ui_color = "#fbeee8"
    # a success needs nothing more of this task: the trigger ends it (see on_result)
    ends_in_trigger = True

    def __init__(self, *, stage: str, args: Any = (), toggle: str | None = None,
                 poll_interval: float | None = None, wait_timeout: timedelta = DEFAULT_WAIT,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage, self.args, self.toggle = stage, args, toggle
        self.poll_interval, self.wait_timeout = poll_interval, wait_timeout

    def execute(self, context: Any) -> Any:
        from opensubject_airflow.triggers import TaskOutcomeTrigger
        from opensubject_tasks.orchestrate import send_task

        reason = self.skip_reason(context)
        if reason:
            raise AirflowSkipException(reason)
        args = [self.args] if isinstance(self.args, str) else list(self.args)
        celery_id = send_task(self.stage, args)
        self.log.info("Handed opensubject.%s%s to the workers as task %s", self.stage, tuple(args), celery_id)
        trigger = TaskOutcomeTrigger(celery_id, **_timing(self.poll_interval), end_on_success=self.ends_in_trigger,
                                     label=self.stage)
        return _wait(self, trigger, self.wait_timeout, context)

    def execute_complete(self, context: Any, event: dict[str, Any] | str) -> Any:
        if not isinstance(event, dict):
            # the trigger ended the task on success, its result pushed there; only a run
            # that plays triggers in the task's process (dag.test) hands that end back here
            self.log.info("%s ended (result in the trigger's log)", self.stage)
            return None
        if event["status"] == "success":
            result = event["result"]
            self.log.info("%s ended: %s", self.stage, result)
            self.on_result(context, result)
            return result
        self.log.error("%s failed on the worker: %s", self.stage, event.get("error"))
        raise AirflowFailException(f"{self.stage} failed on the worker: {event.get('error')}")

    def skip_reason(self, context: Any) -> str | None:
        """Why this run does not need this task (None: it does)."""
        if _switched_off(context, self.toggle):
            return f"{self.stage} is switched off for this run"
        return None

    def on_result(self, context: Any, result: Any) -> None:
        """What to do with a successful result (nothing here; an operator that does
        something sets ``ends_in_trigger = False``, so that it resumes to do it)."""


class _ExportStep(CeleryTaskOperator):
    """A step of the export: skipped, like the embedded runner's, when the run stops before
    verify (no sample exists yet to export)."""

    def skip_reason(self, context: Any) -> str | None:
        until = context["params"].get("until") or "verify"
        if until != "verify":
            return f"nothing to export: this run goes up to {until}, samples come at verify"
        return super().skip_reason(context)


class ExportPlanOperator(_ExportStep):
    """Plan a build's export on a worker; returns its parts as the arguments of the
    ``export_part`` tasks mapped over them (at most ``export.max_parts``)."""

    def __init__(self, *, build_id: Any, **kwargs: Any) -> None:
        super().__init__(stage="export_plan", args=[build_id], **kwargs)

    ends_in_trigger = False  # its result becomes the parts to map over

    def execute_complete(self, context: Any, event: dict[str, Any]) -> list[list[str]]:
        result = super().execute_complete(context, event)
        parts = (result.get("details") or {}).get("parts") or []
        self.log.info("export planned in %d part(s)", len(parts))
        return [[p] for p in parts]


class ExportOperator(_ExportStep):
    """Finish a build's export on a worker (its parts written), then publish it: each asset
    in ``outlets`` gets an event saying which build, where and how many samples, so a
    training DAG scheduled on the asset finds the new dataset."""

    def __init__(self, *, build_id: Any, **kwargs: Any) -> None:
        super().__init__(stage="export", args=[build_id], **kwargs)

    ends_in_trigger = False  # publishes the asset event

    def on_result(self, context: Any, result: Any) -> None:
        details = (result or {}).get("details") or {}
        extra = {"build": self.args[0], "location": details.get("root"),
                 "samples": details.get("samples"), "shards": details.get("shards")}
        for asset in self.outlets:
            context["outlet_events"][asset].extra = extra

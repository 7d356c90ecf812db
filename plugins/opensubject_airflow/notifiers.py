"""A failed build run tells someone: Airflow's notifier interface, off by default.

``OPENSUBJECT_FAILURE_NOTIFY`` (read when the DAG file is parsed) names where:

* ``https://...`` / ``http://...``: a JSON POST (a chat or incident webhook);
* ``file:///path/notifications.jsonl``: one JSON line appended per failure.

The message names the DAG, the run, the failed tasks and the dataset page.
"""
from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import BaseNotifier

NOTIFY_ENV = "OPENSUBJECT_FAILURE_NOTIFY"


class FailureNotifier(BaseNotifier):
    template_fields = ("target",)

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    @staticmethod
    def message(context: dict[str, Any]) -> dict[str, Any]:
        dag_run = context.get("dag_run")
        params = context.get("params") or {}
        failed: list[str] = []
        try:
            failed = sorted({f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id
                             for ti in dag_run.get_task_instances(state=["failed"])})
        except Exception as exc:  # noqa: BLE001 - the message goes out without the list
            failed = [f"(could not list: {type(exc).__name__})"]
        build = params.get("build_name") or getattr(dag_run, "run_id", "")
        return {"event": "opensubject build run failed", "dag_id": getattr(dag_run, "dag_id", None),
                "run_id": getattr(dag_run, "run_id", None), "build": build, "failed_tasks": failed,
                "reason": str(context.get("reason") or ""), "at": datetime.now(UTC).isoformat(),
                "dashboard": f"/opensubject/?build={build}"}

    def notify(self, context: dict[str, Any]) -> None:
        body = json.dumps(self.message(context), default=str)
        if self.target.startswith("file://"):
            from urllib.parse import unquote, urlsplit

            with open(unquote(urlsplit(self.target).path), "a", encoding="utf-8") as f:
                f.write(body + "\n")
            return
        import urllib.request

        req = urllib.request.Request(self.target, data=body.encode(), method="POST",  # noqa: S310 - http(s) only
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=15):  # noqa: S310 - a configured http(s) webhook
            pass


def failure_notifiers() -> list[FailureNotifier]:
    """The DAGs' ``on_failure_callback``: empty unless OPENSUBJECT_FAILURE_NOTIFY is set."""
    target = os.environ.get(NOTIFY_ENV, "").strip()
    if not target:
        return []
    if not target.startswith(("http://", "https://", "file://")):
        raise ValueError(f"{NOTIFY_ENV} must be an http(s):// webhook or a file:// path, not {target!r}")
    return [FailureNotifier(target)]

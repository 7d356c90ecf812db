"""The one repair path: find work whose queue message was lost (still outstanding long
after it was handed out, not on the broker, run by no worker: a broker restart or flush,
a dropped publish) and hand it out again; each re-send counts on its video or sample.
A GPU backlog that is queued and waiting its turn is never sent twice.

Schedule: `OPENSUBJECT_RECONCILE_SCHEDULE` (default every 15 minutes); the age limit is
`OPENSUBJECT_CELERY__RECONCILE_AFTER_S` on the workers. Runs on a `maintenance` worker.
"""
from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import dag
from opensubject_airflow.notifiers import failure_notifiers
from opensubject_airflow.operators import CeleryTaskOperator


@dag(
    dag_id="opensubject_reconcile",
    description="Send again work whose queue message was lost",
    schedule=os.environ.get("OPENSUBJECT_RECONCILE_SCHEDULE", "*/15 * * * *"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["opensubject", "maintenance"],
    doc_md=__doc__,
    on_failure_callback=failure_notifiers(),
    default_args={"owner": "opensubject", "retries": 2, "retry_delay": timedelta(minutes=1)},
)
def opensubject_reconcile():
    CeleryTaskOperator(task_id="reconcile", stage="reconcile", args=[], wait_timeout=timedelta(hours=1))


opensubject_reconcile()

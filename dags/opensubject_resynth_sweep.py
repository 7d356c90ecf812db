"""Find work whose queue message was lost (still outstanding long after it was queued,
e.g. after a broker restart or flush) and queue it again: samples' synthesize/verify
hand-offs (`sweep`), and every video stage, sample stage and export whose message the
broker no longer holds (`reconcile`, see opensubject_tasks/services/reconcile.py).

Schedule: `OPENSUBJECT_RESYNTH_SWEEP_SCHEDULE` (default every 15 minutes); the age
limit is `OPENSUBJECT_VERIFY__RESYNTH_STUCK_AFTER_S` on the workers.
"""
from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import dag
from opensubject_airflow.operators import CeleryStageOperator


@dag(
    dag_id="opensubject_resynth_sweep",
    description="Re-enqueue lost re-synthesis work",
    schedule=os.environ.get("OPENSUBJECT_RESYNTH_SWEEP_SCHEDULE", "*/15 * * * *"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["opensubject", "maintenance"],
    doc_md=__doc__,
    default_args={"owner": "opensubject", "retries": 2, "retry_delay": timedelta(minutes=1)},
)
def opensubject_resynth_sweep():
    sweep = CeleryStageOperator(task_id="sweep", stage="resynth_sweep", args=[])
    reconcile = CeleryStageOperator(task_id="reconcile", stage="reconcile", args=[])
    sweep >> reconcile


opensubject_resynth_sweep()

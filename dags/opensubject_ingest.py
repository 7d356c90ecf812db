"""Pick up new videos: list the raw-videos prefix of the object store, register what is
new (by content identity, so nothing is registered twice) and trigger an
`opensubject_build` run for exactly those videos.

Schedule: `OPENSUBJECT_INGEST_SCHEDULE` (cron or preset, default `@hourly`), read when
the file is parsed. The listing and registration run on a Celery `cpu` worker.
"""
from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task
from opensubject_airflow.operators import CeleryStageOperator


@dag(
    dag_id="opensubject_ingest",
    description="Register new videos from the store and build them",
    schedule=os.environ.get("OPENSUBJECT_INGEST_SCHEDULE", "@hourly"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["opensubject", "ingest"],
    doc_md=__doc__,
    default_args={"owner": "opensubject", "retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "source": Param(None, type=["null", "string"], title="Source",
                        description="store://<prefix>/ to list. Empty: the configured raw-videos "
                                    "prefix (OPENSUBJECT_STORE__RAW_PREFIX)."),
        "profile": Param("cpu", type="string", enum=["cpu", "gpu", "tiny"], title="Profile",
                         description="Profile of the builds this run triggers."),
    },
)
def opensubject_ingest():
    register = CeleryStageOperator(task_id="register_new", stage="ingest", args=["{{ params.source or '' }}"])

    @task
    def build_conf(registered: dict, params=None, run_id=None) -> dict:
        """The build's parameters: only the videos registered now."""
        from airflow.sdk.exceptions import AirflowSkipException
        from opensubject_tasks.storage.base import slug

        new_ids = registered["new_ids"]
        print(f"{len(new_ids)} new video(s) under {registered['source']}")
        if not new_ids:
            raise AirflowSkipException("no new videos")
        return {"build_name": slug(f"ingest-{run_id}", 64), "video_ids": new_ids,
                "profile": params["profile"], "source": "", "limit": 0}

    conf = build_conf(register.output)
    trigger = TriggerDagRunOperator(task_id="trigger_build", trigger_dag_id="opensubject_build",
                                    conf=conf, wait_for_completion=False)
    conf >> trigger


opensubject_ingest()

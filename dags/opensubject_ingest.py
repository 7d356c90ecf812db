"""Pick up new videos: list the raw-videos prefix of the object store, register what is
new (by content identity, so nothing is registered twice; a byte-identical copy is
recorded as a duplicate) and trigger an `opensubject_build` run that claims every
registered video no build holds yet.

New objects normally arrive through bucket notifications (`opensubject_events`); this
scheduled listing is the safety net for a lost one. It remembers what it has seen
(services/listing.py): a run with nothing new costs list calls only, and a pass stopped by
its time budget or a killed worker continues where it stopped.

Nothing is stranded: the build claims *all* unclaimed videos, not only the ones this run
registered, so a video registered by an attempt that was interrupted, or whose trigger
failed, is built by the next run. The triggered run's id is derived from this run's
(`ingest__<run id>`) and skipped when it exists: a retried trigger starts no second build.

Schedule: `OPENSUBJECT_INGEST_SCHEDULE` (cron or preset, default `@hourly`), read when
the file is parsed. The listing and registration run on a `maintenance` worker.
"""
from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task
from opensubject_airflow.notifiers import failure_notifiers
from opensubject_airflow.operators import CeleryTaskOperator


@dag(
    dag_id="opensubject_ingest",
    description="Register new videos from the store and build them",
    schedule=os.environ.get("OPENSUBJECT_INGEST_SCHEDULE", "@hourly"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["opensubject", "ingest"],
    doc_md=__doc__,
    on_failure_callback=failure_notifiers(),
    default_args={"owner": "opensubject", "retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "source": Param(None, type=["null", "string"], title="Source",
                        description="store://<prefix>/ to list. Empty: the configured raw-videos "
                                    "prefix (OPENSUBJECT_STORE__RAW_PREFIX)."),
        "profile": Param("cpu", type="string", enum=["cpu", "gpu", "small", "tiny"], title="Profile",
                         description="Profile of the builds this run triggers."),
    },
)
def opensubject_ingest():
    register = CeleryTaskOperator(task_id="register_new", stage="ingest", args=["{{ params.source or '' }}"])

    @task(trigger_rule="all_done")
    def build_conf(params=None, run_id=None) -> dict:
        """The build's parameters, when any registered video waits for a build."""
        from airflow.sdk.exceptions import AirflowSkipException
        from opensubject_tasks.orchestrate import waiting_build_conf

        conf = waiting_build_conf(f"ingest-{run_id}", params["profile"])
        if conf is None:
            raise AirflowSkipException("no video waits for a build")
        return conf

    conf = build_conf()
    trigger = TriggerDagRunOperator(task_id="trigger_build", trigger_dag_id="opensubject_build",
                                    trigger_run_id="ingest__{{ run_id }}", skip_when_already_exists=True,
                                    conf=conf, wait_for_completion=False)
    register >> conf >> trigger


opensubject_ingest()

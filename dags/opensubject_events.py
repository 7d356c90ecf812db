"""Build new videos as they land: bucket notifications, not listing.

MinIO (or S3 through a forwarder, docs/distributed.md) writes an event for each new or
overwritten object to the `store_events` table. `StoreEventsTrigger`, an `AssetWatcher` of
the asset `opensubject_store_events`, runs in the triggerer and fires when new rows wait;
each firing is an asset event that schedules this DAG. Its task registers the objects of
the waiting events under the raw-videos prefix (identity from the event: no listing, no
download) and then, per the **Build** setting:

* empty (default): triggers an `opensubject_build` run that claims every registered video
  no build holds, as the scheduled ingest does;
* a build name: the new videos join that build and are handed to the queues at once (a
  later run of that build, e.g. its re-run for the export, waits for them in its chunks).

The default comes from `OPENSUBJECT_EVENTS_BUILD`; a manual run's form can change it. Only
counts reach the task log and XCom. Events are deleted once registered; a lost one is found
by the scheduled listing (`opensubject_ingest`).
"""
from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, AssetWatcher, Param, dag, task
from opensubject_airflow.notifiers import failure_notifiers
from opensubject_airflow.triggers import StoreEventsTrigger

STORE_EVENTS = Asset(
    name="opensubject_store_events", uri="opensubject://store-events",
    watchers=[AssetWatcher(name="opensubject_store_events_watcher",
                           trigger=StoreEventsTrigger(
                               poll_interval=float(os.environ.get("OPENSUBJECT_EVENTS_POLL_S", "2"))))])


@dag(
    dag_id="opensubject_events",
    description="Register the videos bucket notifications announce and build them",
    schedule=[STORE_EVENTS],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["opensubject", "ingest", "events"],
    doc_md=__doc__,
    on_failure_callback=failure_notifiers(),
    default_args={"owner": "opensubject", "retries": 2, "retry_delay": timedelta(seconds=10)},
    params={
        "build": Param(os.environ.get("OPENSUBJECT_EVENTS_BUILD", ""), type="string", title="Build",
                       description="Empty: start a build of every waiting video. A build name: the new "
                                   "videos join that build and go to the queues at once."),
        "profile": Param("cpu", type="string", enum=["cpu", "gpu", "small", "tiny"], title="Profile",
                         description="Profile of the builds this run starts."),
    },
)
def opensubject_events():
    @task
    def register_events(params=None) -> dict:
        """Register (and, with a build name, hand out) what the waiting events announce."""
        from opensubject_tasks.orchestrate import consume_store_events

        counts = consume_store_events(params["build"] or None)
        print(f"bucket events: {counts}")
        return counts

    @task
    def build_conf(counts: dict, params=None, run_id=None) -> dict:
        """The build to start, when no build was named and registered videos wait for one."""
        from airflow.sdk.exceptions import AirflowSkipException
        from opensubject_tasks.orchestrate import waiting_build_conf

        if params["build"]:
            raise AirflowSkipException(f"the new videos joined build {params['build']!r}")
        conf = waiting_build_conf(f"events-{run_id}", params["profile"])
        if conf is None:
            raise AirflowSkipException("no video waits for a build")
        return conf

    conf = build_conf(register_events())
    trigger = TriggerDagRunOperator(task_id="trigger_build", trigger_dag_id="opensubject_build",
                                    trigger_run_id="events__{{ run_id }}", skip_when_already_exists=True,
                                    conf=conf, wait_for_completion=False)
    conf >> trigger


opensubject_events()

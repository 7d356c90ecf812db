"""Build an OpenSubject dataset from registered videos.

Trigger it from the UI ("Trigger DAG"): the form shows the parameters below. Each video
gets its own task group: curate -> mine -> synthesize+verify (every sample, re-synthesis
included) -> finalize. Every stage runs on the Celery workers (`cpu` / `gpu` queues);
Airflow tasks only hand work over and wait in the triggerer. A video rejected or failed
at one stage stops there with its reason; the other videos go on, and the build is
exported and reported at the end. The `watch` task turns the run red when any stage
failed on an error (bad input is recorded, not an error).
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task, task_group
from opensubject_airflow.operators import CeleryStageOperator, SamplesOperator

STAGE_TOGGLES = {
    "curate": "Curate (probe, shots, quality, keyframes)",
    "mine": "Mine subjects and pairs",
    "synthesize": "Synthesize and verify samples (re-synthesis included)",
    "export": "Export shards, manifest and report",
}


@dag(
    dag_id="opensubject_build",
    description="Videos in, a subject-driven generation/manipulation corpus out",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["opensubject", "build"],
    doc_md=__doc__,
    default_args={"owner": "opensubject", "retries": 2, "retry_delay": timedelta(seconds=30),
                  "retry_exponential_backoff": 2.0},
    params={
        "build_name": Param(None, type=["null", "string"], title="Build name",
                            description="Names the dataset (datasets/<name>/ in the store). Re-using a "
                                        "name resumes that build. Empty: the run id.",
                            pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})?$"),
        "source": Param(None, type=["null", "string"], title="Source",
                        description="Register new videos from here first: store://<prefix>/ (the "
                                    "object store) or a folder on the workers. Empty: use the videos "
                                    "registered already."),
        "profile": Param("cpu", type="string", enum=["cpu", "gpu", "tiny"], title="Profile",
                         description="Model backends: cpu = classical (no weights), gpu = the paper's "
                                     "models (weights on the workers), tiny = test models."),
        "limit": Param(0, type="integer", minimum=0, title="Most videos",
                       description="Most registered videos to claim for this build (0: all)."),
        "video_ids": Param([], type=["null", "array"], items={"type": "string"}, title="Only these videos",
                           description="Video ids to build (as sent by opensubject_ingest). "
                                       "Empty: claim registered videos."),
        **{name: Param(True, type="boolean", title=title) for name, title in STAGE_TOGGLES.items()},
    },
)
def opensubject_build():
    @task
    def start(params=None, run_id=None) -> str:
        from airflow.sdk.exceptions import AirflowFailException
        from opensubject_tasks.errors import BadInput
        from opensubject_tasks.orchestrate import start_build

        try:
            return start_build(dict(params), run_id)
        except BadInput as exc:  # a source the workers may not read: no retry, nothing started
            raise AirflowFailException(str(exc)) from None

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def has_source(params=None) -> bool:
        return bool((params["source"] or "").strip())

    @task(trigger_rule="none_failed")
    def claim(build_id: str, params=None) -> list[str]:
        from opensubject_tasks.orchestrate import claim_build_videos

        ids = claim_build_videos(build_id, params["limit"], params["video_ids"] or [])
        print(f"build {build_id}: {len(ids)} video(s) to process")
        return ids

    @task(trigger_rule="one_failed", retries=0)
    def watch() -> None:
        """Turns the run red when any stage failed on an error (see the red task's log)."""
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException("a stage failed on a Celery worker: see the failed task's log")

    watcher = watch()

    @task_group(group_id="video")
    def per_video(video_id: str) -> None:
        curate = CeleryStageOperator(task_id="curate", stage="curate", args=[video_id], toggle="curate")
        mine = CeleryStageOperator(task_id="mine", stage="mine", args=[video_id], after=curate.output,
                                   toggle="mine")
        samples = SamplesOperator(task_id="synthesize_verify", after=mine.output, toggle="synthesize")

        @task(trigger_rule="all_done")
        def finalize(video_id: str, params=None) -> str:
            """The video's terminal state (done / rejected / failed) once its samples ended."""
            from opensubject_tasks.orchestrate import finalize as finalize_video

            if not params["synthesize"]:
                return "not finalized: synthesis switched off"
            return finalize_video(video_id)

        curate >> mine >> samples >> finalize(video_id)
        [curate, mine, samples] >> watcher

    @task(trigger_rule="all_done")
    def report(build_id: str) -> dict:
        from opensubject_tasks.orchestrate import build_report

        doc = build_report(build_id)
        print(f"build {build_id}: funnel {doc['funnel']}, videos {doc['videos_by_state']}, "
              f"samples {doc['samples_by_state']}")
        return doc

    build_id = start()
    register = CeleryStageOperator(task_id="register", stage="ingest",
                                   args=["{{ params.source or '' }}", build_id])
    videos = claim(build_id)
    has_source() >> register >> videos
    groups = per_video.expand(video_id=videos)
    export = CeleryStageOperator(task_id="export", stage="export", args=[build_id], toggle="export",
                                 trigger_rule="all_done")
    groups >> export >> report(build_id)
    [register, videos, export] >> watcher


opensubject_build()

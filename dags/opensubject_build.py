"""Build an OpenSubject dataset from registered videos.

Trigger it from the UI ("Trigger DAG"): the form shows the parameters below. `claim` takes
the build's videos and splits the ones with work left into chunks; one `chunk` task per
chunk hands its videos to the Celery workers, which chain each video's stages along the
catalogue's stage graph (curate -> mine -> samples: each video's samples synthesized and
verified in batches, re-synthesis included), and waits in the triggerer until
the database says every video of the chunk is settled. A video rejected or failed on its
input stops with its reason; the other videos go on. A chunk whose videos failed on an
*error* turns red and lists them (stage and error) in its log: clear it to retry exactly
those. Then the dataset is exported (`export_plan`, one `export_part` per part of its
shards, `export`; skipped when the run stops before verify) and published as the
`opensubject_dataset` asset, and the build is reported; `watch` turns the run red when any
task failed.

Task instances grow with chunks, not videos (a 10^6-video build stays under `[core]
max_map_length`). A chunk task registers its videos as waiting and defers: all chunks are
active at once, and at most `OPENSUBJECT_CELERY__MAX_VIDEOS_IN_FLIGHT` videos are queued or
running, each finished video handing out the next waiting one from any chunk.
"""
from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, task
from opensubject_airflow.notifiers import failure_notifiers
from opensubject_airflow.operators import CeleryTaskOperator, ChunkOperator, ExportOperator, ExportPlanOperator

# Export parts of one run at once (Airflow's max_active_tis_per_dagrun). Read when the file
# is parsed.
MAX_ACTIVE_CHUNKS = int(os.environ.get("OPENSUBJECT_MAX_ACTIVE_CHUNKS", "16"))
DATASET = Asset(name="opensubject_dataset", uri="opensubject://datasets")


@dag(
    dag_id="opensubject_build",
    description="Videos in, a subject-driven generation/manipulation corpus out",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["opensubject", "build"],
    doc_md=__doc__,
    on_failure_callback=failure_notifiers(),
    default_args={"owner": "opensubject", "retries": 2, "retry_delay": timedelta(seconds=30),
                  "retry_exponential_backoff": 2.0},
    params={
        "build_name": Param(None, type=["null", "string"], title="Build name",
                            description="Names the dataset (datasets/<name>/ in the store). Re-using a "
                                        "name resumes that build. Empty: the run id.",
                            pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})?$"),
        "source": Param(None, type=["null", "string"], title="Source",
                        description="Register new videos from here first: store://<prefix>/ (the "
                                    "object store) or a folder on the workers under an allowed root "
                                    "(OPENSUBJECT_INGEST__ALLOWED_ROOTS). Empty: use the videos "
                                    "registered already."),
        "profile": Param("cpu", type="string", enum=["cpu", "gpu", "small", "tiny"], title="Profile",
                         description="Model backends: cpu = classical (no weights), gpu = the paper's "
                                     "models (weights on the workers), small = small real models "
                                     "for CPU workers, tiny = test models."),
        "limit": Param(0, type="integer", minimum=0, title="Most videos",
                       description="Most registered videos to claim for this build (0: all)."),
        "video_ids": Param([], type=["null", "array"], items={"type": "string"}, title="Only these videos",
                           description="Video ids to build. Empty: claim registered videos."),
        "until": Param("verify", type="string", enum=["curate", "mine", "verify"], title="Run up to",
                       description="The last stage: curate (clips and keyframes), mine (subjects and "
                                   "pairs) or verify (synthesized, verified and captioned samples)."),
        "export": Param(True, type="boolean", title="Export shards, manifest and report",
                        description="After verify (a run up to curate or mine exports nothing)."),
        "chunk_size": Param(0, type="integer", minimum=0, title="Videos per chunk",
                            description="0: automatic (at least 1,000, and as many as needed to stay "
                                        "within Airflow's max_map_length)."),
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
    def claim(build_id: str, params=None) -> list[int]:
        """Chunk numbers of the build's videos with work left (what `chunk` maps over)."""
        from airflow.configuration import conf
        from opensubject_tasks.orchestrate import claim_build_videos

        chunks = claim_build_videos(build_id, params["limit"], params["video_ids"] or [],
                                    max_chunks=conf.getint("core", "max_map_length"),
                                    chunk_size=params["chunk_size"] or 0)
        print(f"build {build_id}: {len(chunks)} chunk(s) to process")
        return chunks

    @task(trigger_rule="one_failed", retries=0)
    def watch() -> None:
        """Turns the run red when any task failed (see the red task's log)."""
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException("a task of this build failed: see its log")

    @task(trigger_rule="all_done")
    def report(build_id: str) -> dict:
        from opensubject_tasks.orchestrate import build_report

        doc = build_report(build_id)
        print(f"build {build_id}: funnel {doc['funnel']}, videos {doc['videos_by_state']}, "
              f"samples {doc['samples_by_state']}")
        return doc

    build_id = start()
    register = CeleryTaskOperator(task_id="register", stage="ingest",
                                  args=["{{ params.source or '' }}", build_id])
    chunks = claim(build_id)
    has_source() >> register >> chunks
    # no cap on chunks: the bound is on videos in flight (services/handoff.py)
    work = ChunkOperator.partial(task_id="chunk", build_id=build_id).expand(chunk=chunks)
    # The export, split to scale with the build: its plan, one task per part of its shards
    # (each retried alone), then the manifest, stats, report and training layout.
    plan = ExportPlanOperator(task_id="export_plan", build_id=build_id, toggle="export", trigger_rule="all_done")
    parts = CeleryTaskOperator.partial(task_id="export_part", stage="export_part",
                                       max_active_tis_per_dagrun=MAX_ACTIVE_CHUNKS).expand(args=plan.output)
    export = ExportOperator(task_id="export", build_id=build_id, toggle="export", trigger_rule="none_failed",
                            outlets=[DATASET])
    work >> plan >> parts >> export >> report(build_id)
    [register, chunks, work, plan, parts, export] >> watch()


opensubject_build()

"""Builds through the real Airflow components (not ``dag.test()``): ``scheduler`` with the
LocalExecutor, ``dag-processor``, ``triggerer`` and ``api-server`` on a PostgreSQL
metadata database, a Celery worker and the S3 test server, all separate processes; runs
triggered and tasks cleared through the REST API, as the UI does (the stack:
tests/scale_stack.py; a red chunk cleared: tests/test_scale_red_chunk.py).

* ``[core] max_map_length`` is lowered to 8 and a build gets more videos than 8 chunks
  of the asked size hold: the chunk size grows to fit, and the build finishes exactly
  (the rows and objects of an embedded build of the same videos);
* a retried trigger of the ingest DAG starts no second build run.
"""
from __future__ import annotations

import uuid

import pytest
from scale_stack import upload_videos

pytestmark = pytest.mark.timeout(1800)


def test_build_beyond_max_map_length_through_the_real_scheduler(scale, tmp_path):
    from airflow_fixtures import row_snapshot

    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.orchestrate import context
    from opensubject_tasks.runner import run_build
    from opensubject_tasks.storage import make_store
    from opensubject_tasks.testmedia.samples import make_tiny_videos

    stack = scale["stack"]
    videos = make_tiny_videos(tmp_path / "media", 20)
    upload_videos(scale["store"], videos, "raw")
    stack.unpause("opensubject_build")
    # 20 videos asked in chunks of 2 would need 10 chunks, over the limit of 8: chunks of 3.
    run_id = stack.trigger("opensubject_build", {"source": "store://raw/", "build_name": "scale", "chunk_size": 2})
    assert stack.wait_run("opensubject_build", run_id, timeout=1200) == "success"
    tis = stack.task_instances("opensubject_build", run_id)
    chunks = sorted(t["map_index"] for t in tis if t["task_id"] == "chunk")
    parts = [t for t in tis if t["task_id"] == "export_part"]
    # 7 chunks, the export's parts, and start, has_source, register, claim, export_plan,
    # export, report, watch: task instances grow with chunks, not videos
    assert chunks == list(range(7)) and len(parts) == 1 and len(tis) == 7 + len(parts) + 8
    assert {t["state"] for t in tis if t["task_id"] != "watch"} <= {"success", "skipped"}

    # Exactly the build an embedded run makes of the same videos.
    ref_store = scale["store_settings"].model_copy(update={"bucket": f"ref-{uuid.uuid4().hex[:8]}"})
    upload_videos(make_store(ref_store), videos, "raw")
    settings = load_settings(database_url=f"sqlite:///{tmp_path / 'ref.db'}", store=ref_store.model_dump(),
                             curate={"min_short_side": 64}, mine={"max_pairs_per_subject": 1},
                             verify={"max_attempts": 2}, backends={"quality": "classical"})
    ref = Context.from_settings(settings)
    run_build(ref, ["store://raw/"], "scale")
    got, want = row_snapshot(context()), row_snapshot(ref)
    assert len(got["videos"]) == 20 and {st for _, st in got["videos"].values()} <= {"done", "rejected"}
    for table in ("videos", "clips", "subjects", "pairs", "samples"):
        assert got[table] == want[table], table
    assert {o.key for o in scale["store"].list("videos/")} == {o.key for o in ref.store.list("videos/")}
    assert any(o.key.endswith("manifest.parquet") for o in scale["store"].list("datasets/scale/"))


def test_a_retried_trigger_starts_no_second_build_run(scale, tmp_path):
    from opensubject_tasks.testmedia.samples import make_tiny_videos

    stack = scale["stack"]
    stack.http("PATCH", "/api/v2/dags/opensubject_build", {"is_paused": True})  # the triggered run waits
    upload_videos(scale["store"], make_tiny_videos(tmp_path / "media", 1, start=300), "raw")
    stack.unpause("opensubject_ingest")
    run_id = stack.trigger("opensubject_ingest", {}, run_id=f"manual-ingest-{uuid.uuid4().hex[:6]}")
    assert stack.wait_run("opensubject_ingest", run_id, timeout=600) == "success"
    triggered = [r for r in stack.runs("opensubject_build") if r["dag_run_id"] == f"ingest__{run_id}"]
    assert len(triggered) == 1
    # The trigger task runs again (a retry, or an operator's clear): no second build run.
    stack.clear("opensubject_ingest", run_id, ["trigger_build"])
    assert stack.wait_run("opensubject_ingest", run_id, timeout=600) == "success"
    again = [r for r in stack.runs("opensubject_build") if r["dag_run_id"].startswith(f"ingest__{run_id}")]
    assert len(again) == 1 and again[0]["dag_run_id"] == triggered[0]["dag_run_id"]

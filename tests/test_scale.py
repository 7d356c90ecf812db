"""Builds through the real Airflow components (not ``dag.test()``): ``scheduler`` with the
LocalExecutor, ``dag-processor``, ``triggerer`` and ``api-server`` on a PostgreSQL
metadata database, a Celery worker and the S3 test server, all separate processes; runs
triggered and tasks cleared through the REST API, as the UI does.

* ``[core] max_map_length`` is lowered to 8 and a build gets more videos than 8 chunks
  of the asked size hold: the chunk size grows to fit, and the build finishes exactly
  (the rows and objects of an embedded build of the same videos);
* one video fails on an error: its chunk turns red and lists it, the run fails and the
  failure notifier writes its message; clearing the red chunk (and what follows it) runs
  again exactly that video's work, and the run turns green;
* a retried trigger of the ingest DAG starts no second build run.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from airflow_fixtures import service_env
from airflow_stack import AirflowStack, celery_worker, pg_database, wait_for

pytestmark = pytest.mark.timeout(1800)

MAP_LENGTH = 8
SETTINGS = {"OPENSUBJECT_CURATE__MIN_SHORT_SIDE": "64", "OPENSUBJECT_MINE__MAX_PAIRS_PER_SUBJECT": "1",
            "OPENSUBJECT_VERIFY__MAX_ATTEMPTS": "2"}
WIDE = (192, 108)  # the size of the video the test backend fails on


@pytest.fixture(scope="module")
def scale(tmp_path_factory, redis_url, s3_server):
    from opensubject_tasks.config import StoreSettings
    from opensubject_tasks.storage import make_store

    work = tmp_path_factory.mktemp("scale")
    flag = work / "fail-flag"
    store_settings = StoreSettings(kind="minio", endpoint=s3_server.endpoint, access_key="testkey",
                                   secret_key="testsecret", bucket=f"scale-{uuid.uuid4().hex[:8]}")
    with pg_database("os_scale_airflow") as af_url, pg_database("os_scale_data") as data_url:
        env = service_env(data_url, redis_url, store_settings, **SETTINGS,
                          OPENSUBJECT_BACKENDS__QUALITY="fail_wide",
                          OPENSUBJECT_TEST_FAIL_WIDTH=str(WIDE[0]), OPENSUBJECT_TEST_FAIL_FLAG=str(flag),
                          OPENSUBJECT_CELERY__MAX_RETRIES="1", OPENSUBJECT_CELERY__RETRY_BACKOFF_S="0.2",
                          OPENSUBJECT_CELERY__POLL_INTERVAL_S="1", OPENSUBJECT_CELERY__TRIGGER_MIN_WAIT_S="5",
                          OPENSUBJECT_FAILURE_NOTIFY=(work / "notify.jsonl").as_uri(),
                          OPENSUBJECT_MAX_ACTIVE_CHUNKS="4",
                          AIRFLOW__CORE__MAX_MAP_LENGTH=str(MAP_LENGTH),
                          PYTHONPATH=str(Path(__file__).parent))
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # this process reads the same database and store as the stack
        from opensubject_tasks.celery_app import configure
        from opensubject_tasks.db.engine import make_engine, upgrade

        configure()
        engine = make_engine(data_url)
        upgrade(engine)
        engine.dispose()
        stack = AirflowStack(work, af_url, env).start()
        worker = celery_worker(env, work / "worker.log", "scale", concurrency=2, include="fickle_backend")
        try:
            stack.wait_parsed("opensubject_build", "opensubject_ingest")
            yield {"stack": stack, "worker": worker, "store": make_store(store_settings), "flag": flag,
                   "work": work, "store_settings": store_settings}
        finally:
            worker.stop()
            stack.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _upload(store, paths, prefix: str) -> None:  # noqa: ANN001
    for p in paths:
        store.put_file(f"{prefix}/{p.name}", p, "video/mp4")


def _attempt_counts(ctx) -> dict[str, int]:  # noqa: ANN001
    from sqlalchemy import func, select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import StageAttempt

    with session_scope(ctx.sessions) as s:
        return dict(s.execute(select(StageAttempt.entity_id, func.count())
                              .where(StageAttempt.entity_type.in_(("video", "sample")))
                              .group_by(StageAttempt.entity_id)).all())


def test_build_beyond_max_map_length_through_the_real_scheduler(scale, tmp_path):
    from airflow_fixtures import row_snapshot

    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.testmedia.samples import make_tiny_videos
    from opensubject_tasks.orchestrate import context
    from opensubject_tasks.runner import run_build
    from opensubject_tasks.storage import make_store

    stack = scale["stack"]
    videos = make_tiny_videos(tmp_path / "media", 20)
    _upload(scale["store"], videos, "raw")
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
    _upload(make_store(ref_store), videos, "raw")
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


def test_clearing_a_red_chunk_reruns_only_its_failed_video(scale, tmp_path):
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Video
    from opensubject_tasks.testmedia.samples import make_tiny_videos, tiny_video
    from opensubject_tasks.orchestrate import context

    stack, flag = scale["stack"], scale["flag"]
    videos = make_tiny_videos(tmp_path / "media", 5, start=100)
    wide = tmp_path / "media" / "wide.mp4"
    tiny_video(wide, 200, size=WIDE)
    _upload(scale["store"], [*videos, wide], "raw2")
    flag.write_text("fail")
    stack.unpause("opensubject_build")
    run_id = stack.trigger("opensubject_build", {"source": "store://raw2/", "build_name": "red", "chunk_size": 2})
    assert stack.wait_run("opensubject_build", run_id, timeout=900) == "failed"

    ctx = context()
    with session_scope(ctx.sessions) as s:
        bad = s.query(Video).filter(Video.name == "wide.mp4").one()
        assert bad.state == "failed" and bad.error_stage == "curate" and "injected error" in bad.reason
        bad_id, bad_chunk = bad.id, bad.chunk
        others = {v.id: v.state for v in s.query(Video).filter(Video.build_id == "red", Video.id != bad.id)}
        debug = [(v.name, v.state, v.chunk, v.stage_done, v.queued_at) for v in s.query(Video)]
    assert len(others) == 5 and set(others.values()) <= {"done", "rejected"}, (
        debug, [(t["task_id"], t["map_index"], t["state"]) for t in stack.task_instances("opensubject_build", run_id)])
    states = {(t["task_id"], t["map_index"]): t["state"] for t in stack.task_instances("opensubject_build", run_id)}
    assert states[("chunk", bad_chunk)] == "failed" and states[("watch", -1)] == "failed"
    assert {st for (t, i), st in states.items() if t == "chunk" and i != bad_chunk} == {"success"}
    assert states[("export", -1)] == "success" and states[("report", -1)] == "success"
    # The red chunk's log names the video, the stage, the error and the dataset page.
    log = stack.log("opensubject_build", run_id, "chunk", bad_chunk)
    assert f"video {bad_id} (wide.mp4), video, stage curate" in log and "injected error" in log, log[-3000:]
    assert "/opensubject/?build=red" in log
    # The failure notifier (configured for this stack) wrote its message.
    notes = wait_for("failure notification", lambda: [
        json.loads(line) for line in (scale["work"] / "notify.jsonl").read_text().splitlines()
        if json.loads(line)["run_id"] == run_id] if (scale["work"] / "notify.jsonl").exists() else None, 120)
    assert notes[0]["dag_id"] == "opensubject_build" and notes[0]["build"] == "red"

    before = _attempt_counts(ctx)
    flag.unlink()  # the cause is fixed
    cleared = stack.clear("opensubject_build", run_id, [["chunk", bad_chunk]], downstream=True)
    assert {t["task_id"] for t in cleared} >= {"chunk", "export", "report", "watch"}
    assert stack.wait_run("opensubject_build", run_id, timeout=900) == "success"
    after = _attempt_counts(ctx)
    rerun = {e for e in after if after[e] != before.get(e, 0)}
    # Only the failed video's work ran again: its curate, mine and its samples' stages.
    assert bad_id in rerun and not rerun & set(others), rerun
    with session_scope(ctx.sessions) as s:
        assert s.get(Video, bad_id).state in ("done", "rejected")
        assert {v.id: v.state for v in s.query(Video).filter(Video.build_id == "red", Video.id != bad_id)} == others

    # Clearing a chunk whose videos all finished (an operator's "retry" of finished work)
    # hands nothing out again: every verified sample stays exactly as it was.
    from opensubject_tasks.db.models import Sample

    def verified() -> dict:
        with session_scope(ctx.sessions) as s:
            return {x.id: (x.attempt, x.seed, json.dumps(x.keys, sort_keys=True)) for x in s.query(Sample)
                    .filter(Sample.build_id == "red", Sample.state == "verified")}

    green = min(i for (t, i), st in states.items() if t == "chunk" and i != bad_chunk)
    kept, attempts_before = verified(), _attempt_counts(ctx)
    assert kept
    stack.clear("opensubject_build", run_id, [["chunk", green]], downstream=True)
    assert stack.wait_run("opensubject_build", run_id, timeout=900) == "success"
    assert verified() == kept and _attempt_counts(ctx) == attempts_before
    assert "; 0 handed to the workers now" in stack.log("opensubject_build", run_id, "chunk", green, try_number=2)


def test_a_retried_trigger_starts_no_second_build_run(scale, tmp_path):
    from opensubject_tasks.testmedia.samples import make_tiny_videos

    stack = scale["stack"]
    stack.http("PATCH", "/api/v2/dags/opensubject_build", {"is_paused": True})  # the triggered run waits
    _upload(scale["store"], make_tiny_videos(tmp_path / "media", 1, start=300), "raw")
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

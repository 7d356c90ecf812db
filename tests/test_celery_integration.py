"""The distributed build with real processes: PostgreSQL, Redis, an S3 server, Celery
worker processes started here, and Airflow's ``dag.test()`` of the real DAGs.

The reference for "nothing lost, nothing duplicated" is the embedded runner over the
same videos (same ids, keys and seeds by construction): the distributed build, with or
without workers killed in the middle of a task, must leave exactly the same rows and
objects.
"""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
from airflow_fixtures import Worker, age_rows, load_dag, row_snapshot, run_dag_test, service_env, use_services

VIDEOS = ("cat_pan_cut.mp4", "static_scene.mp4")
NEW = "two_subjects.mp4"  # arrives between two ingest runs
BAD = ("notes.mp4", b"this is a text file, not a video\n")
TERMINAL_SAMPLE = {"verified", "rejected", "failed"}


# --- helpers -----------------------------------------------------------------------------------
def _store(store_settings):
    from opensubject_tasks.storage import make_store

    return make_store(store_settings)


def upload(store, media: Path, names, bad: bool = True) -> None:
    for name in names:
        store.put_file(f"raw/{name}", media / name, "video/mp4")
    if bad:
        store.put_bytes(f"raw/{BAD[0]}", BAD[1], "video/mp4")


def keys(store, prefix: str) -> set[str]:
    return {o.key for o in store.list(prefix)}


def attempts(ctx) -> list:
    from sqlalchemy import select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import StageAttempt

    with session_scope(ctx.sessions) as s:
        return list(s.execute(select(StageAttempt.stage, StageAttempt.entity_id, StageAttempt.status,
                                     StageAttempt.worker, StageAttempt.error, StageAttempt.attempt)
                              .order_by(StageAttempt.id)).all())


def attempts_full(ctx) -> list:
    from sqlalchemy import select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import StageAttempt

    with session_scope(ctx.sessions) as s:
        return list(s.scalars(select(StageAttempt).order_by(StageAttempt.id)))


@pytest.fixture(scope="module")
def reference(s3_server, sample_media, tmp_path_factory):
    """The embedded runner's build of the same videos (SQLite + its own bucket)."""
    from opensubject_tasks.config import StoreSettings, load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.runner import run_build

    store_settings = StoreSettings(kind="minio", endpoint=s3_server.endpoint, access_key="testkey",
                                   secret_key="testsecret", bucket=f"ref-{uuid.uuid4().hex[:10]}")
    upload(_store(store_settings), sample_media, VIDEOS)
    db = tmp_path_factory.mktemp("reference") / "ref.sqlite"
    ctx = Context.from_settings(load_settings(database_url=f"sqlite:///{db}", store=store_settings.model_dump()))
    run_build(ctx, ["store://raw/"], "it")
    return {"rows": row_snapshot(ctx), "objects": keys(ctx.store, "videos/")}


@pytest.fixture()
def stack(pg_db, redis_url, s3_store_settings, monkeypatch, airflow_db, tmp_path):
    """Environment for this test's services, shared by the workers and Airflow's tasks."""
    import redis
    from airflow_fixtures import BROKER_PREFIX

    # No message left over from an earlier test of this session (its keys only).
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(match=f"{BROKER_PREFIX}*"):
        r.delete(key)

    def apply(**extra: str) -> dict[str, str]:
        env = service_env(pg_db, redis_url, s3_store_settings, **extra)
        use_services(env, monkeypatch)
        return env

    from opensubject_tasks.orchestrate import context

    workers: list[Worker] = []

    def worker(name: str, env: dict[str, str], include: str | None = None) -> Worker:
        w = Worker(env, name, tmp_path / f"worker-{name}.log", include=include)
        workers.append(w)
        return w.start()

    yield {"apply": apply, "worker": worker, "store": _store(s3_store_settings), "context": context,
           "tmp": tmp_path}
    for w in workers:
        w.stop()


def assert_all_green(states: dict, expect_chunks: int) -> None:
    bad = {k: v for k, v in states.items() if v not in ("success", "skipped")}
    assert not bad, bad
    assert states[("watch", -1)] == "skipped"  # nothing failed
    assert sum(1 for (t, i) in states if t == "chunk" and i >= 0) == expect_chunks
    for tid in ("start", "register", "claim", "export", "report"):
        assert states[(tid, -1)] == "success", tid


def assert_same_as_reference(ctx, store, reference) -> None:
    rows = row_snapshot(ctx)
    ref = reference["rows"]
    for table in ("videos", "clips", "subjects", "pairs", "samples"):
        assert rows[table] == ref[table], table
    assert keys(store, "videos/") == reference["objects"]


def assert_export(ctx, store, build_id: str) -> None:
    import tarfile
    import tempfile

    from sqlalchemy import func, select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Sample

    exported = keys(store, f"datasets/{build_id}/")
    shards = sorted(k for k in exported if k.rsplit("/", 1)[1].startswith("shard-") and k.endswith(".tar"))
    assert shards and f"datasets/{build_id}/manifest.parquet" in exported
    assert f"datasets/{build_id}/report.html" in exported and f"datasets/{build_id}/stats.json" in exported
    with session_scope(ctx.sessions) as s:
        verified = s.scalar(select(func.count()).select_from(Sample).where(Sample.state == "verified"))
    in_shards = set()
    for key in shards:
        with tempfile.NamedTemporaryFile(suffix=".tar") as f:
            store.get_file(key, f.name)
            with tarfile.open(f.name) as tar:
                in_shards |= {m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")}
    assert verified > 0 and len(in_shards) == verified


# --- tests -------------------------------------------------------------------------------------
def test_build_over_sample_media(stack, sample_media, reference):
    env = stack["apply"]()
    store = stack["store"]
    upload(store, sample_media, VIDEOS)
    worker = stack["worker"]("w1", env)

    run, states = run_dag_test(load_dag("opensubject_build"), {"source": "store://raw/", "build_name": "it"})

    assert str(run.state) in ("success", "DagRunState.SUCCESS")
    assert_all_green(states, expect_chunks=1)
    ctx = stack["context"]()
    rows = row_snapshot(ctx)
    # Every video reached a terminal state; the bad one failed alone with its reason.
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Sample, Video

    with session_scope(ctx.sessions) as s:
        videos = {v.name: v for v in s.query(Video)}
        assert {v.state for v in videos.values()} <= {"done", "rejected", "failed"}
        assert videos[BAD[0]].state == "failed" and videos[BAD[0]].reason
        samples = list(s.query(Sample))
        assert samples and all(x.state in TERMINAL_SAMPLE and x.queued_at is not None for x in samples)
    assert_same_as_reference(ctx, store, reference)
    assert_export(ctx, store, "it")
    # The stages ran in the Celery worker process, never in Airflow's.
    att = attempts(ctx)
    assert att and all(a.status != "running" for a in att)
    worker_pids = {int(a.worker.rsplit(":", 1)[1]) for a in att}
    assert set(worker_pids).isdisjoint({__import__("os").getpid()})
    assert set(worker_pids) <= set(worker.pool_children())
    # one samples unit per video; each sample's steps recorded on it
    assert {a.stage for a in att} == {"curate", "mine", "samples", "synthesize", "verify", "export_plan",
                                      "export_part", "export"}
    log = worker.log()
    for name in ("opensubject.ingest", "opensubject.curate", "opensubject.mine", "opensubject.samples",
                 "opensubject.export_plan", "opensubject.export_part", "opensubject.export"):
        assert f"Task {name}[" in log, name
    assert len(rows["videos"]) == len(VIDEOS) + 1


def test_worker_killed_mid_task(stack, sample_media, reference):
    """SIGKILL a whole worker while it runs a stage (its message comes back after the
    visibility timeout to a new worker), then SIGKILL the new worker's pool process in a
    sample stage (its message is requeued at once): the build still ends with exactly the
    rows and objects of an undisturbed build."""
    env = stack["apply"](
        OPENSUBJECT_CELERY__VISIBILITY_TIMEOUT_S="25",
        OPENSUBJECT_CELERY__UNACKED_RESTORE_INTERVAL_S="1",
        OPENSUBJECT_CELERY__UNACKED_RESTORE_THROTTLE="1",
        OPENSUBJECT_CELERY__SOFT_TIME_LIMIT_S="15",
        OPENSUBJECT_CELERY__HARD_TIME_LIMIT_S="20",
        OPENSUBJECT_CELERY__RETRY_BACKOFF_MAX_S="5",
        OPENSUBJECT_CELERY__TIME_LIMITS="{}",
    )
    store = stack["store"]
    upload(store, sample_media, VIDEOS)
    ctx = stack["context"]()
    first = stack["worker"]("first", env)
    killed: dict[str, object] = {}

    def running(stages: tuple[str, ...]):
        return next((a for a in attempts(ctx) if a.status == "running" and a.stage in stages), None)

    def chaos() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "worker" not in killed:
            a = running(("curate", "mine"))
            if a is not None:
                first.kill()
                killed["worker"] = a
            time.sleep(0.02)
        second = stack["worker"]("second", env)
        killed["second"] = second
        while time.monotonic() < deadline and "pool" not in killed:
            a = running(("synthesize", "verify"))
            if a is not None and int(a.worker.rsplit(":", 1)[1]) in second.pool_children():
                import os
                import signal

                os.kill(int(a.worker.rsplit(":", 1)[1]), signal.SIGKILL)
                killed["pool"] = a
            time.sleep(0.02)

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    run, states = run_dag_test(load_dag("opensubject_build"), {"source": "store://raw/", "build_name": "it"})
    thread.join(30)

    assert "worker" in killed and "pool" in killed, f"the faults were not injected: {killed}"
    assert_all_green(states, expect_chunks=1)
    assert_same_as_reference(ctx, store, reference)
    assert_export(ctx, store, "it")
    att = attempts(ctx)
    assert all(a.status != "running" for a in att)
    for what in ("worker", "pool"):
        a = killed[what]
        # The attempt that was killed is recorded as lost, and the same stage then ran to the end.
        statuses = [x.status for x in att if x.stage == a.stage and x.entity_id == a.entity_id]
        assert "lost" in statuses and statuses[-1] in ("ok", "rejected", "failed"), (what, statuses)
    assert "WorkerLostError" in killed["second"].log() or "exited with 'signal 9" in killed["second"].log()


def test_timeout_is_recorded_retried_and_shown_in_airflow(stack, sample_media, capfd):
    # curate hangs in a quality scorer that never returns (tests/hang_backend.py) until the
    # soft limit interrupts it: however fast the machine, the limit is what ends it.
    env = stack["apply"](
        OPENSUBJECT_BACKENDS__QUALITY="hang_always",
        OPENSUBJECT_CELERY__TIME_LIMITS='{"curate": {"soft_s": 1, "hard_s": 60}}',
        OPENSUBJECT_CELERY__MAX_RETRIES="1",
        OPENSUBJECT_CELERY__RETRY_BACKOFF_S="0.2",
        PYTHONPATH=str(Path(__file__).parent),
    )
    store = stack["store"]
    upload(store, sample_media, VIDEOS[:1], bad=False)
    worker = stack["worker"]("t1", env, include="hang_backend")

    run, states = run_dag_test(load_dag("opensubject_build"), {"source": "store://raw/", "build_name": "slow"})

    assert str(run.state) in ("failed", "DagRunState.FAILED")
    assert states[("chunk", 0)] == "failed"
    assert states[("watch", -1)] == "failed"
    # One bad stage does not stop the build: it is still exported and reported.
    assert states[("export", -1)] == "success" and states[("report", -1)] == "success"
    ctx = stack["context"]()
    # Each attempt that got into the stage is recorded as a timeout; the task was retried once.
    curate = [a for a in attempts(ctx) if a.stage == "curate"]
    assert curate and all(a.status == "timeout" and "SoftTimeLimitExceeded" in a.error for a in curate)
    assert {a.attempt for a in curate} <= {1, 2}
    assert "retry: Retry in" in worker.log()
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Video

    with session_scope(ctx.sessions) as s:
        [video] = s.query(Video).all()
        assert video.state == "failed" and video.error_stage == "curate"
        assert video.reason.startswith("curate failed after 2 attempt(s): SoftTimeLimitExceeded")
    out = capfd.readouterr()
    text = out.out + out.err
    # The red chunk's log lists the video with its stage and error, and the dataset page.
    assert f"video {video.id} ({video.name}), video, stage curate: curate failed after 2 attempt(s): " \
           "SoftTimeLimitExceeded" in text
    assert "/opensubject/?build=slow" in text
    assert "1 piece(s) of work in chunk 0 failed on an error" in text


def test_hard_time_limit_kills_records_and_sends_again(stack, sample_media, capfd):
    """No soft limit: the hard limit kills the pool process mid-stage. The worker records the
    attempt as a timeout, sends the task again under the same id, and gives up after the
    retries; Airflow shows the error."""
    # A quality scorer that never returns (tests/hang_backend.py) keeps curate busy however
    # fast the machine decodes: the kill must come from the limit, not from luck.
    env = stack["apply"](
        OPENSUBJECT_BACKENDS__QUALITY="hang_always",
        OPENSUBJECT_CELERY__TIME_LIMITS='{"curate": {"soft_s": null, "hard_s": 1}}',
        OPENSUBJECT_CELERY__MAX_RETRIES="1",
        OPENSUBJECT_CELERY__RETRY_BACKOFF_S="0.2",
        PYTHONPATH=str(Path(__file__).parent),
    )
    upload(stack["store"], sample_media, VIDEOS[:1], bad=False)
    worker = stack["worker"]("h1", env, include="hang_backend")

    run, states = run_dag_test(load_dag("opensubject_build"), {"source": "store://raw/", "build_name": "hard"})

    assert states[("chunk", 0)] == "failed" and states[("watch", -1)] == "failed"
    ctx = stack["context"]()
    # Killed twice (max_retries=1), each kill recorded as a timeout; the stage never finished.
    assert worker.log().count("Hard time limit (1.0s) exceeded") == 2
    curate = [a for a in attempts(ctx) if a.stage == "curate"]
    assert sum(a.status == "timeout" and "hard time limit exceeded" in a.error for a in curate) == 2
    assert "ok" not in {a.status for a in curate}
    # Airflow waited for the second attempt instead of taking the first kill as the end.
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as s:
        ti = s.query(TaskInstance).filter(TaskInstance.run_id == run.run_id,
                                          TaskInstance.task_id == "chunk").one()
        assert ti.end_date >= max(a.finished_at for a in attempts_full(ctx) if a.stage == "curate")
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Video

    with session_scope(ctx.sessions) as s:
        [video] = s.query(Video).all()
        assert video.state == "failed" and video.reason == "curate failed: hard time limit exceeded 2 time(s)"
    out = capfd.readouterr()
    assert "stage curate: curate failed: hard time limit exceeded 2 time(s)" in out.out + out.err


def test_ingest_builds_every_waiting_video(stack, sample_media):
    """A scheduled ingest triggers a build that claims every registered video no build holds
    (also those an earlier, interrupted attempt registered), under a run id derived from
    its own; with nothing waiting it triggers nothing."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    from opensubject_tasks.orchestrate import claim_build_videos
    from opensubject_tasks.services.ingest import register_source

    env = stack["apply"]()
    store = stack["store"]
    upload(store, sample_media, VIDEOS[:2], bad=False)
    stack["worker"]("i1", env)
    ctx = stack["context"]()
    # An earlier attempt registered these and was interrupted before its build was triggered.
    assert len(register_source(ctx, "store://raw/").new_ids) == 2
    upload(store, sample_media, [NEW], bad=False)
    started = time.time()

    def triggered() -> list:
        with create_session() as s:
            return sorted((r.run_id, dict(r.conf)) for r in s.query(DagRun).filter(
                DagRun.dag_id == "opensubject_build") if r.queued_at and r.queued_at.timestamp() >= started)

    ingest = load_dag("opensubject_ingest")
    run, states = run_dag_test(ingest)
    assert states[("register_new", -1)] == "success" and states[("trigger_build", -1)] == "success", states
    [(run_id, conf)] = triggered()
    assert run_id == f"ingest__{run.run_id}" and conf["build_name"].startswith("ingest-") and not conf["video_ids"]
    # What the triggered build claims: all three, the interrupted attempt's two included.
    assert claim_build_videos(conf["build_name"]) == [0]
    with __import__("opensubject_tasks.db.engine", fromlist=["x"]).session_scope(ctx.sessions) as s:
        from opensubject_tasks.db.models import Video

        assert {v.build_id for v in s.query(Video)} == {conf["build_name"]} and s.query(Video).count() == 3

    # Nothing waits for a build now: nothing is triggered.
    _, states = run_dag_test(ingest)
    assert states[("build_conf", -1)] == "skipped" and states[("trigger_build", -1)] == "skipped"
    assert len(triggered()) == 1


def test_reconcile_sends_lost_sample_work_once_and_never_a_waiting_backlog(stack, sample_media, monkeypatch, capfd):
    """Samples units handed to the gpu queue wait there while no worker runs: the reconciler
    sends none of them again, however old. Then the queue is purged (the messages are lost):
    the reconcile DAG sends each exactly once, counts it on the video, and they finish."""
    from opensubject_tasks.celery_app import app
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Build, Sample, Video
    from opensubject_tasks.orchestrate import start_build
    from opensubject_tasks.services.handoff import hand_out_videos
    from opensubject_tasks.services.reconcile import reconcile
    from opensubject_tasks.tasks import send, waiting_in_broker

    env = stack["apply"](OPENSUBJECT_CELERY__RECONCILE_AFTER_S="1")
    store = stack["store"]
    upload(store, sample_media, VIDEOS[:1], bad=False)
    worker = stack["worker"]("s1", env)
    # Curate and mine only: the samples stay pending, never handed to a queue.
    _, states = run_dag_test(load_dag("opensubject_build"),
                             {"source": "store://raw/", "build_name": "sweep", "until": "mine"})
    assert states[("chunk", 0)] == "success"
    assert states[("export_plan", -1)] == states[("export", -1)] == "skipped"  # nothing to export before verify
    ctx = stack["context"]()
    with session_scope(ctx.sessions) as s:
        ids = sorted(x.id for x in s.query(Sample))
        assert ids and all(x.state == "pending" for x in s.query(Sample))
        videos = sorted(v.id for v in s.query(Video) if v.stage_done == "mine")
        s.get(Build, "sweep").state = "running"  # the report marked it done
    age_rows(ctx, 2)
    assert reconcile(ctx, send, older_than_s=1, waiting=waiting_in_broker) == []  # until=mine: not this build's work
    start_build({"build_name": "sweep", "until": "verify"}, "run")  # resumed for the whole pipeline
    worker.stop()
    assert len(hand_out_videos(ctx, "samples", videos, send)) == len(videos) >= 1
    age_rows(ctx, 2)
    # A backlog: queued long ago and still waiting on the broker. Never sent twice.
    assert reconcile(ctx, send, older_than_s=0, waiting=waiting_in_broker) == []
    assert app.control.purge() >= len(videos)  # now the messages are lost
    age_rows(ctx, 2)

    stack["worker"]("s2", env)
    # The reconcile waits in its own task here (no deferral): the path for sites without a triggerer.
    monkeypatch.setenv("OPENSUBJECT_AIRFLOW_DEFERRABLE", "false")
    capfd.readouterr()
    _, states = run_dag_test(load_dag("opensubject_reconcile"))
    assert states[("reconcile", -1)] == "success"
    assert "Pausing task as DEFERRED" not in capfd.readouterr().out
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with session_scope(ctx.sessions) as s:
            if all(x.state in TERMINAL_SAMPLE for x in s.query(Sample)):
                break
        time.sleep(0.5)
    with session_scope(ctx.sessions) as s:
        assert {x.id: x.state in TERMINAL_SAMPLE for x in s.query(Sample)} == dict.fromkeys(ids, True)
        assert {v.id: v.resends for v in s.query(Video) if v.id in videos} == dict.fromkeys(videos, 1)


def test_a_worker_loads_its_models_before_it_reports_ready(stack, tmp_path):
    """Each pool process loads the models of the stages its queues carry at start (here the
    tiny profile's gpu-queue models), before it takes a task; the health check passes only
    once every process has."""
    import subprocess
    import sys

    ready = tmp_path / "ready"
    env = stack["apply"](OPENSUBJECT_PROFILE="tiny", OPENSUBJECT_WORKER_READY_DIR=str(ready),
                         OPENSUBJECT_WORKER_CONCURRENCY="2")

    def check() -> int:
        return subprocess.run([sys.executable, "-m", "opensubject_tasks.workers", "--check"],
                              env={**__import__("os").environ, **env}, capture_output=True).returncode

    assert check() == 1  # nothing started yet
    w = Worker(env, "warm", tmp_path / "warm.log", queues="gpu", concurrency=2)
    w.start()
    try:
        deadline = time.monotonic() + 120
        while check() != 0:
            assert time.monotonic() < deadline, w.log()[-2000:]
            time.sleep(0.5)
        assert len(list(ready.iterdir())) == 2
        loaded = [line for line in w.log().splitlines() if "backends loaded in" in line]
        assert len(loaded) == 2, w.log()[-2000:]
        # the gpu queue's stages: mining, synthesis and verification models, not curation's
        assert all("detector=" in line and "inpainter=" in line and "quality=" not in line for line in loaded)
    finally:
        w.stop()
    assert check() == 1  # its processes are gone

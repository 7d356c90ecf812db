"""Processes that die under a running build: PostgreSQL restarted, a worker pool process
killed by its video every time, a slow-loading worker whose pool process dies, an export
part killed half way. Each build is driven and checked as in tests/test_faults.py: it ends
exactly like an undisturbed build of the same videos."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from fault_fixtures import (
    PgCluster,
    attempts,
    check_finished_build,
    drive_build,
    running_stages,
    store_keys,
    upload,
)

pytestmark = pytest.mark.timeout(300)


def test_database_restart_mid_build(stack, s3_store_settings, media, reference):
    """Stop the PostgreSQL cluster (fast shutdown: every session cut) while stages run and
    start it again 8 s later: stages fail with connection errors, are retried with backoff,
    pooled connections are replaced (pool_pre_ping), lost messages are sent again, and the
    build finishes."""
    cluster = PgCluster().start()
    try:
        env = stack.apply(cluster.url, s3_store_settings)
        upload(stack.store, media)
        worker = stack.worker(env, "pgrestart", concurrency=2)
        ctx = stack.context()
        outage: dict[str, float] = {}

        def restart() -> None:
            try:
                cluster.stop("fast")
                outage["start"] = time.time()
                time.sleep(8)
                cluster.start()
                outage["end"] = time.time()
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                outage["error"] = repr(exc)

        def chaos() -> None:
            # While short sample stages run: new tasks keep starting into the outage.
            if "thread" not in outage and running_stages(ctx) & {"samples"}:
                outage["thread"] = 1
                threading.Thread(target=restart, daemon=True).start()

        try:
            run = drive_build("faults", on_tick=chaos, timeout_s=240)
        finally:
            assert outage.get("end"), outage
        assert outage["end"] - outage["start"] >= 8
        assert not run.failures, run.failures
        counts = check_finished_build(ctx, stack.store, "faults", reference)
        assert counts["videos"] == 3
        # The restart cut live sessions, and the outage reached the workers: a stage failed
        # on a connection error and was retried, or a result write waited it out.
        assert "terminating connection due to administrator command" in cluster.log.read_text()
        cut = [a for a in attempts(ctx) if a.status in ("error", "lost")]
        log = worker.log()
        assert (cut or "OperationalError" in log) and "Retry in" in log, "no stage felt the outage"
    finally:
        for w in stack.workers:
            w.stop()
        stack.workers.clear()
        from opensubject_tasks.orchestrate import context

        context().engine.dispose()
        print("PostgreSQL server log:\n" + cluster.log.read_text()[-4000:] if cluster.log.exists() else "")
        cluster.destroy()


def test_a_video_that_kills_its_worker_fails_after_n_deaths_and_the_rest_finishes(stack, pg_db, s3_store_settings,
                                                                                   media, tmp_path):
    """A video whose curation kills the pool process every time (SIGKILL, as the OOM killer
    does) is given back to the queue and runs again, at most ``celery.max_worker_lost``
    times in a row; then it fails with that reason, listed as an error, and the other
    videos of the build finish."""
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Video
    from opensubject_tasks.testmedia.samples import tiny_video

    tiny_video(tmp_path / "killer.mp4", 7, size=(224, 126))
    env = stack.apply(pg_db, s3_store_settings, OPENSUBJECT_BACKENDS__QUALITY="kill_wide",
                      OPENSUBJECT_TEST_KILL_WIDTH="224", OPENSUBJECT_CELERY__MAX_WORKER_LOST="2",
                      PYTHONPATH=str(Path(__file__).parent))
    upload(stack.store, media)
    stack.store.put_file("raw/killer.mp4", tmp_path / "killer.mp4", "video/mp4")
    worker = stack.worker(env, "killed", concurrency=1, include="fickle_backend")

    run = drive_build("faults", timeout_s=240)

    ctx = stack.context()
    with session_scope(ctx.sessions) as s:
        killer = s.query(Video).filter(Video.name == "killer.mp4").one()
        others = [v.state for v in s.query(Video).filter(Video.name != "killer.mp4")]
    assert killer.state == "failed" and killer.error_stage == "curate"
    assert killer.reason.startswith("worker lost 2 times running curate")
    assert len(others) == 3 and set(others) <= {"done", "rejected"}
    lost = [a for a in attempts(ctx) if a.entity_id == killer.id]
    assert [a.status for a in lost] == ["lost", "lost", "error"], [(a.status, a.error) for a in lost]
    assert run.failures == [f"curate({killer.id}): {killer.reason}"]
    assert worker.log().count("WorkerLostError") + worker.log().count("signal 9") >= 2


def test_a_slow_loading_worker_comes_back_after_its_pool_process_dies(stack, pg_db, s3_store_settings, media,
                                                                      reference, tmp_path):
    """Models that take 6 s to load (longer than Celery's default 4 s wait for a new pool
    process to report ready): SIGKILL the pool process while it runs a samples unit, as the
    OOM killer does. The replacement loads its models and reports ready (it is not killed
    for being slow), the unit's message comes back, and the build finishes exactly. The
    health check counts only processes that loaded their models."""
    from opensubject_tasks.workers import READY_DIR_ENV

    ready_dir = tmp_path / "ready"
    env = stack.apply(pg_db, s3_store_settings, OPENSUBJECT_BACKENDS__QUALITY="slow_load",
                      OPENSUBJECT_TEST_LOAD_S="6", PYTHONPATH=str(Path(__file__).parent),
                      **{READY_DIR_ENV: str(ready_dir)})
    upload(stack.store, media)
    worker = stack.worker(env, "slow-load", concurrency=1, include="hang_backend")
    [first] = worker.pool_children()
    ctx = stack.context()
    killed: dict[str, int] = {}

    def kill_a_samples_unit() -> None:
        if "pid" in killed:
            return
        running = [a for a in attempts(ctx) if a.stage == "samples" and a.status == "running"]
        if running:
            killed["pid"] = first
            os.kill(first, signal.SIGKILL)

    run = drive_build("faults", timeout_s=240, poll_s=0.1, on_tick=kill_a_samples_unit)

    assert killed, "no samples unit ran while the test watched"
    assert not run.failures, run.failures
    check_finished_build(ctx, stack.store, "faults", reference)
    log = worker.log()
    assert "Timed out waiting for UP message" not in log
    assert "WorkerLostError" in log or "signal 9" in log
    [replacement] = worker.pool_children()
    assert replacement != first
    # the unit the kill cut short ran again and finished
    units = [a for a in attempts(ctx) if a.stage == "samples"]
    lost = [a for a in units if a.status == "lost"]
    assert len(lost) == 1, [(a.status, a.error) for a in units]
    assert [a.status for a in units if a.entity_id == lost[0].entity_id][-1] == "ok"
    # the health check: the dead process's marker no longer counts, the replacement's does
    assert sorted(p.name for p in ready_dir.iterdir()) == sorted([str(first), str(replacement)])
    from opensubject_tasks import workers

    assert workers.ready_processes() == 1  # the stack set READY_DIR_ENV here too


def test_an_export_part_killed_mid_way_writes_byte_identical_shards(stack, pg_db, s3_store_settings, media):
    """Export in one part of one-sample shards; the first time, SIGKILL the pool process
    while the part writes (its message comes back at once and the part runs again). The
    shards in the store, and the digests recorded for them, equal an undisturbed export's."""
    import hashlib

    from opensubject_tasks import orchestrate as o
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import ExportShard

    env = stack.apply(pg_db, s3_store_settings, OPENSUBJECT_EXPORT__SHARD_MAX_SAMPLES="1",
                      OPENSUBJECT_EXPORT__MAX_PARTS="1")
    upload(stack.store, media)
    worker = stack.worker(env, "export", concurrency=1)
    run = drive_build("faults", timeout_s=240)
    assert not run.failures, run.failures
    ctx = stack.context()

    def shards() -> dict[str, str]:
        keys = sorted(k for k in store_keys(stack.store, "datasets/faults/") if k.endswith(".tar"))
        return {k: hashlib.sha256(stack.store.get_bytes(k)).hexdigest() for k in keys}

    def recorded() -> dict[int, str]:
        with session_scope(ctx.sessions) as s:
            return {x.shard: x.sha256 for x in s.query(ExportShard).filter(ExportShard.build_id == "faults")}

    undisturbed, undisturbed_rows = shards(), recorded()
    assert len(undisturbed) >= 3 and len(set(undisturbed_rows.values())) == len(undisturbed)
    for key in undisturbed:  # the next export writes them all again
        stack.store.delete(key)

    killed: dict[str, int] = {}

    def running_part():  # noqa: ANN202
        from sqlalchemy import select

        from opensubject_tasks.db.models import StageAttempt

        with session_scope(ctx.sessions) as s:
            return s.execute(select(StageAttempt.worker).where(StageAttempt.stage == "export_part",
                                                               StageAttempt.status == "running")).first()

    def chaos() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "pid" not in killed:
            a = running_part()
            if a is not None:
                os.kill(int(a.worker.rsplit(":", 1)[1]), signal.SIGKILL)
                killed["pid"] = int(a.worker.rsplit(":", 1)[1])
            time.sleep(0.01)

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    [part] = _wait_outcome(o.send_task("export_plan", ["faults"]))["result"]["details"]["parts"]
    assert _wait_outcome(o.send_task("export_part", [part]))["status"] == "success"
    thread.join(5)
    assert "pid" in killed, "the part finished before it could be killed"
    assert _wait_outcome(o.send_task("export", ["faults"]))["status"] == "success"
    assert shards() == undisturbed and recorded() == undisturbed_rows
    statuses = [a.status for a in attempts(ctx) if a.stage == "export_part" and a.entity_id == part]
    assert statuses[-2:] == ["lost", "ok"], statuses
    assert "WorkerLostError" in worker.log() or "signal 9" in worker.log()


def _wait_outcome(task_id: str, timeout: float = 120) -> dict:
    from opensubject_tasks import orchestrate as o

    deadline = time.monotonic() + timeout
    while (out := o.task_outcome(task_id)) is None:
        assert time.monotonic() < deadline, f"no outcome for {task_id}"
        time.sleep(0.2)
    return out

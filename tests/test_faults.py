"""Faults that real clusters see, injected into a distributed build with real processes:
PostgreSQL, Redis, an S3 server (moto) and a Celery worker process started here.

Each build is driven through the Celery workers as the ``opensubject_build`` DAG drives
it (tests/fault_fixtures.py: the same orchestrate calls, chunks handed out and waited for in
the database, ``opensubject.reconcile`` every two seconds as the reconcile DAG sends it on
its schedule).
Each test ends with the exact check: every video terminal, every sample verified or
rejected, the same rows and objects as an undisturbed build of the same videos (nothing
lost, nothing duplicated), each verified sample exported once, no attempt left running.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from airflow_fixtures import BROKER_PREFIX
from fault_fixtures import (
    Deadline,
    attempts,
    check_finished_build,
    drive_build,
    running_stages,
    upload,
)

pytestmark = pytest.mark.timeout(300)


# --- the reconciler on its own -------------------------------------------------------------------
def test_reconcile_sends_exactly_the_lost_work(pg_db):
    """Only units that are outstanding, handed out long ago, not running and not waiting on
    the broker are sent again, each once and counted on its row; a second pass right after
    sends nothing; work a build does not run (its `until`) is never sent."""
    from sqlalchemy import update

    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Build, Clip, Pair, Sample, StageAttempt, Subject, Video
    from opensubject_tasks.services.reconcile import reconcile

    ctx = Context.from_settings(load_settings(database_url=pg_db))
    now = datetime.now(UTC)
    old, recent, ancient = now - timedelta(seconds=120), now - timedelta(seconds=5), now - timedelta(hours=3)
    with session_scope(ctx.sessions) as s:
        s.add_all([Build(id="b1", state="running"), Build(id="b2", state="done"),
                   Build(id="b5", state="running", params={"until": "mine"})])
        s.flush()

        def video(vid, build="b1", state="running", stage=None, done=None, at=old):  # noqa: ANN001, ANN202
            return Video(id=vid, content_hash=vid, source_uri=f"store://raw/{vid}", name=vid, build_id=build,
                         state=state, queued_stage=stage, stage_done=done, queued_at=at if stage else None,
                         queued_task_id=f"task-{vid}" if stage else None)

        s.add_all([
            video("v_lost", stage="curate"),                      # its message is gone -> curate again
            video("v_lost_mine", stage="mine", done="curate"),    # -> mine again
            video("v_fresh", stage="curate", at=recent),          # handed out a moment ago
            video("v_stage_done", stage="curate", done="curate"),  # curate done; the chain went on
            video("v_busy", stage="mine", done="curate"),         # a live attempt is running
            video("v_dead", stage="mine", done="curate"),         # its running attempt is long dead
            video("v_stale", stage="mine", done="curate"),        # marked running 2 min ago, message gone
            video("v_waiting", stage="curate"),                   # its message is still on the broker
            video("v_failed", state="failed", stage="curate"),    # finished
            video("v_done_build", build="b2", stage="curate"),    # its build is over
            video("v_never", state="registered"),                 # never handed out: its chunk's job
            video("v_samples", stage="samples", done="mine"),     # its samples unit was lost
            video("v_samples_busy", stage="samples", done="mine"),  # its samples unit is running
            video("v_samples_mine", build="b5", stage="samples", done="mine"),  # its build stops at mine
        ])
        s.flush()
        s.add(Clip(id="c", video_id="v_stage_done", idx=0, start_frame=0, end_frame=9, start_s=0, end_s=1))
        s.flush()
        s.add(Subject(id="su", clip_id="c", idx=0, category="cat", category_source="t", boxes={}))
        s.flush()
        samples = {"s_pending": ("pending", old, "b1"), "s_synth": ("synthesized", old, "b1"),
                   "s_verified": ("verified", old, "b1"), "s_fresh": ("pending", recent, "b1"),
                   "s_busy": ("synthesized", old, "b1"), "s_never": ("pending", None, "b1"),
                   "s_until_mine": ("pending", old, "b5")}
        for i, (sid, (state, at, build)) in enumerate(samples.items()):
            s.add(Pair(id=sid, subject_id="su", ref_frame=i, tgt_frame=i + 1, ref_box=[0, 0, 1, 1],
                       tgt_box=[0, 0, 1, 1]))
            s.flush()
            s.add(Sample(id=sid, pair_id=sid, build_id=build, state=state, seed=i, queued_at=at))
        s.add_all([
            StageAttempt(entity_type="video", entity_id="v_busy", stage="mine", status="running", started_at=recent),
            StageAttempt(entity_type="video", entity_id="v_dead", stage="mine", status="running", started_at=ancient),
            StageAttempt(entity_type="video", entity_id="v_stale", stage="mine", status="running", started_at=old),
            StageAttempt(entity_type="video", entity_id="v_samples_busy", stage="samples", status="running",
                         started_at=recent),
        ])

    # Samples are no units of their own (their video's samples unit is): none is sent alone.
    lost = [("curate", "v_lost"), ("mine", "v_lost_mine"), ("mine", "v_dead"), ("samples", "v_samples")]
    # Without the broker's view a queued backlog looks lost: nothing is sent before the
    # blind age (celery.reconcile_blind_after_s, 6 h)...
    assert reconcile(ctx, lambda st, e, **kw: None, older_than_s=60) == []
    # ... and then at most celery.reconcile_blind_max per pass, oldest first.
    assert len(reconcile(ctx, lambda st, e, **kw: None, older_than_s=60, blind_older_than_s=60, blind_max=2)) == 2
    with session_scope(ctx.sessions) as s:
        s.execute(update(Video).where(Video.resends > 0).values(queued_at=old, resends=0))
    # Past the blind age: age decides, and an attempt marked running is trusted up to the
    # stage's hard time limit.
    sent: list[tuple[str, str]] = []
    work = reconcile(ctx, lambda st, e, **kw: sent.append((st, e)), older_than_s=60, blind_older_than_s=60)
    assert sent == work
    assert sorted(work) == sorted([*lost, ("curate", "v_waiting")])
    with session_scope(ctx.sessions) as s:
        # Each unit sent again is counted on its row, with a new task id for a video stage.
        resends = {**{v.id: v.resends for v in s.query(Video)}, **{x.id: x.resends for x in s.query(Sample)}}
        assert {k for k, n in resends.items() if n} == {e for _, e in work}
        assert all(n == 1 for n in resends.values() if n)
        assert s.get(Video, "v_lost").queued_task_id not in (None, "task-v_lost")
    # Their hand-off time moved to now: the next pass leaves them alone.
    assert reconcile(ctx, lambda st, e, **kw: None, older_than_s=60) == []

    # With the broker's view: what it holds is not sent, and a running attempt older than
    # the threshold whose message is gone is dead (its end was never recorded).
    with session_scope(ctx.sessions) as s:  # as if the first pass's messages were lost too
        for model in (Video, Sample):
            s.execute(update(model).where(model.id.in_([e for _, e in work])).values(queued_at=old))
    waiting = {("curate", "v_waiting")}
    work = reconcile(ctx, lambda st, e, **kw: None, older_than_s=60, waiting=waiting)
    assert sorted(work) == sorted([*lost, ("mine", "v_stale")])
    assert reconcile(ctx, lambda st, e, **kw: None, older_than_s=60, waiting=waiting) == []
    # Once its message is gone from the broker too, the waiting one goes out.
    assert reconcile(ctx, lambda st, e, **kw: None, older_than_s=60, waiting=lambda: set()) == [("curate", "v_waiting")]
    # The broker is read only when there is a candidate (nothing was handed out an hour ago).
    def unread():  # noqa: ANN202
        raise AssertionError("the broker was read with nothing to decide")

    assert reconcile(ctx, lambda st, e, **kw: None, older_than_s=3600, waiting=unread) == []
    ctx.engine.dispose()


def test_reconcile_holds_no_row_while_it_reads_the_broker(pg_db):
    """A worker updating a video the reconciler has as a candidate is not blocked while the
    pass reads the broker (two real connections: the worker's update must finish, under a
    lock timeout, during the scan), and work handed out again meanwhile is not re-sent."""
    from sqlalchemy import create_engine, text

    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Build, Video
    from opensubject_tasks.services.reconcile import reconcile

    ctx = Context.from_settings(load_settings(database_url=pg_db))
    old = datetime.now(UTC) - timedelta(hours=1)
    with session_scope(ctx.sessions) as s:
        s.add(Build(id="b1", state="running"))
        s.flush()
        s.add_all([Video(id=v, content_hash=v, source_uri=f"store://raw/{v}", name=v, build_id="b1", state="running",
                         queued_stage="curate", queued_at=old, queued_task_id=f"task-{v}") for v in ("v_worked", "v_lost")])
    worker = create_engine(pg_db)
    updated: list[str] = []

    def broker_scan():  # noqa: ANN202 - the worker hands v_worked out again meanwhile
        with worker.begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '3s'"))
            c.execute(text("UPDATE videos SET queued_task_id = 'task-new', queued_at = now(), state = 'running' "
                           "WHERE id = 'v_worked'"))
            updated.append("v_worked")
        return set()

    try:
        sent = reconcile(ctx, lambda st, e, **kw: None, older_than_s=60, waiting=broker_scan)
    finally:
        worker.dispose()
    assert updated == ["v_worked"]          # the worker's update went through during the scan
    assert sent == [("curate", "v_lost")]   # and the unit it handed out again was left alone
    with session_scope(ctx.sessions) as s:
        assert s.get(Video, "v_worked").queued_task_id == "task-new" and s.get(Video, "v_worked").resends == 0
        assert s.get(Video, "v_lost").resends == 1
    ctx.engine.dispose()


def test_waiting_in_broker_reads_queued_and_delayed_messages(fault_redis_url, monkeypatch):
    import redis

    from opensubject_tasks.catalogue import QUEUES
    from opensubject_tasks.celery_app import TASK_PREFIX, configure
    from opensubject_tasks.services.reconcile import waiting_in_redis
    from opensubject_tasks.tasks import send, waiting_in_broker

    client = redis.Redis.from_url(fault_redis_url)
    monkeypatch.setenv("OPENSUBJECT_BROKER_URL", fault_redis_url)
    # The test session's key prefix (kombu keeps the first prefix a process used).
    monkeypatch.setenv("OPENSUBJECT_CELERY__BROKER_KEY_PREFIX", BROKER_PREFIX)
    configure()
    send("curate", "v1")
    send("synthesize", "s1", countdown=30)  # a retry waiting out its backoff
    send("export", "b1", priority=9)
    for i in range(2500):  # more than one page of a queue
        send("mine", f"m{i}")
    assert client.keys(f"{BROKER_PREFIX}*") and not client.keys("cpu*")  # the keys carry the prefix
    assert waiting_in_broker() == {("curate", "v1"), ("synthesize", "s1"), ("export", "b1"),
                                   *(("mine", f"m{i}") for i in range(2500))}
    assert waiting_in_redis(fault_redis_url, QUEUES, TASK_PREFIX) == set()  # another prefix
    client.flushdb()
    assert waiting_in_broker() == set()
    assert waiting_in_redis("amqp://guest@localhost//", QUEUES, TASK_PREFIX) is None


def test_messages_leave_the_time_limits_to_the_worker(fault_redis_url, monkeypatch):
    """A sender whose tasks were loaded under other limits (its own configuration, read once)
    must not stamp them on the message: the worker's configured limits decide."""
    import json

    import redis

    from opensubject_tasks.celery_app import app, configure
    from opensubject_tasks.tasks import send, task_name

    client = redis.Redis.from_url(fault_redis_url)
    monkeypatch.setenv("OPENSUBJECT_BROKER_URL", fault_redis_url)
    monkeypatch.setenv("OPENSUBJECT_CELERY__BROKER_KEY_PREFIX", BROKER_PREFIX)
    monkeypatch.setenv("OPENSUBJECT_CELERY__TIME_LIMITS", '{"synthesize": {"soft_s": 1000, "hard_s": 2000}}')
    configure()
    assert app.tasks[task_name("synthesize")].soft_time_limit  # the sender's tasks carry limits
    send("synthesize", "s1")
    [raw] = client.lrange(f"{BROKER_PREFIX}gpu", 0, -1)
    assert json.loads(raw)["headers"]["timelimit"] == [None, None]


# --- faults in a running build -------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_broker_flush_mid_build(stack, pg_db, s3_store_settings, media, reference):
    """FLUSHDB the broker's Redis database twice, while curate messages and then a samples
    unit wait in the queues: the reconciler sends the lost work again (counted on each
    video) and the build finishes."""
    import redis

    from opensubject_tasks.celery_app import TASK_PREFIX
    from opensubject_tasks.services.reconcile import _unit

    env = stack.apply(pg_db, s3_store_settings)
    upload(stack.store, media)
    # One process per queue, one unit at a time: the rest waits in the queues.
    workers = [stack.worker(env, "flush", concurrency=1, queues="cpu,maintenance"),
               stack.worker(env, "flush-gpu", concurrency=1, queues="gpu")]
    gpu_main = workers[1].proc.pid
    client = redis.Redis.from_url(stack.redis_url)
    ctx = stack.context()
    dropped: dict[str, int] = {}
    gpu = {"stopped": False, "idle_ticks": 0}

    def resume_gpu() -> None:
        os.kill(gpu_main, signal.SIGCONT)
        gpu["stopped"] = False

    def queued(queue: str, stage: str) -> list:
        return [u for raw in client.lrange(f"{BROKER_PREFIX}{queue}", 0, -1)
                if (u := _unit(raw, TASK_PREFIX)) and u[0] == stage]

    def chaos() -> None:
        # A message a worker has reserved already would run anyway: flush only while a unit
        # of the kind waits in the queue itself, so that the flush really loses work.
        if "cpu" not in dropped:
            if waiting := queued("cpu", "curate"):
                client.flushdb()
                dropped["cpu"] = len(waiting)
            return
        if "gpu" in dropped:
            return
        if waiting := queued("gpu", "samples"):
            client.flushdb()
            dropped["gpu"] = len(waiting)
            resume_gpu()
        elif "mine" in running_stages(ctx):
            if not gpu["stopped"]:
                # The GPU worker's main process stopped while its pool process mines: it takes
                # no message, so the samples unit that mining hands on waits in the queue.
                os.kill(gpu_main, signal.SIGSTOP)
                gpu.update(stopped=True, idle_ticks=0)
        elif gpu["stopped"]:
            # Mining ended and no samples unit waits: after a few ticks (the unit may be on
            # its way), it was taken before the stop; go on and try at the next mining.
            gpu["idle_ticks"] += 1
            if gpu["idle_ticks"] >= 3:
                resume_gpu()

    try:
        run = drive_build("faults", on_tick=chaos, timeout_s=420)
    except Deadline as exc:
        raise AssertionError(f"{exc}; units lost per queue: {dropped}") from exc
    finally:
        os.kill(gpu_main, signal.SIGCONT)

    assert set(dropped) == {"cpu", "gpu"} and all(n > 0 for n in dropped.values()), dropped
    assert not run.failures, run.failures
    counts = check_finished_build(stack.context(), stack.store, "faults", reference)
    assert counts["videos"] == 3 and counts["verified"] > 0
    # The reconciler sent lost curate units and lost samples units again, and counted them.
    resent = " ".join(line for w in workers for line in w.log().splitlines() if "whose message was lost" in line)
    assert "curate(" in resent, resent
    assert "samples(" in resent, resent
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Video

    with session_scope(stack.context().sessions) as s:
        assert sum(v.resends for v in s.query(Video) if v.queued_stage == "samples") > 0


def test_object_store_outage_mid_build(stack, pg_db, media, reference):
    """SIGSTOP the S3 server process for 30 s while stages run, then SIGCONT: requests wait
    (or fail and are retried with backoff), and the build finishes."""
    from conftest import S3Server

    from opensubject_tasks.config import StoreSettings

    server = S3Server().start()
    outage: dict[str, float] = {}
    timer: list[threading.Timer] = []
    try:
        store_settings = StoreSettings(kind="minio", endpoint=server.endpoint, access_key="testkey",
                                       secret_key="testsecret", bucket=f"t-{uuid.uuid4().hex[:12]}")
        env = stack.apply(pg_db, store_settings)
        upload(stack.store, media)
        stack.worker(env, "outage", concurrency=2)
        ctx = stack.context()

        def resume() -> None:
            os.kill(server.proc.pid, signal.SIGCONT)
            outage["end"] = time.time()

        def chaos() -> None:
            if "start" not in outage and running_stages(ctx) & {"mine", "samples"}:
                os.kill(server.proc.pid, signal.SIGSTOP)
                outage["start"] = time.time()
                timer.append(threading.Timer(30, resume))
                timer[0].start()

        run = drive_build("faults", on_tick=chaos, timeout_s=240)
        assert not run.failures, run.failures
        assert outage["end"] - outage["start"] >= 29.9
        counts = check_finished_build(ctx, stack.store, "faults", reference)
    finally:
        for t in timer:
            t.cancel()
        if "start" in outage and "end" not in outage:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
    assert counts["videos"] == 3
    # Work was in flight through the outage: some stage started before the store came back
    # and finished after it.
    end = datetime.fromtimestamp(outage["end"], UTC)
    assert any(a.started_at < end < a.finished_at for a in attempts(ctx)), "no stage spanned the outage"

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
from pathlib import Path

import pytest
from airflow_fixtures import BROKER_PREFIX
from fault_fixtures import (
    SMALL,
    PgCluster,
    attempts,
    check_finished_build,
    drive_build,
    rows,
    running_stages,
    store_keys,
    upload,
)

pytestmark = pytest.mark.timeout(300)


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    from disk_cache import sample_videos

    return sample_videos(tmp_path_factory.mktemp("fault-media"), count=3, size=(320, 180))


@pytest.fixture(scope="module")
def reference(s3_server, media, tmp_path_factory) -> dict:
    """The embedded runner's undisturbed build of the same videos with the same settings."""
    from opensubject_tasks.config import StoreSettings, load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.runner import run_build
    from opensubject_tasks.storage import make_store

    store_settings = StoreSettings(kind="minio", endpoint=s3_server.endpoint, access_key="testkey",
                                   secret_key="testsecret", bucket=f"ref-{uuid.uuid4().hex[:10]}")
    upload(make_store(store_settings), media)
    db = tmp_path_factory.mktemp("fault-reference") / "ref.sqlite"
    ctx = Context.from_settings(load_settings(database_url=f"sqlite:///{db}", store=store_settings.model_dump(),
                                              **SMALL))
    run_build(ctx, ["store://raw/"], "faults")
    ref = {"rows": rows(ctx), "objects": set(store_keys(ctx.store, "videos/"))}
    ctx.engine.dispose()
    states = {st for st, _, _ in ref["rows"]["samples"].values()}
    assert len(ref["rows"]["videos"]) == 3 and {"verified", "rejected"} <= states  # both outcomes covered
    return ref


# --- the reconciler on its own -------------------------------------------------------------------
def test_reconcile_sends_exactly_the_lost_work(pg_db):
    """Only units that are outstanding, handed out long ago, not running and not waiting on
    the broker are sent again, each once and counted on its row; a second pass right after
    sends nothing; work a build does not run (its `until`) is never sent."""
    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Build, Clip, Pair, Sample, StageAttempt, Subject, Video
    from opensubject_tasks.services.reconcile import reconcile
    from sqlalchemy import update

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
    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Build, Video
    from opensubject_tasks.services.reconcile import reconcile
    from sqlalchemy import create_engine, text

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
def test_broker_flush_mid_build(stack, pg_db, s3_store_settings, media, reference):
    """FLUSHDB the broker's Redis database twice, while curate/mine messages and then
    samples units wait in the queues: the reconciler sends the lost work again (counted on
    each video) and the build finishes."""
    import redis

    from opensubject_tasks.celery_app import TASK_PREFIX
    from opensubject_tasks.services.reconcile import _unit
    from opensubject_tasks.tasks import waiting_in_broker

    env = stack.apply(pg_db, s3_store_settings)
    upload(stack.store, media)
    # One CPU process, one at a time: the rest waits in the queues. No GPU worker until the
    # second flush, so samples units are sure to wait in the gpu queue when it comes.
    worker = stack.worker(env, "flush", concurrency=1, queues="cpu,maintenance")
    workers = [worker]
    client = redis.Redis.from_url(stack.redis_url)
    dropped: dict[str, int] = {}

    kinds = {"cpu": {"curate", "mine"}, "gpu": {"samples"}}

    def chaos() -> None:
        # First while curate/mine wait in the queue, then while samples units do.
        queue = "gpu" if "cpu" in dropped else "cpu"
        if queue in dropped:
            return
        waiting = [u for u in waiting_in_broker() if u[0] in kinds[queue]]
        # a message a worker has reserved already would run anyway: flush when one of the
        # kind is still in the queue itself, so that the flush really loses work
        queued = [_unit(raw, TASK_PREFIX) for raw in client.lrange(f"{BROKER_PREFIX}{queue}", 0, -1)]
        if waiting and any(u and u[0] in kinds[queue] for u in queued):
            client.flushdb()
            dropped[queue] = len(waiting)
            if queue == "gpu":
                workers.append(stack.worker(env, "flush-gpu", concurrency=1, queues="gpu"))

    run = drive_build("faults", on_tick=chaos, timeout_s=240)

    assert set(dropped) == {"cpu", "gpu"} and all(n > 0 for n in dropped.values()), dropped
    assert not run.failures, run.failures
    counts = check_finished_build(stack.context(), stack.store, "faults", reference)
    assert counts["videos"] == 3 and counts["verified"] > 0
    # The reconciler sent lost curate/mine units and lost samples units again, and counted them.
    resent = " ".join(line for w in workers for line in w.log().splitlines() if "whose message was lost" in line)
    assert "curate(" in resent or "mine(" in resent, resent
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


@pytest.mark.parametrize(("stage", "limit"), [("samples", "soft"), ("samples", "hard"), ("mine", "hard")])
def test_hung_stage_hits_its_time_limit_and_is_retried(stage, limit, stack, pg_db, s3_store_settings, media,
                                                       reference, tmp_path):
    """A model call that hangs (a test backend loaded into the worker, selected by
    configuration) in a video's samples unit (its inpainter) or in mine: the soft time limit
    of 2 s raises in the task
    (``soft``), or, when the call swallows that, the hard limit of 4 s kills the pool
    process (``hard``). Either way the attempt is recorded as a timeout, the task is sent
    again and the build finishes exactly; a video whose mining was killed is never taken
    for one without subjects (nothing is decided before mining has run)."""
    token = tmp_path / "hang-token"
    interface = {"samples": "INPAINTER", "mine": "DETECTOR"}[stage]
    # mining takes seconds on these videos: only a hard limit, well above that
    soft, hard = (2, 4) if stage == "samples" else ("null", 20)
    env = stack.apply(pg_db, s3_store_settings,
                      **{f"OPENSUBJECT_BACKENDS__{interface}": "hang_once"},
                      OPENSUBJECT_TEST_HANG_ONCE=str(token),
                      OPENSUBJECT_TEST_HANG_MODE=limit,
                      OPENSUBJECT_CELERY__TIME_LIMITS=f'{{"{stage}": {{"soft_s": {soft}, "hard_s": {hard}}}}}',
                      PYTHONPATH=str(Path(__file__).parent))
    upload(stack.store, media)
    worker = stack.worker(env, f"hang-{stage}-{limit}", concurrency=2, include="hang_backend")

    # The reconciler looks for work handed out 10 s ago: longer than the hard limit plus the
    # retry delay, as in production (30 min against limits of minutes).
    run = drive_build("faults", timeout_s=240, reconcile_age_s=10)

    assert token.exists(), "the hang was never injected"
    assert not run.failures, run.failures
    ctx = stack.context()
    counts = check_finished_build(ctx, stack.store, "faults", reference)
    assert counts["videos"] == 3
    timed_out = [a for a in attempts(ctx) if a.status == "timeout" and a.stage == stage]
    assert len(timed_out) == 1, timed_out
    hung = timed_out[0]
    if stage == "samples":
        # the samples of the batch the hang cut short: their synthesize attempts are closed
        # (timeout in the task, or lost when the next run found them), then ran again, once
        cut = [a for a in attempts(ctx) if a.stage == "synthesize" and a.status in ("timeout", "lost")]
        assert cut and {a.status for a in cut} == {"timeout" if limit == "soft" else "lost"}, \
            [(a.stage, a.entity_id[:6], a.status, a.started_at.time()) for a in attempts(ctx)
             if a.stage in ("samples", "synthesize")]
        for a in cut:
            after = [b.status for b in attempts(ctx) if b.stage == "synthesize" and b.entity_id == a.entity_id]
            assert after[-1] in ("ok", "rejected") and after.count("ok") <= 2, after  # <= 2: a re-synthesis
    tries = [a for a in attempts(ctx) if a.stage == stage and a.entity_id == hung.entity_id]
    if limit == "soft":
        assert "SoftTimeLimitExceeded" in hung.error
        assert 1.5 < (hung.finished_at - hung.started_at).total_seconds() < 4
        assert "Retry in" in worker.log()
        assert tries[0] == hung
    else:
        # The worker closes the killed attempt as a timeout; the process, terminated, cannot
        # overwrite it (one row for the kill, not a "lost" or "SystemExit" one besides).
        assert "hard time limit exceeded" in hung.error
        assert f"Hard time limit ({hard:.1f}s) exceeded" in worker.log() and "hit the hard time limit" in worker.log()
        assert tries[:-1] == [hung], [(a.status, a.error) for a in tries]
    assert tries[-1].status == "ok", [a.status for a in tries]


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

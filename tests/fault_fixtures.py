"""Helpers for the fault tests and the load benchmark: a build driven through the Celery
workers the way the ``opensubject_build`` DAG drives it (without Airflow), a throwaway
PostgreSQL cluster that can be restarted (``PgCluster``, from local_services.py), and the
exact end-of-build checks.

The driver calls the same ``opensubject_tasks.orchestrate`` functions as the DAG's tasks
and triggers (claim into chunks, start each chunk, wait on the chunk's video states like
``ChunkTrigger`` and on task outcomes like ``TaskOutcomeTrigger``), and sends
``opensubject.reconcile`` every few seconds as the ``opensubject_reconcile`` DAG does on
its schedule. Every call is retried until a
deadline, as Airflow retries its tasks and triggers poll again after an error.
"""
from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from airflow_fixtures import Worker, service_env, use_services
from airflow_fixtures import row_snapshot as rows  # noqa: F401 - the fault tests compare these
from local_services import PgCluster, free_port, redis_base_url, redis_db  # noqa: F401 - the fault tests use these

TERMINAL_VIDEO = {"done", "rejected", "failed"}


# --- the stack of a fault test ---------------------------------------------------------------------
# Small builds: three short 320x180 videos, one pair per subject, two synthesis attempts.
SMALL = {"mine": {"max_pairs_per_subject": 1}, "verify": {"max_attempts": 2}, "curate": {"min_short_side": 90}}
SMALL_ENV = {f"OPENSUBJECT_{sec.upper()}__{k.upper()}": str(v) for sec, d in SMALL.items() for k, v in d.items()}
FAST_RETRY = {"OPENSUBJECT_CELERY__RETRY_BACKOFF_S": "0.5", "OPENSUBJECT_CELERY__RETRY_BACKOFF_MAX_S": "4"}


def upload(store, media: Path) -> None:  # noqa: ANN001
    for f in sorted(media.glob("*.mp4")):
        store.put_file(f"raw/{f.name}", f, "video/mp4")


class Stack:
    """This test's services: environment for the test process and its worker processes."""

    def __init__(self, redis_url: str, monkeypatch, tmp: Path) -> None:  # noqa: ANN001
        self.redis_url, self.monkeypatch, self.tmp = redis_url, monkeypatch, tmp
        self.workers: list[Worker] = []

    def apply(self, database_url: str, store_settings, **extra: str) -> dict[str, str]:  # noqa: ANN001
        from opensubject_tasks.storage import make_store

        env = service_env(database_url, self.redis_url, store_settings, **SMALL_ENV, **FAST_RETRY, **extra)
        use_services(env, self.monkeypatch, migrate=True)
        self.store = make_store(store_settings)
        return env

    def worker(self, env: dict[str, str], name: str, concurrency: int = 1, include: str | None = None,
               loglevel: str = "INFO", queues: str = "cpu,gpu,maintenance") -> Worker:
        w = Worker(env, name, self.tmp / f"worker-{name}.log", queues=queues, concurrency=concurrency,
                   include=include)
        w.cmd[w.cmd.index("--loglevel") + 1] = loglevel
        self.workers.append(w)
        return w.start()

    @staticmethod
    def context():  # noqa: ANN205
        from opensubject_tasks.orchestrate import context

        return context()


@pytest.fixture()
def fault_redis_url() -> str:
    """A Redis database of these tests' own (local_services.redis_db): they flush it, and a
    worker of another test session on the same server must never take their messages."""
    import redis

    url = f"{redis_base_url()}/{redis_db('fault')}"
    redis.Redis.from_url(url).flushdb()  # no message left over from another test
    yield url
    redis.Redis.from_url(url).flushdb()


@pytest.fixture()
def stack(fault_redis_url, monkeypatch, tmp_path):  # noqa: ANN001
    st = Stack(fault_redis_url, monkeypatch, tmp_path)
    yield st
    for w in st.workers:
        w.stop()


def attempts(ctx):  # noqa: ANN001, ANN201
    from sqlalchemy import select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import StageAttempt

    with session_scope(ctx.sessions) as s:
        return list(s.execute(select(StageAttempt.stage, StageAttempt.entity_id, StageAttempt.status,
                                     StageAttempt.error, StageAttempt.started_at, StageAttempt.finished_at)
                              .order_by(StageAttempt.id)).all())


def running_stages(ctx) -> set[str]:  # noqa: ANN001
    return {a.stage for a in attempts(ctx) if a.status == "running"}


# --- driving a build ---------------------------------------------------------------------------
@dataclass
class BuildRun:
    build_id: str
    videos: dict[str, str] = field(default_factory=dict)       # video id -> final state
    failures: list[str] = field(default_factory=list)          # stage errors seen, as the DAG logs them
    report: dict[str, Any] = field(default_factory=dict)
    reconciles: int = 0
    call_errors: list[str] = field(default_factory=list)       # calls retried (an outage seen by the driver)
    wall_s: float = 0.0


class Deadline(TimeoutError):
    pass


def _retry(fn: Callable[[], Any], deadline: float, errors: list[str], pause: float = 0.5) -> Any:
    """Call until it returns, retrying any error until the deadline (Airflow's retries)."""
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            if time.monotonic() > deadline:
                raise
            time.sleep(pause)


def drive_build(build_name: str, *, source: str = "store://raw/", poll_s: float = 0.3,
                reconcile_every_s: float | None = 2.0, reconcile_age_s: float = 4.0,
                timeout_s: float = 600, on_tick: Callable[[], None] | None = None,
                chunk_size: int = 0, params: dict[str, Any] | None = None) -> BuildRun:
    """Run one build through the Celery workers as the build DAG does (start, register,
    claim into chunks, every chunk handed out and waited for in the database, export,
    report) and return what happened."""
    from opensubject_tasks import orchestrate as o
    from opensubject_tasks.tasks import send

    t0 = time.monotonic()
    deadline = t0 + timeout_s
    run = BuildRun(build_id="")
    errs = run.call_errors
    last_reconcile = time.monotonic()
    pass_id: list[str] = []

    def call(fn: Callable[[], Any]) -> Any:
        return _retry(fn, deadline, errs)

    def tick() -> None:
        nonlocal last_reconcile
        if on_tick:
            on_tick()
        # Like the reconcile DAG (max_active_runs=1): a new pass once the last one ended, or
        # after a while if its message was lost too.
        if reconcile_every_s is not None and time.monotonic() - last_reconcile >= reconcile_every_s:
            try:
                if not pass_id or time.monotonic() - last_reconcile > 10 * reconcile_every_s \
                        or o.task_outcome(pass_id[0]) is not None:
                    pass_id[:] = [send("reconcile", reconcile_age_s)]
                    run.reconciles += 1
                    last_reconcile = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - the reconciler runs again on its next schedule
                errs.append(f"reconcile: {type(exc).__name__}: {exc}")
        if time.monotonic() > deadline:
            raise Deadline(f"build {run.build_id} not finished after {timeout_s}s")
        time.sleep(poll_s)

    def wait_task(task_id: str) -> dict:
        while (out := call(lambda: o.task_outcome(task_id))) is None:
            tick()
        return out

    run.build_id = call(lambda: o.start_build({"build_name": build_name, "source": source, **(params or {})},
                                              "fault-run"))
    reg = wait_task(call(lambda: o.send_task("ingest", [source, run.build_id])))
    if reg["status"] != "success":
        raise RuntimeError(f"register failed: {reg}")
    chunks = call(lambda: o.claim_build_videos(run.build_id, chunk_size=chunk_size))
    for chunk in chunks:  # all of them at once, as the mapped chunk task does
        call(lambda c=chunk: o.start_chunk(run.build_id, c))
    waiting = set(chunks)
    while waiting:
        for chunk in sorted(waiting):
            if call(lambda c=chunk: o.chunk_progress(run.build_id, c)) is not None:
                report = call(lambda c=chunk: o.chunk_report(run.build_id, c))
                run.failures += [f"{e['stage']}({e['sample'] or e['video']}): {e['error']}" for e in report["errors"]]
                waiting.discard(chunk)
        if waiting:
            tick()
    run.videos = {vid: st for vid, st in call(lambda: _video_states(o.context(), run.build_id)).items()}

    run.failures += export_build(run.build_id, call, wait_task)
    run.report = call(lambda: o.build_report(run.build_id))
    run.wall_s = time.monotonic() - t0
    return run


def export_build(build_id: str, call: Callable, wait_task: Callable) -> list[str]:
    """The DAG's export: plan, every part at once, then the finish; returns failures."""
    from opensubject_tasks import orchestrate as o

    plan = wait_task(call(lambda: o.send_task("export_plan", [build_id])))
    if plan["status"] != "success":
        return [f"export_plan({build_id}): {plan.get('error')}"]
    parts = plan["result"]["details"]["parts"]
    handles = [call(lambda p=p: o.send_task("export_part", [p])) for p in parts]
    failures = [f"export_part({p}): {out.get('error')}" for p, h in zip(parts, handles, strict=True)
                if (out := wait_task(h))["status"] != "success"]
    if failures:
        return failures
    exp = wait_task(call(lambda: o.send_task("export", [build_id])))
    return [] if exp["status"] == "success" else [f"export({build_id}): {exp.get('error')}"]


def _video_states(ctx, build_id: str) -> dict[str, str]:  # noqa: ANN001
    from sqlalchemy import select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Video

    with session_scope(ctx.sessions) as s:
        return dict(s.execute(select(Video.id, Video.state).where(Video.build_id == build_id)).all())


# --- the videos of the fault tests, and their undisturbed build ----------------------------------------
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


# --- what a finished build must look like -----------------------------------------------------------
def referenced_keys(ctx) -> list[str]:  # noqa: ANN001
    """Every store key a row points to (keyframes, sample files)."""
    from sqlalchemy import select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Clip, Sample

    with session_scope(ctx.sessions) as s:
        out = [k["key"] for kfs in s.scalars(select(Clip.keyframes)) for k in (kfs or [])]
        out += [v for keys in s.scalars(select(Sample.keys)) for v in (keys or {}).values()]
    return out


def store_keys(store, prefix: str) -> list[str]:  # noqa: ANN001
    return [o.key for o in store.list(prefix)]


def exported_sample_ids(store, build_id: str) -> list[str]:  # noqa: ANN001
    """The sample ids in the build's shards, one entry per sample written (duplicates kept)."""
    import tarfile

    ids = []
    for key in store_keys(store, f"datasets/{build_id}/"):
        name = key.rsplit("/", 1)[1]
        if not (name.startswith("shard-") and name.endswith(".tar")):
            continue
        with tempfile.NamedTemporaryFile(suffix=".tar") as f:
            store.get_file(key, f.name)
            with tarfile.open(f.name) as tar:
                ids += [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]
    return ids


def check_finished_build(ctx, store, build_id: str, reference: dict) -> dict:  # noqa: ANN001
    """The exact end state: every video terminal, every sample verified or rejected, the
    same rows and the same objects as an undisturbed build of the same videos (nothing
    lost, nothing duplicated), every referenced object present, each verified sample
    exported exactly once, no attempt left running. Returns the counts."""
    from sqlalchemy import select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import StageAttempt

    got = rows(ctx)
    assert {st for _, st in got["videos"].values()} <= TERMINAL_VIDEO, got["videos"]
    assert {st for st, _, _ in got["samples"].values()} <= {"verified", "rejected"}, got["samples"]
    for table in ("videos", "clips", "subjects", "pairs", "samples"):
        assert got[table] == reference["rows"][table], table
    objects = store_keys(store, "videos/")
    assert len(objects) == len(set(objects))
    assert set(objects) == reference["objects"], (set(objects) ^ reference["objects"])
    refs = referenced_keys(ctx)
    assert refs and set(refs) <= set(objects), sorted(set(refs) - set(objects))[:5]
    verified = sorted(i for i, (st, _, _) in got["samples"].items() if st == "verified")
    exported = exported_sample_ids(store, build_id)
    assert sorted(exported) == verified, (len(exported), len(verified))
    with session_scope(ctx.sessions) as s:
        running = s.scalars(select(StageAttempt.id).where(StageAttempt.status == "running")).all()
    assert not running, f"{len(running)} attempt(s) still marked running"
    return {"videos": len(got["videos"]), "samples": len(got["samples"]), "verified": len(verified),
            "objects": len(objects), "exported": len(exported)}

"""Airflow for tests: one AIRFLOW_HOME per test session (SQLite metadata database),
this repository's dags/ and plugins/, and helpers to run the stack's real processes.

Import this module before anything imports ``airflow``: Airflow reads its
configuration once, at import.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
AIRFLOW_HOME = Path(os.environ.get("OPENSUBJECT_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="os-airflow-"))
JWT_SECRET = "opensubject-test-jwt-secret-" + "x" * 40  # test-only signing key
# Broker keys of this test session: another session on the same Redis database (a second
# checkout, a colleague's run) never takes these messages, nor this one theirs.
BROKER_PREFIX = f"ostest-{uuid.uuid4().hex[:8]}:"
ADMIN_PASSWORD = "opensubject-test-admin"               # test-only login

AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(AIRFLOW_HOME / "passwords.json"),
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
}
os.environ.update(AIRFLOW_ENV)
(AIRFLOW_HOME / "passwords.json").write_text(json.dumps({"admin": ADMIN_PASSWORD}))


def _check_config() -> None:
    from airflow.configuration import conf

    home = conf.get("core", "dags_folder")
    if Path(home) != REPO / "dags":
        pytest.fail("airflow was imported before tests/airflow_fixtures.py set its configuration "
                    f"(dags_folder is {home}); import airflow_fixtures first")


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """The session's Airflow metadata database, migrated (about 5 s, once)."""
    marker = AIRFLOW_HOME / ".migrated"
    if not marker.exists():
        out = subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env={**os.environ, **AIRFLOW_ENV},
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            pytest.fail(f"airflow db migrate failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        marker.write_text("ok")
    _check_config()
    return AIRFLOW_HOME


def service_env(database_url: str, broker_url: str, store_settings, **extra: str) -> dict[str, str]:
    """OPENSUBJECT_* variables pointing a process at the test services."""
    env = {
        "OPENSUBJECT_DATABASE_URL": database_url,
        "OPENSUBJECT_BROKER_URL": broker_url,
        "OPENSUBJECT_STORE__KIND": store_settings.kind,
        "OPENSUBJECT_STORE__ENDPOINT": store_settings.endpoint,
        "OPENSUBJECT_STORE__ACCESS_KEY": store_settings.access_key.get_secret_value(),
        "OPENSUBJECT_STORE__SECRET_KEY": store_settings.secret_key.get_secret_value(),
        "OPENSUBJECT_STORE__BUCKET": store_settings.bucket,
        "OPENSUBJECT_STORE__REGION": "us-east-1",
        "OPENSUBJECT_CELERY__POLL_INTERVAL_S": "0.3",
        "OPENSUBJECT_CELERY__BROKER_KEY_PREFIX": BROKER_PREFIX,
        "OPENSUBJECT_CELERY__TRIGGER_MIN_WAIT_S": "0",  # dag.test has no executor to race with
    }
    env.update(extra)
    return env


def use_services(env: dict[str, str], monkeypatch, *, migrate: bool = False) -> None:  # noqa: ANN001
    """Point this process at the services of ``env`` as its worker processes see them: the
    variables set (``monkeypatch`` undoes them), Celery configured from them and, with
    ``migrate``, the schema applied to their database."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from opensubject_tasks.celery_app import configure

    configure()
    if migrate:
        from opensubject_tasks.db.engine import make_engine, upgrade

        engine = make_engine(env["OPENSUBJECT_DATABASE_URL"])
        upgrade(engine)
        engine.dispose()


class Worker:
    """A real ``celery worker`` process (its own process group, so the pool dies with it)."""

    def __init__(self, env: dict[str, str], name: str, log_path: Path, queues: str = "cpu,gpu,maintenance",
                 concurrency: int = 1, include: str | None = None) -> None:
        self.cmd = [str(VENV_BIN / "celery"), "-A", "opensubject_tasks.celery_app", "worker",
                    "-Q", queues, "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
                    "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        if include:  # a test-only module loaded into the worker (celery worker --include)
            self.cmd += ["--include", include]
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 60.0) -> Worker:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if b" ready." in self.log_path.read_bytes()[offset:]:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"celery worker not ready after {ready_timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pool_children(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool): nothing is acknowledged."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()


@contextmanager
def running_worker(env: dict[str, str], name: str, log_path: Path, **kw):
    worker = Worker(env, name, log_path, **kw).start()
    try:
        yield worker
    finally:
        worker.stop()


def load_dag(dag_id: str):
    """The DAG as the dag-processor parses it from dags/."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag(dag_id)
    assert dag is not None, f"{dag_id} not found in dags/"
    return dag


def run_dag_test(dag, conf: dict | None = None, retries: int = 0):
    """``dag.test()`` with Airflow retries off (dag.test would sleep out retry_delay);
    returns the run and {(task_id, map_index): state}."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    for t in dag.tasks:
        t.retries = retries
    run = dag.test(run_conf=conf or {})
    with create_session() as s:
        states = {(ti.task_id, ti.map_index): str(ti.state.value if hasattr(ti.state, "value") else ti.state)
                  for ti in s.query(TaskInstance).filter(TaskInstance.run_id == run.run_id)}
    return run, states


# --- data for the dashboard -------------------------------------------------------------------
HOSTILE = "<script>alert(1)</script>.mp4"
FAIL_REASON = "not a video: moov atom not found"


def seed_dashboard_data(ctx) -> None:
    """A build with a done video (a verified sample with its images in the store), a video
    failed with a recorded error after a retry, a rejected re-synthesized sample and a
    video still waiting."""
    import io
    from datetime import datetime, timedelta

    from PIL import Image
    from skimage import data as photos

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Build, Clip, Pair, Sample, StageAttempt, Subject, Video
    from opensubject_tasks.storage import Keys

    cat = Image.fromarray(photos.chelsea())
    keys = {}
    for i, name in enumerate(("reference", "generation_input", "manipulation_input", "target")):
        png = io.BytesIO()
        img = cat.crop((20 * i, 0, 20 * i + 320, 240)).resize((160, 120))
        (img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else img).save(png, "PNG")
        keys[name] = Keys.sample_file("v1", "v1-c0-s0-p0-1", 1, f"{name}.png")
        ctx.store.put_bytes(keys[name], png.getvalue(), "image/png")
    now = datetime.now(UTC)
    with session_scope(ctx.sessions) as s:
        s.add(Build(id="b1", params={}, profile="cpu", state="running"))
        s.flush()
        s.add_all([
            Video(id="v1", content_hash="h1", source_uri="store://raw/a.mp4", name="a.mp4", build_id="b1",
                  state="done", stage_done="mine"),
            Video(id="v2", content_hash="h2", source_uri="store://raw/x.mp4", name=HOSTILE, build_id="b1",
                  state="failed", reason=FAIL_REASON),
            Video(id="v3", content_hash="h3", source_uri="store://raw/c.mp4", name="c.mp4", build_id="b1",
                  state="registered"),
        ])
        s.flush()
        s.add(Clip(id="v1-c0", video_id="v1", idx=0, start_frame=0, end_frame=50, start_s=0, end_s=2))
        s.flush()
        s.add(Subject(id="v1-c0-s0", clip_id="v1-c0", idx=0, category="cat", category_source="classical",
                      boxes={}))
        s.flush()
        for i, (state, reason) in enumerate([("verified", None), ("rejected", "identity not preserved")]):
            pid = f"v1-c0-s0-p{i}-{i + 1}"
            s.add(Pair(id=pid, subject_id="v1-c0-s0", ref_frame=i, tgt_frame=i + 1, ref_box=[0, 0, 1, 1],
                       tgt_box=[0, 0, 1, 1]))
            s.flush()
            s.add(Sample(id=pid, pair_id=pid, build_id="b1", state=state, attempt=1 + i * 2, seed=i,
                         keys=keys if i == 0 else {}, reason=reason, caption_short="a red cat",
                         updated_at=now - timedelta(seconds=i)))
        s.add_all([
            StageAttempt(build_id="b1", entity_type="video", entity_id="v2", stage="curate", attempt=1,
                         status="error", error="OperationalError: server closed the connection"),
            StageAttempt(build_id="b1", entity_type="video", entity_id="v2", stage="curate", attempt=2,
                         status="failed", error=FAIL_REASON),
            StageAttempt(build_id="b1", entity_type="video", entity_id="v1", stage="curate", attempt=1,
                         status="ok"),
        ])


def age_rows(ctx, seconds: float) -> None:  # noqa: ANN001
    """Move every hand-out and stage attempt time ``seconds`` into the past: the rows as
    they would be after waiting that long, without the wait."""
    from datetime import timedelta

    from sqlalchemy import update

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Sample, StageAttempt, Video

    back = timedelta(seconds=seconds)
    with session_scope(ctx.sessions) as s:
        for model, column in ((Video, Video.queued_at), (Sample, Sample.queued_at),
                              (StageAttempt, StageAttempt.started_at), (StageAttempt, StageAttempt.finished_at)):
            s.execute(update(model).where(column.is_not(None)).values({column: column - back})
                      .execution_options(synchronize_session=False))


def row_snapshot(ctx) -> dict:  # noqa: ANN001
    """Every row a build leaves, by id, with the fields that must not change when a
    build is interrupted, retried or run distributed instead of embedded."""
    from sqlalchemy import select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Clip, Pair, Sample, Subject, Video

    with session_scope(ctx.sessions) as s:
        return {
            "videos": {v.name: (v.id, v.state) for v in s.scalars(select(Video))},
            "clips": {c.id: (c.state, c.start_frame, c.end_frame) for c in s.scalars(select(Clip))},
            "subjects": {x.id: x.category for x in s.scalars(select(Subject))},
            "pairs": {p.id: (p.ref_frame, p.tgt_frame) for p in s.scalars(select(Pair))},
            "samples": {x.id: (x.state, x.attempt, x.seed) for x in s.scalars(select(Sample))},
        }

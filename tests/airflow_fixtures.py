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
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
AIRFLOW_HOME = Path(os.environ.get("OPENSUBJECT_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="os-airflow-"))
JWT_SECRET = "opensubject-test-jwt-secret-" + "x" * 40  # test-only signing key
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
    }
    env.update(extra)
    return env


class Worker:
    """A real ``celery worker`` process (its own process group, so the pool dies with it)."""

    def __init__(self, env: dict[str, str], name: str, log_path: Path, queues: str = "cpu,gpu",
                 concurrency: int = 1) -> None:
        self.cmd = [str(VENV_BIN / "celery"), "-A", "opensubject_tasks.celery_app", "worker",
                    "-Q", queues, "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
                    "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 60.0) -> "Worker":
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

"""Services for the distributed benchmarks: a throwaway PostgreSQL database, a Redis
database index, an S3 server process (moto) and Celery worker processes.

PostgreSQL and Redis are found as the tests find them (tests/local_services.py): the
servers named by OPENSUBJECT_TEST_DATABASE_URL / OPENSUBJECT_TEST_REDIS_URL, else the
local ones (127.0.0.1:5432, :6379) when they answer, else throwaway servers started on
first use and stopped when the benchmark exits.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "tests"))
from local_services import free_port, pg_admin_url, redis_base_url  # noqa: E402


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


@contextlib.contextmanager
def pg_database(prefix: str = "os_bench") -> Iterator[str]:
    """A new database on the test PostgreSQL server, dropped afterwards; yields its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin_url = pg_admin_url()
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def redis_db(index: int) -> Iterator[str]:
    import redis

    url = f"{redis_base_url()}/{index}"
    redis.Redis.from_url(url).flushdb()
    try:
        yield url
    finally:
        redis.Redis.from_url(url).flushdb()


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """An S3 server process (moto); yields host:port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def service_env(database_url: str, broker_url: str, s3_endpoint: str, bucket: str) -> dict[str, str]:
    return {
        "OPENSUBJECT_DATABASE_URL": database_url,
        "OPENSUBJECT_BROKER_URL": broker_url,
        "OPENSUBJECT_STORE__KIND": "minio",
        "OPENSUBJECT_STORE__ENDPOINT": s3_endpoint,
        "OPENSUBJECT_STORE__ACCESS_KEY": "bench",
        "OPENSUBJECT_STORE__SECRET_KEY": "bench-secret",
        "OPENSUBJECT_STORE__BUCKET": bucket,
        "OPENSUBJECT_STORE__REGION": "us-east-1",
    }


class Proc:
    """A long-running child process in its own process group, logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, ready: str | None = None) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if ready:
            deadline = time.monotonic() + 180
            while ready.encode() not in log.read_bytes():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def celery_worker(env: dict[str, str], log: Path, name: str = "bench", concurrency: int = 1,
                  queues: str = "cpu,gpu,maintenance") -> Proc:
    return Proc([str(BIN / "celery"), "-A", "opensubject_tasks.celery_app", "worker", "-Q", queues,
                 "--concurrency", str(concurrency), "--hostname", f"{name}@%h", "--loglevel", "INFO",
                 "--without-gossip", "--without-mingle"], env, log, ready=" ready.")

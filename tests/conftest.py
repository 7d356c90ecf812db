"""Real services for tests: PostgreSQL, Redis and an S3 server process.

Nothing here mocks a service. A missing service fails the test with a message that
says how to start it (it never skips silently).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
logging.getLogger("werkzeug").setLevel(logging.ERROR)

PG_ADMIN_URL = os.environ.get(
    "OPENSUBJECT_TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("OPENSUBJECT_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A throwaway database on the test PostgreSQL server, dropped at the end."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({exc}). Start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` or set "
            "OPENSUBJECT_TEST_DATABASE_URL to a server you may create databases on."
        )
    name = f"opensubject_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture()
def pg_db(pg_url: str) -> str:
    """The session database with a freshly applied schema and no rows."""
    from sqlalchemy import create_engine, text

    from opensubject_tasks.db.engine import upgrade

    eng = create_engine(pg_url)
    with eng.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    upgrade(eng)
    eng.dispose()
    return pg_url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis database index of its own, flushed before and after."""
    import redis

    # A database index of this test session's own, so that parallel test sessions on
    # one Redis never consume each other's Celery messages.
    db = int(os.environ.get("OPENSUBJECT_TEST_REDIS_DB", 1 + os.getpid() % 15))
    url = f"{REDIS_URL}/{db}"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(
            f"Redis is not reachable at {url} ({exc}). Start it with `redis-server --daemonize yes "
            "--bind 127.0.0.1 --port 6379 --save '' --appendonly no` or set OPENSUBJECT_TEST_REDIS_URL."
        )
    client.flushdb()
    yield url
    client.flushdb()


class S3Server:
    """An S3-compatible server (moto) in its own process on a free loopback port.

    Production runs MinIO; this speaks the same S3 API to the `minio` SDK.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_port("127.0.0.1", self.port, 30)
        except TimeoutError:
            self.stop()
            pytest.fail("the S3 test server (moto) did not start: is `moto[s3]` installed in .venv?")
        return self

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(  # noqa: S310 - loopback test server
            urllib.request.Request(f"http://{self.endpoint}/moto-api/reset", method="POST")
        ).read()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture()
def s3_store_settings(s3_server: S3Server):
    """StoreSettings for a MinioStore on a fresh bucket of the test S3 server."""
    from opensubject_tasks.config import StoreSettings

    return StoreSettings(kind="minio", endpoint=s3_server.endpoint, access_key="testkey",
                         secret_key="testsecret", bucket=f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def sample_media(tmp_path_factory) -> Path:
    """The generated sample videos with their ground truth (made once per session)."""
    from opensubject_tasks.media.samples import make_samples

    out = tmp_path_factory.mktemp("media")
    make_samples(out)
    return out


@pytest.fixture()
def embedded_settings(tmp_path: Path):
    """Settings for the embedded mode: SQLite file and a local-directory store."""
    from opensubject_tasks.config import load_settings

    return load_settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                         store={"kind": "local", "local_root": str(tmp_path / "store")})

"""Services for the distributed benchmarks: a throwaway PostgreSQL database, a Redis
database index, an S3 server process (moto) and Celery worker processes.

PostgreSQL and Redis are found as the tests find them (tests/local_services.py): the
servers named by OPENSUBJECT_TEST_DATABASE_URL / OPENSUBJECT_TEST_REDIS_URL, else the
local ones (127.0.0.1:5432, :6379) when they answer, else throwaway servers started on
first use and stopped when the benchmark exits.
"""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "tests"))
from airflow_stack import Proc, celery_worker  # noqa: E402, F401 - for the benchmarks
from local_services import free_port, pg_database, redis_base_url  # noqa: E402, F401


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


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

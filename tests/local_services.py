"""PostgreSQL and Redis for the tests and the benchmarks: the servers named by
OPENSUBJECT_TEST_DATABASE_URL / OPENSUBJECT_TEST_REDIS_URL, else the local ones
(127.0.0.1:5432 with trust auth, 127.0.0.1:6379) when they answer, else throwaway
servers started here on free ports with their data in a temporary directory, stopped
when the process ends (or by ``stop_throwaway()``).

``OPENSUBJECT_TEST_SERVICES`` chooses:

* ``auto`` (default): as above.
* ``throwaway``: never the local servers; throwaway ones unless the URL variables name
  a server.
* ``local``: only the local servers (a test fails when they do not answer).

A server is resolved once, when a caller first asks for its URL (nothing starts for
tests that need neither), and its URL is then exported in the variable above, so
that later readers and child processes use the same server.

Imports nothing heavy and no pytest: benchmarks use it too.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

DATABASE_VAR, REDIS_VAR, MODE_VAR = ("OPENSUBJECT_TEST_DATABASE_URL", "OPENSUBJECT_TEST_REDIS_URL",
                                     "OPENSUBJECT_TEST_SERVICES")
LOCAL_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS = "redis://127.0.0.1:6379"
MODES = ("auto", "throwaway", "local")


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
                   if p.split("/")[4].isdigit() else 0)
    return Path(found[-1]).parent if found else Path("/usr/lib/postgresql/bin")


PG_BIN = _pg_bin()


class ServiceUnavailable(RuntimeError):
    """Neither a configured, a local nor a throwaway server could be had; says how to fix it."""


def stop_process(proc: subprocess.Popen | None, grace_s: float = 10) -> None:
    """Terminate a server process we started; kill it when it ignores that."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)


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


# --- throwaway servers ---------------------------------------------------------------------------
class PgCluster:
    """``initdb`` + ``pg_ctl`` on a free port, run as the ``postgres`` user (PostgreSQL
    refuses to run as root), trust auth on loopback only. Stop/start it to make an outage."""

    def __init__(self, database: str = "opensubject") -> None:
        if not (PG_BIN / "initdb").exists():
            raise ServiceUnavailable(
                f"PostgreSQL's server programs are not installed (no {PG_BIN}/initdb): install the Debian "
                "package `postgresql` (`make system-deps` does), or set OPENSUBJECT_TEST_DATABASE_URL.")
        self.root = Path(tempfile.mkdtemp(prefix="os-pg-"))
        self.port = free_port()
        self.database = database
        self.data, self.log = self.root / "data", self.root / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{self.database}"

    def _as_postgres(self, *cmd: str, timeout: float = 60) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        out = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n"
                               f"{self.log.read_text() if self.log.exists() else ''}")

    def start(self) -> PgCluster:
        if not self.data.exists():
            if os.geteuid() == 0:
                os.chmod(self.root, 0o755)
                shutil.chown(self.root, "postgres", "postgres")
            self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                              "--no-sync")
            fresh = True
        else:
            fresh = False
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o",
                          f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                          "-c synchronous_commit=off -c full_page_writes=off",
                          "-w", "start")
        if fresh and self.database != "postgres":
            self._as_postgres(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              self.database)
        return self

    def stop(self, mode: str = "fast") -> None:
        """``fast``: every session is disconnected, as in a restart or a failover."""
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except Exception:  # noqa: BLE001, S110 - not running
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """``redis-server`` on a free loopback port, no persistence, in a temporary directory."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(self.binary).exists():
            raise ServiceUnavailable("redis-server is not installed: install the Debian package `redis-server` "
                                     "(`make system-deps` does), or set OPENSUBJECT_TEST_REDIS_URL.")
        self.root = Path(tempfile.mkdtemp(prefix="os-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the server owns it
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root), "--databases", "16"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            wait_port("127.0.0.1", self.port, 20)
        except TimeoutError:
            self.destroy()
            raise RuntimeError("redis-server did not start:\n"
                               + (self.root / "server.log").read_text(errors="replace")[-2000:]) from None
        return self

    def destroy(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


# --- which server ----------------------------------------------------------------------------------
_lock = threading.Lock()
_started: dict[str, PgCluster | RedisServer] = {}


def mode() -> str:
    value = os.environ.get(MODE_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ServiceUnavailable(f"{MODE_VAR}={value!r}: expected one of {', '.join(MODES)}")
    return value


def _pg_answers(url: str) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - refused, or a server that wants a password
        return False
    finally:
        engine.dispose()


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping())
    except Exception:  # noqa: BLE001
        return False


def _resolve(var: str, local: str, answers, start) -> str:  # noqa: ANN001
    with _lock:
        url = os.environ.get(var)
        if url:
            return url
        m = mode()
        if m == "local" or (m == "auto" and answers(local)):
            url = local
        else:
            server = start()
            _started[var] = server
            url = server.url
        os.environ[var] = url  # later readers and child processes: the same server
        return url


def pg_admin_url() -> str:
    """A URL of a PostgreSQL server (database ``postgres``) this session may create databases on."""
    return _resolve(DATABASE_VAR, LOCAL_PG, _pg_answers, lambda: PgCluster(database="postgres").start())


def redis_db(kind: str) -> int:
    """A Redis database index for a session's ``broker`` (1-9) or for the fault tests (10-15),
    which flush theirs. Under pytest-xdist each worker (gw0, gw1, ...) takes the index of its
    number, so no two workers of one run share a database (at most 6 apart for the fault
    tests); otherwise a broker takes one by process id."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    n = int(name[2:]) if name.startswith("gw") else None
    if kind == "broker":
        return 1 + (os.getpid() if n is None else n) % 9
    return 10 + (n or 0) % 6


def redis_base_url() -> str:
    """A Redis server's URL, without a database index."""
    return _resolve(REDIS_VAR, LOCAL_REDIS, _redis_answers, lambda: RedisServer().start()).rstrip("/")


def throwaway_started() -> dict[str, str]:
    """{variable: URL} of the servers started by this process."""
    return {var: server.url for var, server in _started.items()}


def stop_throwaway() -> None:
    """Stop and delete the servers started by this process; the next caller resolves again."""
    with _lock:
        for var, server in list(_started.items()):
            server.destroy()
            if os.environ.get(var) == server.url:
                del os.environ[var]
            del _started[var]


atexit.register(stop_throwaway)


@contextlib.contextmanager
def pg_database(prefix: str, schema: bool = False) -> Iterator[str]:
    """A new database on the test PostgreSQL server, dropped afterwards; yields its URL.
    ``schema``: with the project's schema applied."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin_url = pg_admin_url()
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        if schema:
            from opensubject_tasks.db.engine import upgrade

            engine = create_engine(url)
            upgrade(engine)
            engine.dispose()
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

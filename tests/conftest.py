"""Real services for tests: PostgreSQL, Redis and an S3 server process.

Nothing here mocks a service. PostgreSQL and Redis are the servers named by
OPENSUBJECT_TEST_DATABASE_URL / OPENSUBJECT_TEST_REDIS_URL, else the local ones when they
answer, else throwaway servers started on first use and stopped at the end of the session
(tests/local_services.py; OPENSUBJECT_TEST_SERVICES=throwaway forces those). A service
that cannot be had fails the test with a message that says what to do (it never skips
silently).

Every test that uses a service fixture is marked ``services`` here, and every test that
uses a fixture which runs a build end to end is marked ``slow``: ``pytest -m "not services
and not slow"`` is the fast tier (no server, no whole build), ``pytest`` runs everything. The fixtures of airflow_fixtures.py,
fault_fixtures.py, model_fixtures.py and scale_stack.py come in through ``pytest_plugins``.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from local_services import (
    DATABASE_VAR,
    MODE_VAR,
    REDIS_VAR,
    ServiceUnavailable,
    free_port,
    mode,
    pg_admin_url,
    pg_database,
    redis_base_url,
    redis_db,
    stop_process,
    stop_throwaway,
    throwaway_started,
    wait_port,
)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
logging.getLogger("werkzeug").setLevel(logging.ERROR)

# airflow_fixtures first: it configures Airflow before anything imports it.
pytest_plugins = ["airflow_fixtures", "fault_fixtures", "model_fixtures", "scale_stack"]

__all__ = ["REPO", "S3Server", "free_port", "wait_port"]

# A test that uses any of these (directly or through another fixture) needs services.
SERVICE_FIXTURES = frozenset({"pg_url", "redis_url", "fault_redis_url", "s3_server", "airflow_db"})
# ... and these run builds end to end (a test that runs one itself carries @pytest.mark.slow).
SLOW_FIXTURES = frozenset({"full_run", "reference", "stack", "scale", "mined_build"})
# ... and of those, these take minutes (a whole Airflow stack, an 8-video run).
LONGEST_FIXTURES = frozenset({"full_run", "scale"})


def __getattr__(name: str) -> str:
    """``PG_ADMIN_URL`` and ``REDIS_URL``, resolved (and started) when first read."""
    if name == "PG_ADMIN_URL":
        return pg_admin_url()
    if name == "REDIS_URL":
        return redis_base_url()
    raise AttributeError(name)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    """Mark ``services`` every test whose fixtures include a service, ``slow`` every test
    whose fixtures run a build (before ``-m`` selects)."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if SERVICE_FIXTURES.intersection(names):
            item.add_marker(pytest.mark.services)
        if SLOW_FIXTURES.intersection(names):
            item.add_marker(pytest.mark.slow)
    # Under xdist each process takes whole files: the longest files start first (a real
    # Airflow stack or an 8-video run, then other builds, then services, then the rest; each
    # file's tests keep their order), so that none of them finishes last while the others idle.
    def rank(item) -> int:  # noqa: ANN001
        if LONGEST_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            return 0
        return 1 if item.get_closest_marker("slow") else 2 if item.get_closest_marker("services") else 3

    weight: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        weight[path] = min(rank(item), weight.get(path, 3))
    items.sort(key=lambda it: weight[it.nodeid.split("::")[0]])


def pytest_report_header(config):  # noqa: ANN001
    return f"services: {mode()} ({MODE_VAR}); started on first use"


def pytest_terminal_summary(terminalreporter):  # noqa: ANN001
    for var, url in throwaway_started().items():
        terminalreporter.write_line(f"throwaway server for {var}: {url} (stopped at exit)")


def pytest_unconfigure(config):  # noqa: ANN001
    stop_throwaway()


def _service(resolve, what: str) -> str:  # noqa: ANN001
    try:
        return resolve()
    except ServiceUnavailable as exc:
        pytest.fail(f"{what} for the tests: {exc}", pytrace=False)
    except Exception as exc:  # noqa: BLE001 - a throwaway server that did not start
        pytest.fail(f"{what} for the tests could not be started: {exc}", pytrace=False)


def _unreachable(what: str, url: str, var: str, exc: Exception) -> None:
    hint = (f"{var} names it: unset it to let the tests use the local server or start a throwaway one"
            if os.environ.get(var) and var not in throwaway_started() else
            f"{MODE_VAR}=local: start the local server, or unset {MODE_VAR}")
    pytest.fail(f"{what} is not reachable at {url} ({exc}). {hint}.", pytrace=False)


# --- PostgreSQL ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_url() -> str:
    """A throwaway database on the test PostgreSQL server, with the schema applied once;
    dropped at the end."""
    from sqlalchemy import create_engine, text

    admin_url = _service(pg_admin_url, "PostgreSQL")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        _unreachable("PostgreSQL", admin_url, DATABASE_VAR, exc)
    finally:
        admin.dispose()
    with pg_database("opensubject_test", schema=True) as url:
        yield url


class _Tables:
    """Empties the session database's tables between tests; the schema stays.

    DELETE, children before parents, then every sequence used back to 1: on the few rows
    a test leaves this is several times cheaper than TRUNCATE (which costs per table) or
    applying the schema again."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True)
        self._learn()

    def _state(self) -> tuple[frozenset, frozenset]:
        from sqlalchemy import text

        with self.engine.connect() as c:
            tables = frozenset(c.scalars(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")))
            applied = frozenset(c.scalars(text("SELECT filename FROM schema_migrations"))) \
                if "schema_migrations" in tables else frozenset()
        return tables, applied

    def _learn(self) -> None:
        """The schema as applied, and its tables in an order that deletes children first."""
        from sqlalchemy import text

        self.expected = self._state()
        with self.engine.connect() as c:
            edges = c.execute(text(
                "SELECT c.conrelid::regclass::text, c.confrelid::regclass::text FROM pg_constraint c "
                "JOIN pg_namespace n ON n.oid = c.connamespace WHERE c.contype = 'f' AND n.nspname = 'public'"
            )).all()
        parents = {t: set() for t in self.expected[0] - {"schema_migrations"}}
        for child, parent in edges:
            if child != parent and child in parents:
                parents[child].add(parent)
        order: list[str] = []
        while parents:  # a table goes once no remaining table refers to it
            free = sorted(t for t in parents if not any(t in ps for o, ps in parents.items() if o != t))
            if not free:
                raise RuntimeError(f"foreign keys form a cycle among {sorted(parents)}")
            order += free
            for t in free:
                del parents[t]
        # the kept counts last: deleting the rows they count appends changes to them
        order = [t for t in order if not t.startswith("build_count")] + \
            [t for t in order if t.startswith("build_count")]
        self.delete_sql = "; ".join(f'DELETE FROM "{t}"' for t in order)

    def empty(self) -> None:
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError

        from opensubject_tasks.db.engine import upgrade

        if self._state() != self.expected:  # a test changed the schema itself: apply it again
            with self.engine.begin() as c:
                c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
            upgrade(self.engine)
            self._learn()
        for attempt in range(2):
            try:
                with self.engine.begin() as c:
                    c.execute(text("SET LOCAL lock_timeout = '15s'"))
                    c.execute(text(self.delete_sql))
                    c.execute(text("SELECT setval(format('%I.%I', schemaname, sequencename)::regclass, 1, false) "
                                   "FROM pg_sequences WHERE schemaname = 'public' AND last_value IS NOT NULL"))
                return
            except OperationalError:
                if attempt:
                    raise
                # A connection left open by an earlier test still holds a row or a table: end it.
                with self.engine.begin() as c:
                    c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()"))


@pytest.fixture(scope="session")
def _pg_tables(pg_url: str) -> _Tables:
    tables = _Tables(pg_url)
    yield tables
    tables.engine.dispose()


@pytest.fixture()
def pg_db(pg_url: str, _pg_tables: _Tables) -> str:
    """The session database: its schema, no rows (tables emptied before the test)."""
    _pg_tables.empty()
    return pg_url


@pytest.fixture()
def orchestrate_ctx(pg_db: str, monkeypatch):
    """The context of the orchestration functions (``orchestrate.context()``, what Airflow's
    tasks and triggers use), on the session database."""
    from opensubject_tasks import orchestrate
    from opensubject_tasks.db.engine import upgrade

    monkeypatch.setenv("OPENSUBJECT_DATABASE_URL", pg_db)
    c = orchestrate.context()
    upgrade(c.engine)
    yield c
    c.engine.dispose()


@pytest.fixture()
def pg_fresh_db(pg_url: str) -> str:
    """A database of this test's own with a freshly applied schema, dropped afterwards:
    for tests that change or drop the schema itself."""
    with pg_database("opensubject_fresh", schema=True) as url:
        yield url


# --- Redis ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis database index of its own, flushed before and after."""
    import redis

    base = _service(redis_base_url, "Redis")
    # A database index of this test session's own, so that parallel test sessions on
    # one Redis never consume each other's Celery messages.
    db = int(os.environ.get("OPENSUBJECT_TEST_REDIS_DB", redis_db("broker")))
    url = f"{base}/{db}"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        _unreachable("Redis", url, REDIS_VAR, exc)
    client.flushdb()
    yield url
    client.flushdb()


# --- S3 ------------------------------------------------------------------------------------------
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
        stop_process(self.proc)


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


# --- media and contexts ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sample_media(tmp_path_factory) -> Path:
    """The generated sample videos with their ground truth (a copy per session of the
    ones kept on disk, tests/disk_cache.py)."""
    from disk_cache import sample_videos

    return sample_videos(tmp_path_factory.mktemp("media"))


@pytest.fixture()
def embedded_settings(tmp_path: Path):
    """Settings for the embedded mode: SQLite file and a local-directory store."""
    from opensubject_tasks.config import load_settings

    return load_settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                         store={"kind": "local", "local_root": str(tmp_path / "store")})


@pytest.fixture(params=["embedded", pytest.param("postgres+s3", marks=pytest.mark.services)])
def service_ctx(request):
    """A Context with the schema applied, once per kind of services: the embedded mode's
    (SQLite and a local directory) and production's (PostgreSQL and S3), empty."""
    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import upgrade

    if request.param == "embedded":
        settings = request.getfixturevalue("embedded_settings")
    else:
        settings = load_settings(database_url=request.getfixturevalue("pg_db"),
                                 store=request.getfixturevalue("s3_store_settings").model_dump())
    ctx = Context.from_settings(settings)
    upgrade(ctx.engine)
    yield ctx
    ctx.engine.dispose()

"""Engine creation and schema upgrade.

PostgreSQL gets the ordered files in ``sql/`` (the same files docker-compose uses to
initialise its database); SQLite (embedded mode) gets the SQLAlchemy models.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from opensubject_tasks.db.models import Base

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
_MIGRATION_LOCK_ID = 4_217_001  # pg advisory lock: one upgrader at a time


def sql_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    files = sorted(sql_dir.glob("*.sql"))
    if not files:
        raise FileNotFoundError(f"no schema files found in {sql_dir}")
    return files


def make_engine(url: str, pool_size: int = 2, max_overflow: int = 2, pool_timeout_s: float = 30.0) -> Engine:
    """An engine holding at most ``pool_size + max_overflow`` PostgreSQL connections."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # parallel readers while one process writes
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    # pool_pre_ping re-establishes connections dropped by a database restart.
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow,
                         pool_timeout=pool_timeout_s)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def upgrade(engine: Engine, sql_dir: Path = SQL_DIR) -> list[str]:
    """Bring the schema up to date; returns the names of the files applied now."""
    if engine.dialect.name == "sqlite":
        Base.metadata.create_all(engine)
        return []
    applied_now: list[str] = []
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
        conn.execute(text(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " filename TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        ))
        done = {r[0] for r in conn.execute(text("SELECT filename FROM schema_migrations"))}
        for path in sql_files(sql_dir):
            if path.name in done:
                continue
            conn.exec_driver_sql(path.read_text())
            conn.execute(
                text("INSERT INTO schema_migrations (filename) VALUES (:f)"), {"f": path.name}
            )
            applied_now.append(path.name)
    return applied_now

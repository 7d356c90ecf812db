"""One run at a time per entity: a lock that dies with the process holding it.

Two copies of a stage on the same video or sample (a redelivered message racing the
original, an operator's re-run during a build) must not write at the same time. The lock
is held for the whole stage and released by the database or the kernel when its holder
dies, so a crashed run never blocks the next one:

* PostgreSQL: a session-level advisory lock on a connection of its own;
* SQLite (embedded): ``flock`` on a small file next to the database.

The second copy waits for the first and then runs: stages skip work that is already
done, so it finds the first copy's results and returns the same follow-up work.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, text

from opensubject_tasks.errors import TransientError


class LockTimeout(TransientError):
    """Another run held the entity for longer than the wait allowed: retried later."""


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for a name (stable across processes)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def entity_lock(engine: Engine, name: str, wait_s: float, poll_s: float = 0.25) -> Iterator[float]:
    """Hold the lock called ``name``; yields the seconds spent waiting for it.

    Polls instead of blocking so that a time limit (a signal) can interrupt the wait."""
    if engine.dialect.name == "postgresql":
        cm = _pg_lock(engine, name, wait_s, poll_s)
    elif engine.dialect.name == "sqlite":
        cm = _file_lock(_lock_dir(engine), name, wait_s, poll_s)
    else:
        raise NotImplementedError(f"no entity lock for {engine.dialect.name}")
    with cm as waited:
        yield waited


def _wait(try_once, name: str, wait_s: float, poll_s: float) -> float:  # noqa: ANN001
    t0 = time.monotonic()
    while not try_once():
        waited = time.monotonic() - t0
        if waited >= wait_s:
            raise LockTimeout(f"{name} is still being worked on by another run after {waited:.0f} s")
        time.sleep(poll_s)
    return time.monotonic() - t0


@contextlib.contextmanager
def _pg_lock(engine: Engine, name: str, wait_s: float, poll_s: float) -> Iterator[float]:
    key = lock_key(name)
    with engine.connect() as conn:
        def try_once() -> bool:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()  # no transaction stays open while the stage runs
            return got

        waited = _wait(try_once, name, wait_s, poll_s)
        try:
            yield waited
        finally:
            with contextlib.suppress(Exception):  # a lost connection has released it already
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def _lock_dir(engine: Engine) -> Path:
    db = engine.url.database
    base = Path(db).resolve().parent if db and db != ":memory:" else Path("/tmp")  # noqa: S108
    return base / ".locks"


@contextlib.contextmanager
def _file_lock(lock_dir: Path, name: str, wait_s: float, poll_s: float) -> Iterator[float]:
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / (hashlib.sha256(name.encode()).hexdigest()[:32] + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        def try_once() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        waited = _wait(try_once, name, wait_s, poll_s)
        try:
            yield waited
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

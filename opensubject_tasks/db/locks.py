"""One run at a time per entity, held without holding a database connection.

Two copies of a stage on the same video or sample (a redelivered message racing the
original, an operator's re-run during a build) must not write at the same time. The
lock is held for the whole stage and given up by itself when its holder dies, so a
crashed run never blocks the next one for long:

* PostgreSQL: a **lease row** in ``entity_leases`` (name, holder, expiry), taken by one
  atomic upsert inside the caller's transaction, renewed by a thread of the holding
  process every ``ttl/3`` while the stage runs, deleted in the transaction that records
  the stage's end. A holder that dies stops renewing: its lease is taken over once
  expired, or at once by a process on the same host that sees the holder's pid gone (a
  killed pool process). No connection is held between statements, so it works behind
  PgBouncer's transaction pooling and costs no connection per running stage;
* SQLite (embedded): ``flock`` on a small file next to the database, released by the
  kernel when its holder dies.

The second copy waits for the first and then runs: stages skip work that is already
done, so it finds the first copy's results and returns the same follow-up work.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import Engine, TextClause, text
from sqlalchemy.orm import Session

from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.errors import TransientError

log = logging.getLogger(__name__)
HOST = socket.gethostname()


class LockTimeout(TransientError):
    """Another run held the entity for longer than the wait allowed: retried later."""


class EntityLock:
    """A lock on one name: ``try_take`` inside the caller's transaction, ``keep`` while
    the work runs, ``release`` (inside the caller's closing transaction where there is one)."""

    name: str
    lost = False   # the lease was taken over while held (its holder stalled past its expiry)

    def try_take(self, s: Session) -> bool:
        raise NotImplementedError

    def keep(self) -> None:
        """Hold it while the work runs (a lease: renewed in the background)."""

    def release(self, s: Session | None = None) -> None:
        raise NotImplementedError


def new_lock(engine: Engine, name: str, ttl_s: float = 60.0) -> EntityLock:
    if engine.dialect.name == "postgresql":
        return Lease(engine, name, ttl_s)
    if engine.dialect.name == "sqlite":
        return FileLock(_lock_dir(engine), name)
    raise NotImplementedError(f"no entity lock for {engine.dialect.name}")


def wait_for(take: Callable[[], bool], name: str, wait_s: float, poll_s: float = 0.25,
             max_poll_s: float = 2.0) -> float:
    """Call ``take`` until it returns True; the seconds waited. Polls (growing to
    ``max_poll_s``) instead of blocking, so that a time limit (a signal) can interrupt it."""
    t0 = time.monotonic()
    while not take():
        waited = time.monotonic() - t0
        if waited >= wait_s:
            raise LockTimeout(f"{name} is still being worked on by another run after {waited:.0f} s")
        time.sleep(min(poll_s, max(0.0, wait_s - waited)))
        poll_s = min(max_poll_s, poll_s * 1.5)
    return time.monotonic() - t0


@contextlib.contextmanager
def entity_lock(engine: Engine, name: str, wait_s: float, poll_s: float = 0.25,
                ttl_s: float = 60.0) -> Iterator[float]:
    """Hold the lock called ``name`` (taken and released in transactions of its own);
    yields the seconds spent waiting for it."""
    from opensubject_tasks.db.engine import make_session_factory, session_scope

    lock = new_lock(engine, name, ttl_s)
    sessions = make_session_factory(engine)

    def take() -> bool:
        with session_scope(sessions) as s:
            return lock.try_take(s)

    try:
        waited = wait_for(take, name, wait_s, poll_s)
    except BaseException:
        lock.release(None)
        raise
    lock.keep()
    try:
        yield waited
    finally:
        try:
            with session_scope(sessions) as s:
                lock.release(s)
        except Exception:  # noqa: BLE001 - the database is gone: the lease expires by itself
            lock.release(None)
            log.warning("could not release %s; it expires by itself", name, exc_info=True)


# --- PostgreSQL: a lease row --------------------------------------------------------------------
_TAKE = text(
    "INSERT INTO entity_leases (name, holder, taken_at, expires_at)"
    " VALUES (:name, :holder, now(), now() + make_interval(secs => :ttl))"
    " ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, taken_at = EXCLUDED.taken_at,"
    " expires_at = EXCLUDED.expires_at"
    " WHERE entity_leases.expires_at < now() OR entity_leases.holder = :dead"
    " RETURNING holder")
_HOLDER = text("SELECT holder FROM entity_leases WHERE name = :name")
_RENEW = text("UPDATE entity_leases SET expires_at = now() + make_interval(secs => :ttl)"
              " WHERE name = :name AND holder = :holder")
_RELEASE = text("DELETE FROM entity_leases WHERE name = :name AND holder = :holder")


def _lease_args(f) -> dict:  # noqa: ANN001 - hot_queries.Facts
    return {"name": f"video:{f.video}", "holder": "host:1:token", "ttl": 60.0, "dead": ""}


# Each runs once per stage run (take, look at the holder, release) or per renewal.
@hot_query("stage run (entity lease)", lambda f: {}, binds=_lease_args)
def take_lease() -> TextClause:
    return _TAKE


@hot_query("stage run (entity lease)", lambda f: {}, binds=_lease_args)
def lease_holder() -> TextClause:
    return _HOLDER


@hot_query("lease renewal", lambda f: {}, binds=_lease_args)
def renew_lease() -> TextClause:
    return _RENEW


@hot_query("stage run (entity lease)", lambda f: {}, binds=_lease_args)
def release_lease() -> TextClause:
    return _RELEASE


def process_gone(holder: str) -> bool:
    """Whether a holder (``host:pid:token``) was a process of this host that no longer runs.
    A holder on another host, or a pid that runs (perhaps reused), is not known gone."""
    parts = holder.split(":")
    if len(parts) < 3 or ":".join(parts[:-2]) != HOST or not parts[-2].isdigit():
        return False
    pid = int(parts[-2])
    if pid == os.getpid():
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"   # killed, not yet reaped by its parent


class Lease(EntityLock):
    def __init__(self, engine: Engine, name: str, ttl_s: float) -> None:
        self.engine, self.name, self.ttl_s = engine, name, float(ttl_s)
        self.holder = f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def try_take(self, s: Session) -> bool:
        args = {"name": self.name, "holder": self.holder, "ttl": self.ttl_s, "dead": ""}
        if s.execute(_TAKE, args).first() is not None:
            return True
        # Held by someone: taken over at once if that was a process of this host now gone.
        current = s.execute(_HOLDER, {"name": self.name}).scalar()
        if current is None or process_gone(current):
            return s.execute(_TAKE, {**args, "dead": current or ""}).first() is not None
        return False

    def keep(self) -> None:
        _renewer().hold(self)

    def release(self, s: Session | None = None) -> None:
        if (renewer := _renewers.get(os.getpid())) is not None:
            renewer.drop(self)
        if s is not None:
            s.execute(_RELEASE, {"name": self.name, "holder": self.holder})

    def renew(self, conn) -> None:  # noqa: ANN001 - a Connection in a transaction
        if conn.execute(_RENEW, {"name": self.name, "holder": self.holder, "ttl": self.ttl_s}).rowcount == 0:
            self.lost = True
            log.warning("the lease on %s was taken over by another run (this one stalled past its expiry)",
                        self.name)


class _Renewer(threading.Thread):
    """Renews the leases this process holds, in one short transaction every third of the
    shortest lease's time to live (a connection is used only for that moment)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="lease-renewer")
        self.held: dict[int, Lease] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()

    def hold(self, lease: Lease) -> None:
        with self.lock:
            self.held[id(lease)] = lease
        self.wake.set()

    def drop(self, lease: Lease) -> None:
        with self.lock:
            self.held.pop(id(lease), None)

    def run(self) -> None:
        while True:
            with self.lock:
                leases = list(self.held.values())
            ttl = min((lease.ttl_s for lease in leases), default=60.0)
            self.wake.clear()
            if self.wake.wait(ttl / 3):
                continue                      # a new lease: its interval may be shorter
            with self.lock:
                leases = [lease for lease in self.held.values() if not lease.lost]
            for engine in {lease.engine for lease in leases}:
                try:
                    with engine.begin() as conn:
                        for lease in leases:
                            if lease.engine is engine:
                                lease.renew(conn)
                except Exception:  # noqa: BLE001 - tried again next interval; expiry covers the rest
                    log.warning("could not renew entity leases", exc_info=True)


_renewers: dict[int, _Renewer] = {}


def _renewer() -> _Renewer:
    """This process's renewer (a forked child starts its own)."""
    pid = os.getpid()
    if pid not in _renewers:
        _renewers.clear()
        _renewers[pid] = _Renewer()
        _renewers[pid].start()
    return _renewers[pid]


# --- SQLite: flock next to the database ------------------------------------------------------------
def _lock_dir(engine: Engine) -> Path:
    db = engine.url.database
    base = Path(db).resolve().parent if db and db != ":memory:" else Path("/tmp")  # noqa: S108
    return base / ".locks"


class FileLock(EntityLock):
    def __init__(self, lock_dir: Path, name: str) -> None:
        self.name, self.lock_dir = name, lock_dir
        self.fd: int | None = None

    def try_take(self, s: Session | None = None) -> bool:
        if self.fd is None:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
            path = self.lock_dir / (hashlib.sha256(self.name.encode()).hexdigest()[:32] + ".lock")
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self, s: Session | None = None) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

"""Entity locks (db/locks.py): one holder at a time, across connections and processes, behind
PgBouncer's transaction pooling too; a holder that dies gives its lock up (at once when it
was a process of this host, else when its lease expires); a held lease is renewed."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from opensubject_tasks.db.engine import make_engine, make_session_factory, session_scope, upgrade
from opensubject_tasks.db.locks import LockTimeout, entity_lock, new_lock, process_gone


def _serialised(engines: list, name: str, hold_s: float = 0.4, ttl_s: float = 60.0) -> list[tuple[float, float, float]]:
    """Each engine's thread takes the lock at the same moment and holds it for ``hold_s``:
    (start, end, waited) of each hold."""
    spans: list[tuple[float, float, float]] = []
    barrier = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def work(engine) -> None:  # noqa: ANN001
        try:
            barrier.wait()
            with entity_lock(engine, name, wait_s=30, poll_s=0.05, ttl_s=ttl_s) as waited:
                t0 = time.monotonic()
                time.sleep(hold_s)
                spans.append((t0, time.monotonic(), waited))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return sorted(spans)


def _assert_one_at_a_time(spans: list[tuple[float, float, float]], hold_s: float) -> None:
    assert len(spans) >= 2
    for (_, end, _), (start, _, waited) in zip(spans, spans[1:]):
        assert start >= end, spans          # never two holders at once
        assert waited >= hold_s * 0.5, spans  # the later one waited for the earlier


def test_a_lease_serialises_holders_on_separate_connections(pg_db):
    engines = [make_engine(pg_db) for _ in range(3)]
    try:
        spans = _serialised(engines, "video:race")
        _assert_one_at_a_time(spans, 0.4)
        with engines[0].connect() as c:  # released: no lease row left behind
            assert c.execute(text("SELECT count(*) FROM entity_leases")).scalar() == 0
    finally:
        for e in engines:
            e.dispose()


def test_the_file_lock_serialises_holders_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    engines = [make_engine(url) for _ in range(2)]
    upgrade(engines[0])
    spans = _serialised(engines, "video:race")
    _assert_one_at_a_time(spans, 0.4)


def _take(engine, name: str, ttl_s: float = 60.0):  # noqa: ANN001, ANN202
    lock = new_lock(engine, name, ttl_s)
    with session_scope(make_session_factory(engine)) as s:
        return lock, lock.try_take(s)


_HOLDER_SCRIPT = textwrap.dedent("""
    import sys, time
    from opensubject_tasks.db.engine import make_engine, make_session_factory, session_scope
    from opensubject_tasks.db.locks import new_lock
    engine = make_engine(sys.argv[1])
    lock = new_lock(engine, "video:held", float(sys.argv[2]))
    with session_scope(make_session_factory(engine)) as s:
        assert lock.try_take(s)
    lock.keep()
    print(lock.holder, flush=True)
    time.sleep(600)
""")


def _holder_process(url: str, ttl_s: float) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER_SCRIPT, url, str(ttl_s)], stdout=subprocess.PIPE,
                            text=True, env=env)
    holder = proc.stdout.readline().strip()
    assert holder, "the holder process did not take the lease"
    return proc, holder


def test_a_killed_holder_on_this_host_is_taken_over_at_once(pg_db):
    """A pool process killed while it holds a video (SIGKILL, as the OOM killer does):
    the next run on this host sees the holder's pid gone and takes the lease without
    waiting for it to expire."""
    engine = make_engine(pg_db)
    proc, holder = _holder_process(pg_db, ttl_s=3600)
    try:
        _, got = _take(engine, "video:held")
        assert not got                               # alive: held
        assert not process_gone(holder)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert process_gone(holder)
        t0 = time.monotonic()
        lock, got = _take(engine, "video:held")
        assert got and time.monotonic() - t0 < 5     # an hour before its expiry
        with engine.connect() as c:
            assert c.execute(text("SELECT holder FROM entity_leases WHERE name = 'video:held'")).scalar() \
                == lock.holder
    finally:
        proc.kill()
        engine.dispose()


def test_a_lease_of_a_holder_elsewhere_is_taken_over_once_expired(pg_db):
    """A holder on another host cannot be seen dying: its lease is taken over once it
    stops being renewed and expires, not before."""
    engine = make_engine(pg_db)
    try:
        with engine.begin() as c:
            c.execute(text("INSERT INTO entity_leases (name, holder, expires_at) "
                           "VALUES ('video:far', 'another-host:4242:abcdef', now() + interval '2 seconds')"))
        _, got = _take(engine, "video:far")
        assert not got
        with pytest.raises(LockTimeout):
            with entity_lock(engine, "video:far", wait_s=0.5, poll_s=0.1):
                pass
        with entity_lock(engine, "video:far", wait_s=10, poll_s=0.2) as waited:
            assert 0.5 <= waited <= 5
    finally:
        engine.dispose()


def test_a_held_lease_is_renewed_past_its_time_to_live(pg_db):
    """A stage that runs longer than the lease's time to live keeps it: the process renews
    it in the background; once released, the next run takes it at once."""
    engine = make_engine(pg_db)
    other = make_engine(pg_db)
    try:
        with entity_lock(engine, "build:long", wait_s=5, ttl_s=1.5):
            time.sleep(3.5)                           # more than twice the time to live
            _, got = _take(other, "build:long", ttl_s=1.5)
            assert not got
        _, got = _take(other, "build:long")
        assert got
    finally:
        engine.dispose()
        other.dispose()


def test_a_run_whose_lease_was_taken_over_learns_it(pg_db):
    """A holder that stalled past its expiry (its lease taken over meanwhile) is told at
    its next renewal, so that it records nothing as the entity's owner."""
    engine = make_engine(pg_db)
    try:
        lock, got = _take(engine, "video:stalled", ttl_s=1)
        assert got
        time.sleep(1.2)
        _, taken = _take(engine, "video:stalled")    # expired: another run takes it over
        assert taken
        with engine.begin() as c:
            lock.renew(c)
        assert lock.lost
    finally:
        engine.dispose()


# --- behind PgBouncer in transaction pooling mode ----------------------------------------------------
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture()
def pgbouncer_url(pg_db):  # noqa: ANN001
    """PgBouncer in transaction pooling mode in front of the test database, with fewer
    server connections than clients: a client gets a server connection per transaction."""
    from sqlalchemy.engine import make_url

    from local_services import free_port

    if not Path(PGBOUNCER).exists():
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    url = make_url(pg_db)
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="pgbouncer-"))   # pytest's folders are closed to other users
    (root / "users.txt").write_text(f'"{url.username}" ""\n')
    (root / "pgbouncer.ini").write_text(textwrap.dedent(f"""
        [databases]
        {url.database} = host={url.host} port={url.port or 5432} dbname={url.database}
        [pgbouncer]
        listen_addr = 127.0.0.1
        listen_port = {port}
        unix_socket_dir =
        auth_type = trust
        auth_file = {root / 'users.txt'}
        pool_mode = transaction
        default_pool_size = 2
        max_client_conn = 50
        logfile = {root / 'pgbouncer.log'}
        pidfile = {root / 'pgbouncer.pid'}
    """))
    cmd = [PGBOUNCER, str(root / "pgbouncer.ini")]
    if os.geteuid() == 0:   # PgBouncer refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        for f in root.iterdir():
            shutil.chown(f, "postgres", "postgres")
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"pgbouncer did not start: {proc.communicate()[0]}")
            time.sleep(0.1)
    yield url.set(port=port).render_as_string(hide_password=False)
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(root, ignore_errors=True)


def test_a_lease_serialises_holders_behind_pgbouncer_transaction_pooling(pgbouncer_url, pg_db):
    """Four clients through a pool of two server connections: no client keeps a server
    connection between its transactions, and the lock still admits one holder at a time
    (a session-level advisory lock would be taken on one server connection and released
    on another, or held by whichever client got that connection next)."""
    engines = [make_engine(pgbouncer_url, pool_size=1, max_overflow=0) for _ in range(4)]
    try:
        spans = _serialised(engines, "video:bounced", hold_s=0.3)
        _assert_one_at_a_time(spans, 0.3)
        direct = make_engine(pg_db)
        with direct.connect() as c:
            assert c.execute(text("SELECT count(*) FROM entity_leases")).scalar() == 0
        direct.dispose()
    finally:
        for e in engines:
            e.dispose()

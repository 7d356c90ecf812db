"""Cost per video against the size of the corpus: a PostgreSQL holding 10^6 videos of earlier
builds against an empty one, on this machine in the same run.

    .venv/bin/python perf/bench_corpus.py [--videos 1000000] [--samples 5000000]
        [--attempts 4000000] [--build-videos 4] [--rounds 4] [--claim 1000000]
        [--queued 1000000] [--lost 100] [--measure status] [--json out.json]

1. Two databases on the local PostgreSQL server: ``empty`` and ``full``; ``full`` gets a
   synthetic history by SQL ``generate_series`` (tests/corpus_history.py: ``--videos``
   finished videos over 5 builds, one clip and subject each, ``--samples`` pairs and
   samples, ``--attempts`` stage attempts).
2. A small real build in each: ``--build-videos`` tiny generated videos
   (``testmedia.tiny_video``, 160x90, 38 frames) through ``runner.run_build`` (ingest,
   claim, curate, mine, samples: the stage services the workers run; classical backends,
   one process, a local store), ``--rounds`` rounds in the order empty, full, full, empty,
   ..., each round on new videos. Database time is summed over every statement by
   SQLAlchemy cursor events (``before/after_cursor_execute``); reported per video.
3. Claim: ``--claim`` registered videos inserted into ``full`` are claimed by one build
   (``ingest.claim_count``): wall, CPU and peak RSS of this process.
4. Reconcile: the claimed videos are marked handed out to ``curate`` two hours ago; a
   throwaway Redis server holds a Celery message for each but ``--lost`` of them (real
   messages: one sent by Celery, copied with other arguments); one pass of
   ``services.reconcile.reconcile`` with the broker's view: wall, CPU, peak RSS, units
   sent (must be exactly the lost ones).
5. ``EXPLAIN ANALYZE`` of every hot-path query (db/hot_queries.py) on ``full``, and of the
   predicate shapes the code had before sql/005 and its query changes (the indexes dropped
   in a transaction that is rolled back).

Measurements to add (a dashboard or status load, export steps) go into ``MEASURES``: a
name and a function of (Context, build id) run on both databases after each small build,
timed and with its database time; ``--measure NAME`` picks them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from corpus_history import History, describe, fill  # noqa: E402
from local_services import RedisServer, pg_database  # noqa: E402
from sqlalchemy import event, text  # noqa: E402

from opensubject_tasks.config import load_settings  # noqa: E402
from opensubject_tasks.context import Context  # noqa: E402

SMALL = {"curate": {"min_short_side": 64}, "mine": {"max_pairs_per_subject": 1}, "verify": {"max_attempts": 2}}


# --- measuring -------------------------------------------------------------------------------
class DbClock:
    """Seconds spent in the database driver and statements run, over an engine's life."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        self.seconds, self.statements = 0.0, 0

        @event.listens_for(engine, "before_cursor_execute")
        def _before(conn, cursor, statement, params, context, executemany):  # noqa: ANN001, ANN202
            conn.info.setdefault("bench_t0", []).append(time.perf_counter())

        @event.listens_for(engine, "after_cursor_execute")
        def _after(conn, cursor, statement, params, context, executemany):  # noqa: ANN001, ANN202
            self.seconds += time.perf_counter() - conn.info["bench_t0"].pop()
            self.statements += 1


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def measured(out: dict) -> Iterator[None]:
    """Wall and CPU seconds of this process, and its peak RSS above the start (sampled)."""
    base, peak = rss_mb(), [rss_mb()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_mb())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        out["wall_s"] = round(time.perf_counter() - w0, 2)
        out["cpu_s"] = round(time.process_time() - c0, 2)
        stop.set()
        t.join()
        out["peak_rss_above_start_mb"] = round(max(peak[0], rss_mb()) - base, 1)


def context(url: str, store: Path) -> Context:
    return Context.from_settings(load_settings(database_url=url, store={"kind": "local", "local_root": str(store)},
                                               **SMALL))


# --- hooks: more things to time on both databases ----------------------------------------------
def _status(ctx: Context, build_id: str) -> None:
    from opensubject_tasks.runner import funnel

    funnel(ctx, build_id)


# name -> fn(ctx, build_id); run after each small build, timed, with its database time.
MEASURES: dict[str, Callable[[Context, str], None]] = {"status": _status}


# --- 2. a small real build per database ---------------------------------------------------------------
BIG = ("videos", "clips", "subjects", "pairs", "samples", "stage_attempts")


def table_reads(url: str) -> dict[str, int]:
    """PostgreSQL's counters of the big tables: sequential scans and the rows read by
    them and by index scans (pg_stat_user_tables; a backend reports them when it ends)."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.connect() as c:
        c.execute(text("SELECT pg_stat_clear_snapshot()"))
        rows = c.execute(text("SELECT relname, seq_scan, seq_tup_read, coalesce(idx_tup_fetch, 0) "
                              "FROM pg_stat_user_tables WHERE relname = ANY(:t)"), {"t": list(BIG)}).all()
    engine.dispose()
    return {"seq_scans": sum(r[1] for r in rows), "rows_read": sum(r[2] + r[3] for r in rows),
            **{f"rows_read.{r[0]}": r[2] + r[3] for r in rows}}


def small_build(url: str, media: Path, store: Path, build_id: str, measures: list[str]) -> dict:
    from opensubject_tasks.runner import run_build

    before = table_reads(url)
    ctx = context(url, store)
    clock = DbClock(ctx.engine)
    videos = len(list(media.glob("*.mp4")))
    t0 = time.perf_counter()
    summary = run_build(ctx, [str(media)], build_id, until="verify", jobs=1)
    wall = time.perf_counter() - t0
    db_s, statements = clock.seconds, clock.statements
    ctx.engine.dispose()  # the build's backends end: their counters reach pg_stat_user_tables
    time.sleep(0.5)
    after = table_reads(url)
    ctx = context(url, store)
    clock = DbClock(ctx.engine)
    doc = {"videos": videos, "wall_s": round(wall, 2), "db_s": round(db_s, 3),
           "db_ms_per_video": round(1000 * db_s / videos, 1),
           "statements_per_video": round(statements / videos, 1),
           "big_table_seq_scans": after["seq_scans"] - before["seq_scans"],
           "big_table_rows_read_per_video": round((after["rows_read"] - before["rows_read"]) / videos, 1),
           "rows_read_per_video_by_table": {k.split(".", 1)[1]: round((after[k] - before.get(k, 0)) / videos, 1)
                                            for k in after if k.startswith("rows_read.")},
           "units": {t.stage: t.entities for t in summary.timings}}
    for name in measures:
        s0, w0 = clock.seconds, time.perf_counter()
        MEASURES[name](ctx, build_id)
        doc[name] = {"wall_s": round(time.perf_counter() - w0, 3), "db_s": round(clock.seconds - s0, 3)}
    ctx.engine.dispose()
    return doc


# --- 3. claim ----------------------------------------------------------------------------------------
def claim(url: str, store: Path, n: int) -> dict:
    from opensubject_tasks.services.ingest import claim_count

    t0 = time.perf_counter()
    with context(url, store).engine.begin() as c:
        c.execute(text("INSERT INTO videos (id, content_hash, source_uri, name, created_at, updated_at) "
                       "SELECT md5('incoming:' || i), 'incoming:' || i, 'store://raw/incoming/' || i || '.mp4', "
                       "i || '.mp4', now() - interval '3 hours' + i * interval '1 millisecond', now() "
                       "FROM generate_series(0, :n - 1) AS i"), {"n": n})
        c.execute(text("ANALYZE videos"))
    doc: dict = {"registered": n, "insert_s": round(time.perf_counter() - t0, 1)}
    ctx = context(url, store)
    with measured(doc):
        doc["claimed"] = claim_count(ctx, "bench-claim", None)
    ctx.engine.dispose()
    return doc


# --- 4. reconcile ----------------------------------------------------------------------------------
def reconcile_pass(url: str, store: Path, lost: int) -> dict:
    """The claimed videos, handed out to curate two hours ago; every message but ``lost`` on
    a throwaway Redis."""
    import base64

    import redis

    from opensubject_tasks.catalogue import QUEUES
    from opensubject_tasks.celery_app import TASK_PREFIX, app, configure
    from opensubject_tasks.services.reconcile import reconcile, waiting_in_redis

    ctx = context(url, store)
    with ctx.engine.begin() as c:
        c.execute(text("UPDATE builds SET state = 'running' WHERE id = 'bench-claim'"))
        c.execute(text("UPDATE videos SET state = 'running', queued_stage = 'curate', "
                       "queued_task_id = md5(id || '/task'), queued_at = now() - interval '2 hours' "
                       "WHERE build_id = 'bench-claim'"))
        c.execute(text("ANALYZE videos"))
        ids = list(c.scalars(text("SELECT id FROM videos WHERE build_id = 'bench-claim' ORDER BY id")))
    server = RedisServer().start()
    try:
        broker = f"{server.url}/0"
        os.environ["OPENSUBJECT_BROKER_URL"] = broker
        configure()
        app.send_task(f"{TASK_PREFIX}curate", args=[ids[0]], queue="cpu")
        client = redis.Redis.from_url(broker)
        template = json.loads(client.lpop("cpu"))
        t0 = time.perf_counter()
        kept = ids[lost:]
        pipe = client.pipeline(transaction=False)
        for i, vid in enumerate(kept):
            msg = dict(template, body=base64.b64encode(json.dumps([[vid], {}, {}]).encode()).decode())
            msg["headers"] = dict(template["headers"], id=f"bench-{i}", argsrepr=repr((vid,)))
            pipe.rpush("cpu", json.dumps(msg))
            if i % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()
        doc: dict = {"queued_messages": client.llen("cpu"), "candidates": len(ids), "lost": lost,
                     "redis_fill_s": round(time.perf_counter() - t0, 1),
                     "redis_used_mb": round(client.info("memory")["used_memory"] / 2**20)}
        del ids, kept, pipe
        broker_read: dict = {}

        def waiting():  # noqa: ANN202
            with measured(broker_read):
                return waiting_in_redis(broker, QUEUES, TASK_PREFIX)

        sent: list = []
        with measured(doc):
            units = reconcile(ctx, lambda st, e, **kw: sent.append((st, e)), older_than_s=1800, waiting=waiting)
        doc["sent"] = len(units)
        doc["broker_read"] = broker_read
        assert len(units) == lost, f"reconcile sent {len(units)}, expected the {lost} lost"
    finally:
        server.destroy()
        ctx.engine.dispose()
    return doc


# --- 5. plans --------------------------------------------------------------------------------------------
# The code's query shapes before sql/005 and its query changes.
BEFORE = {
    "close_lost_attempts (no entity_type)":
        "UPDATE stage_attempts SET status = 'lost' WHERE stage = 'verify' AND entity_id = :sample "
        "AND status = 'running'",
    "lost in a row (no entity_type)":
        "SELECT status FROM stage_attempts WHERE stage = 'curate' AND entity_id = :video ORDER BY id DESC LIMIT 100",
    "_retire_old_versions (source_uri)":
        "SELECT id, source_uri FROM videos WHERE source_uri IN (:uri) AND id NOT IN (:video) "
        "AND state = 'registered' AND stage_done IS NULL AND queued_at IS NULL",
    "reconcile candidates (queued_at)":
        "SELECT v.id FROM videos v JOIN builds b ON b.id = v.build_id WHERE b.state = 'running' "
        "AND v.state NOT IN ('done', 'rejected', 'failed') AND v.queued_stage IN ('curate', 'mine', 'samples') "
        "AND v.queued_at < now() - interval '30 minutes' ORDER BY v.id FOR UPDATE OF v SKIP LOCKED",
    "running attempts of a chunk (no entity_type)":
        "SELECT entity_id FROM stage_attempts WHERE status = 'running' AND entity_id IN (:video, :sample)",
    "a build's attempts (build_id)":
        "SELECT stage, status, duration_s FROM stage_attempts WHERE build_id = :build AND status <> 'running'",
}
NEW_INDEXES = ("stage_attempts_build_idx", "stage_attempts_running_idx", "videos_in_flight_idx",
               "videos_unclaimed_idx", "videos_source_uri_idx")


def _ms(plan_lines: list[str]) -> float | None:
    for line in plan_lines:
        if line.strip().startswith("Execution Time:"):
            return float(line.split(":")[1].split()[0])
    return None


def plans(url: str) -> dict:
    from sqlalchemy import create_engine

    from opensubject_tasks.db.hot_queries import all_hot_queries, facts, plan_text

    engine = create_engine(url)
    out: dict = {"after": {}, "before": {}, "plans": {}}
    with engine.connect() as conn:
        f = facts(conn)
        conn.rollback()
        binds = {"sample": f.sample, "video": f.video, "uri": f.source_uris[0], "build": f.build}
        for name, q in all_hot_queries().items():
            tx = conn.begin()
            lines = plan_text(conn, q.statement(f), q.binds(f) if q.binds else None, analyze=True).splitlines()
            tx.rollback()
            out["after"][name] = _ms(lines)
            out["plans"][name] = lines
        tx = conn.begin()
        for ix in NEW_INDEXES:
            conn.execute(text(f"DROP INDEX {ix}"))
        for name, sql in BEFORE.items():
            lines = [r[0] for r in conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + sql), binds)]
            out["before"][name] = _ms(lines)
            out["plans"]["before: " + name] = lines
        tx.rollback()
    engine.dispose()
    return out


# --- main --------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=1_000_000)
    ap.add_argument("--samples", type=int, default=5_000_000)
    ap.add_argument("--attempts", type=int, default=4_000_000)
    ap.add_argument("--build-videos", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--claim", type=int, default=1_000_000)
    ap.add_argument("--lost", type=int, default=100)
    ap.add_argument("--measure", action="append", default=[], choices=sorted(MEASURES))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-plans", action="store_true", help="no EXPLAIN ANALYZE section")
    args = ap.parse_args()
    from opensubject_tasks.testmedia.samples import tiny_video

    history = History(videos=args.videos, samples=args.samples, attempts=args.attempts)
    doc: dict = {"history": history.counts(), "machine": {"cpus": os.cpu_count(),
                                                         "load_avg_start": os.getloadavg()}}
    print(f"history: {describe(history)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp, \
            pg_database("bench_empty", schema=True) as empty, pg_database("bench_full", schema=True) as full:
        t0 = time.perf_counter()
        doc["fill_s"] = {k: round(v, 1) for k, v in fill(full, history, log=print).items()}
        doc["fill_s"]["total"] = round(time.perf_counter() - t0, 1)
        print(f"filled in {doc['fill_s']['total']} s", flush=True)

        # the same tiny videos for both databases in a round; new ones each round
        runs: list[dict] = []
        for r in range(args.rounds):
            media = Path(tmp) / f"media{r}"
            media.mkdir()
            for i in range(args.build_videos):
                tiny_video(media / f"r{r}v{i}.mp4", 1000 * r + i)
            order = (("empty", empty), ("full", full)) if r % 2 == 0 else (("full", full), ("empty", empty))
            for label, url in order:
                one = small_build(url, media, Path(tmp) / f"store-{label}", f"bench-{r}", args.measure)
                one.update(db=label, round=r)
                runs.append(one)
                print(f"round {r} {label}: {one}", flush=True)
        doc["small_builds"] = runs
        per = {label: sum(x["db_s"] for x in runs if x["db"] == label)
               / sum(x["videos"] for x in runs if x["db"] == label) for label in ("empty", "full")}
        doc["db_ms_per_video"] = {k: round(1000 * v, 1) for k, v in per.items()}
        doc["db_ms_per_video_median_build"] = {
            label: statistics.median(x["db_ms_per_video"] for x in runs if x["db"] == label) for label in per}
        doc["full_over_empty"] = round(per["full"] / per["empty"], 3)
        doc["rows_read_per_video"] = {label: round(statistics.mean(
            x["big_table_rows_read_per_video"] for x in runs if x["db"] == label), 1) for label in per}
        doc["seq_scans_of_big_tables"] = {label: sum(x["big_table_seq_scans"] for x in runs if x["db"] == label)
                                         for label in per}
        print(f"database time per video: {doc['db_ms_per_video']} (full/empty {doc['full_over_empty']}); "
              f"rows read per video: {doc['rows_read_per_video']}; "
              f"sequential scans of big tables: {doc['seq_scans_of_big_tables']}", flush=True)

        if not args.skip_plans:
            doc["plans"] = plans(full)
            print(json.dumps({k: doc["plans"][k] for k in ("after", "before")}, indent=1), flush=True)

        if args.claim:
            doc["claim"] = claim(full, Path(tmp) / "store-full", args.claim)
            print(f"claim: {doc['claim']}", flush=True)
            doc["reconcile"] = reconcile_pass(full, Path(tmp) / "store-full", args.lost)
            print(f"reconcile: {doc['reconcile']}", flush=True)
    doc["machine"]["load_avg_end"] = os.getloadavg()
    doc["machine"]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    ok = abs(doc["full_over_empty"] - 1) <= 0.25
    print(f"database time per video within 25 %: {ok}")


if __name__ == "__main__":
    main()

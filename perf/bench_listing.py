"""The scheduled listing's cost with its memory (services/listing.py) on a large prefix.

    .venv/bin/python perf/bench_listing.py --objects 10000 100000 --db postgresql://...

For each size: N small objects with video names under one prefix of the S3 test server
(moto), then ``list_and_register`` runs: first (everything new), nothing new, 100 new
objects spread over the key space; then a pass killed half-way (the listing raises) and
the run after it. Each run reports its wall time, S3 list calls, database round trips and
counts. ``--compare`` adds the listing without memory (``register_source``) on nothing new.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _services import s3_server  # noqa: E402

from sqlalchemy import event, text  # noqa: E402

from opensubject_tasks.config import StoreSettings, load_settings  # noqa: E402
from opensubject_tasks.context import Context  # noqa: E402
from opensubject_tasks.db.engine import upgrade  # noqa: E402
from opensubject_tasks.services import listing  # noqa: E402
from opensubject_tasks.services.ingest import register_source  # noqa: E402
from opensubject_tasks.storage.minio_store import MinioStore  # noqa: E402

PREFIX = "big-prefix/"


def key(i: int) -> str:
    return f"{PREFIX}{i // 1000:04d}/v{i:07d}.mp4"


class Meter:
    def __init__(self, ctx: Context, store: MinioStore) -> None:
        self.trips = self.pages = 0
        event.listen(ctx.engine, "before_cursor_execute", self._trip)
        inner = store._list_page

        def counted(*a, **k):  # noqa: ANN002, ANN003, ANN202
            self.pages += 1
            return inner(*a, **k)
        store._list_page = counted

    def _trip(self, *a, **k) -> None:  # noqa: ANN002, ANN003
        self.trips += 1

    def run(self, label: str, fn) -> object:  # noqa: ANN001
        self.trips = self.pages = 0
        t0 = time.perf_counter()
        err = ""
        try:
            res = fn()
        except KeyboardInterrupt as exc:   # the simulated kill
            res, err = None, str(exc)
        secs = time.perf_counter() - t0
        d = res.to_dict() if hasattr(res, "to_dict") else {}
        counts = (f"new {d.get('new', 0):>7}  known {d.get('known', 0):>7}  unchanged {d.get('unchanged', '-'):>7}  "
                  f"listed {d.get('listed', '-'):>7}" if d else f"({err})")
        print(f"  {label:<26} {secs:7.1f} s  list calls {self.pages:>5}  db round trips {self.trips:>5}  {counts}",
              flush=True)
        return res


def bench(endpoint: str, n: int, db_url: str, compare: bool) -> None:
    store = MinioStore.from_settings(StoreSettings(kind="minio", endpoint=endpoint, access_key="k", secret_key="s",
                                                   bucket=f"bench-{uuid.uuid4().hex[:8]}", region="us-east-1"))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: store.put_bytes(key(i), f"video {i}".encode(), "video/mp4"), range(n)))
    print(f"{n} objects (put in {time.perf_counter() - t0:.0f} s)", flush=True)
    ctx = Context.from_settings(load_settings(database_url=db_url))
    ctx.store = store
    upgrade(ctx.engine)
    with ctx.engine.begin() as c:   # an empty dataset database for each size
        c.execute(text("TRUNCATE videos, duplicates, listing_segments, listing_progress CASCADE"))
    m = Meter(ctx, store)
    budget = 10**9
    m.run("first run", lambda: listing.list_and_register(ctx, PREFIX, budget_s=budget))
    m.run("nothing new", lambda: listing.list_and_register(ctx, PREFIX, budget_s=budget))
    if compare:
        m.run("nothing new, no memory", lambda: register_source(ctx, f"store://{PREFIX}"))
    rnd = random.Random(7)
    for i in rnd.sample(range(n * 10), 100):   # keys between the existing ones
        store.put_bytes(f"{PREFIX}{i // 10000:04d}/v{i // 10:07d}-{i % 10}.mp4", f"new {i}".encode(), "video/mp4")
    m.run("100 new objects", lambda: listing.list_and_register(ctx, PREFIX, budget_s=budget))

    # a pass killed half-way, then the run after it: it lists from its checkpoint on
    listing.forget(ctx, PREFIX)
    inner = store.list

    def killed(prefix="", start_after=None):  # noqa: ANN001, ANN202
        for k, o in enumerate(inner(prefix, start_after=start_after)):
            if k == n // 2:
                raise KeyboardInterrupt(f"killed after {k} objects listed")
            yield o
    store.list = killed
    m.run("pass killed half-way", lambda: listing.list_and_register(ctx, PREFIX, budget_s=budget))
    store.list = inner
    m.run("the run after it", lambda: listing.list_and_register(ctx, PREFIX, budget_s=budget))
    ctx.engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--db", required=True, help="PostgreSQL URL of an empty dataset database")
    ap.add_argument("--compare", action="store_true", help="also list without memory (register_source)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(), s3_server() as endpoint:
        for n in args.objects:
            bench(endpoint, n, args.db, args.compare)


if __name__ == "__main__":
    main()

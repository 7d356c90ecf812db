"""Throughput of stage 0 (ingest) and of the object stores.

    .venv/bin/python perf/bench_ingest_store.py [--files 200] [--file-mb 5] [--db URL]
    .venv/bin/python perf/bench_ingest_store.py --prefix-objects 100000 --db URL

``--prefix-objects N``: the cost of listing a large prefix. N small objects with video
names are put under one prefix of the S3 server; ``register_source(store://prefix/)``
runs three times: first (everything new), again (nothing new) and after 100 more objects
arrive. Each run reports its time, the S3 list calls and the database round trips.

Ingest: registering a folder (SHA-256 of every file, streamed) the first time and
again (everything known). Stores: put/get of small objects (keyframe-sized) and of
one large file, for LocalStore and for MinioStore against a local S3 server process
(moto, not MinIO: its numbers show the client's overhead, not MinIO's speed).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _services import s3_server  # noqa: E402

from opensubject_tasks.config import StoreSettings, load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import upgrade
from opensubject_tasks.services.ingest import register_source
from opensubject_tasks.storage.local import LocalStore
from opensubject_tasks.storage.minio_store import MinioStore


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_ingest(work: Path, files: int, file_mb: float, db_url: str | None) -> None:
    media = work / "media"
    media.mkdir()
    size = int(file_mb * 1024 * 1024)
    for i in range(files):
        (media / f"v{i:05d}.mp4").write_bytes(os.urandom(size))
    url = db_url or f"sqlite:///{work / 'bench.db'}"
    ctx = Context.from_settings(load_settings(database_url=url, store={"kind": "local", "local_root": str(work / "s")}))
    upgrade(ctx.engine)
    total_mb = files * size / 2**20
    res, first = timed(lambda: register_source(ctx, str(media)))
    assert len(res.new_ids) == files, res.to_dict()
    res, again = timed(lambda: register_source(ctx, str(media)))
    assert not res.new_ids and len(res.known_ids) == files
    db = url.split(":", 1)[0]
    print(f"ingest  {db:<22} {files} files x {file_mb:g} MB: first {first:.2f} s "
          f"({files / first:.0f} files/s, {total_mb / first:.0f} MB/s); rerun {again:.2f} s")
    ctx.engine.dispose()


def bench_store(name: str, store, work: Path, small: int = 300, small_kb: int = 60, big_mb: int = 50) -> None:
    blob = os.urandom(small_kb * 1024)
    _, put_s = timed(lambda: [store.put_bytes(f"bench/small/{i:05d}.jpg", blob) for i in range(small)])
    _, get_s = timed(lambda: [store.get_bytes(f"bench/small/{i:05d}.jpg") for i in range(small)])
    _, list_s = timed(lambda: list(store.list("bench/small/")))
    big = work / f"big-{name}.bin"
    with open(big, "wb") as f:
        for _ in range(big_mb):
            f.write(os.urandom(2**20))
    _, bput = timed(lambda: store.put_file("bench/big.bin", big))
    _, bget = timed(lambda: store.get_file("bench/big.bin", work / f"back-{name}.bin"))
    print(f"store   {name:<22} {small} x {small_kb} KB: put {small / put_s:.0f}/s, get {small / get_s:.0f}/s, "
          f"list {list_s * 1000:.0f} ms; {big_mb} MB file: put {big_mb / bput:.0f} MB/s, get {big_mb / bget:.0f} MB/s")


def bench_prefix(store: MinioStore, n: int, db_url: str | None, work: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import event

    def put(i: int) -> None:
        store.put_bytes(f"big-prefix/{i // 1000:04d}/v{i:07d}.mp4", f"video {i}".encode(), "video/mp4")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))
    print(f"prefix  {n} objects put in {time.perf_counter() - t0:.0f} s")
    url = db_url or f"sqlite:///{work / 'prefix.db'}"
    ctx = Context.from_settings(load_settings(database_url=url))
    ctx.store = store
    upgrade(ctx.engine)
    trips = [0]
    event.listen(ctx.engine, "before_cursor_execute", lambda *a, **k: trips.__setitem__(0, trips[0] + 1))
    pages = [0]
    inner = store._list_page

    def counted(*a, **k):  # noqa: ANN002, ANN003, ANN202
        pages[0] += 1
        return inner(*a, **k)

    store._list_page = counted
    for label, extra in (("first run", 0), ("nothing new", 0), ("100 new objects", 100)):
        for i in range(n, n + extra):
            put(i)
        n += extra
        trips[0] = pages[0] = 0
        res, secs = timed(lambda: register_source(ctx, "store://big-prefix/"))
        print(f"prefix  {label:<16} {secs:7.1f} s  new {len(res.new_ids):>7}  known {len(res.known_ids):>7}  "
              f"list calls {pages[0]:>4}  database round trips {trips[0]:>5}  "
              f"({n / secs:.0f} objects/s)")
    ctx.engine.dispose()


def _moto_store(endpoint: str) -> MinioStore:
    return MinioStore.from_settings(StoreSettings(kind="minio", endpoint=endpoint, access_key="k", secret_key="s",
                                                  bucket="bench", region="us-east-1"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--file-mb", type=float, default=5)
    ap.add_argument("--db", default=None, help="database URL (default: a SQLite file)")
    ap.add_argument("--prefix-objects", type=int, default=0, help="measure listing a prefix this large only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        if args.prefix_objects:
            with s3_server() as endpoint:
                bench_prefix(_moto_store(endpoint), args.prefix_objects, args.db, work)
            return
        bench_ingest(work, args.files, args.file_mb, args.db)
        bench_store("LocalStore", LocalStore(work / "local"), work)
        with s3_server() as endpoint:
            bench_store("MinioStore (moto)", _moto_store(endpoint), work)


if __name__ == "__main__":
    main()

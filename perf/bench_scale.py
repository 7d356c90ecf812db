"""A build of thousands of videos through the real Airflow scheduler, against the embedded
runner with the same number of worker processes, on this machine.

    .venv/bin/python perf/bench_scale.py [--videos 2000] [--full-videos 200] [--concurrency 2]
                                               [--json out.json]

Starts every component as a real process: PostgreSQL databases for the dataset and for
Airflow, Redis, an S3 server (moto), ``airflow api-server``, ``scheduler`` (LocalExecutor),
``dag-processor`` and ``triggerer``, and one Celery worker with ``--concurrency``
processes on all queues. Then:

1. ``--videos`` generated tiny videos (160x90, 1.5 s) are uploaded and a build is
   triggered through the REST API, as the UI does, with curation only (``until: curate``);
2. a second build of ``--full-videos`` other videos runs the whole pipeline;
3. the embedded runner (``run_build``, ``jobs = --concurrency``) builds the same videos
   with the same settings into a database and bucket of its own.

Reported per build: wall time (trigger to the run's end), the run's task instances, the
videos by state and the funnel against the embedded build's, the peak number of PostgreSQL
connections (``pg_stat_activity`` of both databases, sampled every 0.5 s), the embedded
wall time and the share of the distributed wall time that is orchestration overhead
(1 - embedded / distributed), and the CPU seconds each component spent during each build.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _services import redis_db, s3_server  # noqa: E402
from airflow_stack import AirflowStack, celery_worker, pg_database  # noqa: E402

SETTINGS = {"OPENSUBJECT_CURATE__MIN_SHORT_SIDE": "64", "OPENSUBJECT_MINE__MAX_PAIRS_PER_SUBJECT": "1",
            "OPENSUBJECT_VERIFY__MAX_ATTEMPTS": "2"}
REDIS_DB = 12


class ConnectionSampler(threading.Thread):
    """Peak connections to the given databases (pg_stat_activity), every 0.5 s."""

    def __init__(self, admin_url: str, databases: list[str]) -> None:
        super().__init__(daemon=True)
        from sqlalchemy import create_engine

        self.engine = create_engine(admin_url, pool_size=1)
        self.databases = databases
        self.peak: dict[str, int] = dict.fromkeys(databases, 0)
        self.peak_total = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        from sqlalchemy import text

        while not self.stop_flag.is_set():
            with self.engine.connect() as c:
                rows = dict(c.execute(text("SELECT datname, count(*) FROM pg_stat_activity "
                                           "WHERE datname = ANY(:d) GROUP BY datname"),
                                      {"d": self.databases}).all())
            for d in self.databases:
                self.peak[d] = max(self.peak[d], int(rows.get(d, 0)))
            self.peak_total = max(self.peak_total, sum(int(v) for v in rows.values()))
            self.stop_flag.wait(0.5)

    def reset(self) -> None:
        self.peak = dict.fromkeys(self.databases, 0)
        self.peak_total = 0


_COMPONENTS = (  # (name, what its command line holds), first match wins
    ("airflow scheduler", "airflow scheduler"), ("airflow triggerer", "airflow triggerer"),
    ("airflow dag-processor", "airflow dag-processor"), ("airflow api-server", "airflow api-server"),
    ("airflow task processes", "airflow"), ("celery worker", "celery"), ("postgresql", "postgres"),
    ("redis", "redis-server"), ("s3 server", "moto"), ("s3 server", "_services"),
)


def cpu_by_component() -> dict[str, float]:
    """CPU seconds so far of every process on the machine, by component (a process's own
    and its waited-for children's: Airflow's short-lived task processes count with the
    process that started them)."""
    import psutil

    out: dict[str, float] = {"all processes (machine)": sum(psutil.cpu_times()[:3])}
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd, t = " ".join(p.info["cmdline"] or []), p.info["cpu_times"]
        if t is None:
            continue
        name = next((n for n, key in _COMPONENTS if key in cmd), "benchmark (this process)"
                    if p.pid == os.getpid() else None)
        if name is not None:
            out[name] = out.get(name, 0.0) + t.user + t.system + t.children_user + t.children_system
    return out


def _cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 1) for k in sorted(after, key=lambda k: -after[k])
            if after[k] - before.get(k, 0.0) >= 0.5}


def _db_name(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).database


def funnel_of(ctx, build: str) -> dict:  # noqa: ANN001
    from opensubject_tasks import readmodel
    from opensubject_tasks.db.engine import session_scope

    with session_scope(ctx.sessions) as s:
        return {"funnel": readmodel.funnel(s, build), "states": readmodel.states(s, build)}


def embedded(videos: list[Path], until: str | None, jobs: int, s3: str, work: Path) -> dict:
    """The embedded runner over the same videos and settings (SQLite, its own bucket)."""
    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.runner import run_build

    name = f"embedded-{until or 'all'}.db"
    settings = load_settings(database_url=f"sqlite:///{work / name}",
                             store={"kind": "minio", "endpoint": s3, "access_key": "bench", "secret_key": "bench",
                                    "bucket": f"emb-{uuid.uuid4().hex[:8]}", "region": "us-east-1"},
                             curate={"min_short_side": 64}, mine={"max_pairs_per_subject": 1},
                             verify={"max_attempts": 2})
    ctx = Context.from_settings(settings)
    for p in videos:
        ctx.store.put_file(f"raw/{p.name}", p, "video/mp4")
    t0 = time.monotonic()
    cpu0 = cpu_by_component()
    run_build(ctx, ["store://raw/"], "emb", until=until, jobs=jobs)
    wall = time.monotonic() - t0
    out = {"wall_s": round(wall, 1), "cpu_s_by_component": _cpu_spent(cpu0, cpu_by_component()),
           **funnel_of(ctx, "emb")}
    ctx.engine.dispose()
    return out


def distributed_build(stack: AirflowStack, sampler: ConnectionSampler, store, videos: list[Path],  # noqa: ANN001
                      prefix: str, build: str, conf: dict) -> dict:
    from opensubject_tasks.orchestrate import context

    for p in videos:
        store.put_file(f"{prefix}/{p.name}", p, "video/mp4")
    sampler.reset()
    cpu0 = cpu_by_component()
    t0 = time.monotonic()
    run_id = stack.trigger("opensubject_build", {"source": f"store://{prefix}/", "build_name": build, **conf})
    state = stack.wait_run("opensubject_build", run_id, timeout=6 * 3600, interval=2.0)
    wall = time.monotonic() - t0
    cpu = _cpu_spent(cpu0, cpu_by_component())
    tis = stack.task_instances("opensubject_build", run_id)
    return {"state": state, "wall_s": round(wall, 1), "task_instances": len(tis),
            "chunks": sum(1 for t in tis if t["task_id"] == "chunk"),
            "peak_pg_connections": dict(sampler.peak), "peak_pg_connections_total": sampler.peak_total,
            "cpu_s_by_component": cpu, **funnel_of(context(), build)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=2000, help="videos of the curation-only build (0: none)")
    ap.add_argument("--full-videos", type=int, default=200, help="videos of the whole-pipeline build (0: none)")
    ap.add_argument("--concurrency", type=int, default=2, help="worker processes (and embedded jobs)")
    ap.add_argument("--chunk-size", type=int, default=0, help="videos per chunk (0: automatic)")
    ap.add_argument("--work", type=Path, help="folder for media and logs (default: a new temporary one)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    from opensubject_tasks.testmedia.samples import make_tiny_videos

    t = time.monotonic()
    curate_videos = make_tiny_videos(work / "media", args.videos)
    full_videos = make_tiny_videos(work / "media", args.full_videos, start=args.videos)
    print(f"{args.videos + args.full_videos} videos ready in {time.monotonic() - t:.0f} s", flush=True)

    load_before = os.getloadavg()
    with pg_database("os_scale_data") as data_url, pg_database("os_scale_airflow") as af_url, \
            redis_db(REDIS_DB) as broker, s3_server() as s3:
        env = {"OPENSUBJECT_DATABASE_URL": data_url, "OPENSUBJECT_BROKER_URL": broker,
               "OPENSUBJECT_STORE__KIND": "minio", "OPENSUBJECT_STORE__ENDPOINT": s3,
               "OPENSUBJECT_STORE__ACCESS_KEY": "bench", "OPENSUBJECT_STORE__SECRET_KEY": "bench",
               "OPENSUBJECT_STORE__BUCKET": f"scale-{uuid.uuid4().hex[:8]}", "OPENSUBJECT_STORE__REGION": "us-east-1",
               "OPENSUBJECT_CELERY__POLL_INTERVAL_S": "2", **SETTINGS}
        os.environ.update(env)
        from opensubject_tasks.celery_app import configure
        from opensubject_tasks.db.engine import upgrade
        from opensubject_tasks.orchestrate import context

        configure()
        ctx = context()
        upgrade(ctx.engine)
        stack = AirflowStack(work, af_url, env).start()
        worker = celery_worker(env, work / "worker.log", "scale", concurrency=args.concurrency)
        sampler = ConnectionSampler(os.environ.get("OPENSUBJECT_TEST_DATABASE_URL",
                                                   "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"),
                                    [_db_name(data_url), _db_name(af_url)])
        sampler.start()
        results = {}
        try:
            stack.wait_parsed("opensubject_build")
            stack.unpause("opensubject_build")
            print(f"stack ready in {stack.ready_s:.0f} s", flush=True)
            if curate_videos:
                results["curate_only"] = distributed_build(stack, sampler, ctx.store, curate_videos, "raw", "scale",
                                                           {"until": "curate", "chunk_size": args.chunk_size})
                print(json.dumps(results["curate_only"], default=str), flush=True)
            if full_videos:
                results["full"] = distributed_build(stack, sampler, ctx.store, full_videos, "raw-full", "full", {})
                print(json.dumps(results["full"], default=str), flush=True)
        finally:
            sampler.stop_flag.set()
            worker.stop()
            stack.stop()
        if curate_videos:
            results["curate_only"]["embedded"] = embedded(curate_videos, "curate", args.concurrency, s3, work)
        if full_videos:
            results["full"]["embedded"] = embedded(full_videos, None, args.concurrency, s3, work)
    for r in results.values():
        emb = r["embedded"]
        r["same_counts_as_embedded"] = r["funnel"] == emb["funnel"] and r["states"] == emb["states"]
        r["orchestration_overhead_share"] = round(1 - emb["wall_s"] / r["wall_s"], 3)
        r["distributed_over_embedded"] = round(r["wall_s"] / emb["wall_s"], 2)
    out = {"videos": args.videos, "full_videos": args.full_videos, "concurrency": args.concurrency,
           "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "stack_ready_s": round(stack.ready_s, 1), "results": results, "logs": str(work)}
    print(json.dumps(out, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Load: many short videos through the distributed stack on this machine.

    .venv/bin/python perf/bench_load.py [--videos 200] [--concurrency 2] [--json out.json]

Starts PostgreSQL (a new database on the local server), Redis (a database index of its
own), an S3 server process (moto) and one Celery worker with ``--concurrency`` pool
processes, then drives one build through the Celery tasks exactly as the fault tests do
(tests/fault_fixtures.py ``drive_build``: the same orchestrate calls as the
``opensubject_build`` DAG, the same waits on task ids and sample states, the reconciler
every 30 s). Airflow is left out: ``dag.test()`` runs mapped tasks one at a time in one
process, which would measure Airflow's loop rather than the pipeline (its overhead per
build through the real scheduler is measured by perf/bench_scale.py).

The videos are tiny (160x90, 1.5 s at 25 fps, H.264), each a scikit-image photo with a
cut-out subject moving across it, every one different (content-derived ids).

Reported: wall time and throughput, p50/p95 duration per stage (``stage_attempts``),
peak memory (worker process tree and the driver), and the stuck-work check at the end
(videos not terminal, samples in flight, attempts still running, messages still queued,
units the reconciler had to send again).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from opensubject_tasks.testmedia.samples import make_tiny_videos  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _services import (  # noqa: E402
    celery_worker,
    pg_database,
    redis_db,
    s3_server,
    service_env,
)

REDIS_DB = 11  # a database index of this benchmark's own


# --- memory -------------------------------------------------------------------------------------
class MemorySampler(threading.Thread):
    """Peak RSS of the worker's process tree (sum and largest process) and of this process."""

    def __init__(self, worker_pid: int) -> None:
        super().__init__(daemon=True)
        self.worker_pid = worker_pid
        self.stop_flag = threading.Event()
        self.peak_tree = self.peak_process = self.peak_driver = 0
        self.samples = 0

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop_flag.is_set():
            try:
                root = psutil.Process(self.worker_pid)
                rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
                self.peak_tree = max(self.peak_tree, sum(rss))
                self.peak_process = max(self.peak_process, max(rss))
                self.peak_driver = max(self.peak_driver, me.memory_info().rss)
                self.samples += 1
            except psutil.Error:
                pass
            self.stop_flag.wait(0.5)


# --- numbers --------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def stage_stats(ctx) -> dict:  # noqa: ANN001
    from sqlalchemy import select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import StageAttempt

    with session_scope(ctx.sessions) as s:
        rows = s.execute(select(StageAttempt.stage, StageAttempt.status, StageAttempt.duration_s)).all()
    out = {}
    for stage in ("curate", "mine", "samples", "synthesize", "verify", "export"):
        d = [r.duration_s for r in rows if r.stage == stage and r.duration_s is not None]
        if d:
            out[stage] = {"attempts": len(d), "p50_s": round(percentile(d, 50), 3),
                          "p95_s": round(percentile(d, 95), 3), "max_s": round(max(d), 3),
                          "mean_s": round(statistics.mean(d), 3), "total_s": round(sum(d), 1),
                          "not_ok": sum(1 for r in rows if r.stage == stage and r.status not in ("ok", "rejected"))}
    return out


def stuck_work(ctx, broker_url: str) -> dict:  # noqa: ANN001
    """What is left unfinished (all zero after a good build)."""
    import redis
    from sqlalchemy import func, select

    from opensubject_tasks.celery_app import app
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Sample, StageAttempt, Video

    prefix = (app.conf.broker_transport_options or {}).get("global_keyprefix", "")
    client = redis.Redis.from_url(broker_url)
    with session_scope(ctx.sessions) as s:
        return {
            "videos_not_terminal": s.scalar(select(func.count()).select_from(Video).where(
                Video.state.not_in(("done", "rejected", "failed")))),
            "samples_in_flight": s.scalar(select(func.count()).select_from(Sample).where(
                Sample.state.in_(("pending", "synthesized")))),
            "attempts_running": s.scalar(select(func.count()).select_from(StageAttempt).where(
                StageAttempt.status == "running")),
            "messages_queued": sum(client.llen(prefix + q) for q in ("cpu", "gpu")),
            "messages_unacked": client.hlen(prefix + "unacked"),
        }


def states(ctx) -> dict:  # noqa: ANN001
    from sqlalchemy import func, select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Sample, Video

    with session_scope(ctx.sessions) as s:
        return {"videos": dict(s.execute(select(Video.state, func.count()).group_by(Video.state)).all()),
                "samples": dict(s.execute(select(Sample.state, func.count()).group_by(Sample.state)).all())}


# --- the run --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_load_"))
    media = work / "media"
    t = time.monotonic()
    make_tiny_videos(media, args.videos)
    make_s = time.monotonic() - t

    with pg_database("os_bench_load") as db_url, redis_db(REDIS_DB) as broker, s3_server() as s3:
        env = service_env(db_url, broker, s3, f"load-{uuid.uuid4().hex[:8]}")
        env.update({
            # Small work per video: the 160x90 videos pass curation; one pair per subject.
            "OPENSUBJECT_CURATE__MIN_SHORT_SIDE": "64",
            "OPENSUBJECT_MINE__MAX_PAIRS_PER_SUBJECT": "1",
            "OPENSUBJECT_VERIFY__MAX_ATTEMPTS": "2",
            "OPENSUBJECT_CELERY__BROKER_KEY_PREFIX": f"bench-load-{uuid.uuid4().hex[:6]}:",
        })
        os.environ.update(env)
        from fault_fixtures import drive_build

        from opensubject_tasks.celery_app import configure
        from opensubject_tasks.db.engine import upgrade
        from opensubject_tasks.orchestrate import context

        configure()
        ctx = context()
        upgrade(ctx.engine)
        for f in sorted(media.glob("*.mp4")):
            ctx.store.put_file(f"raw/{f.name}", f, "video/mp4")
        worker = celery_worker(env, work / "worker.log", name="load", concurrency=args.concurrency)
        sampler = MemorySampler(worker.pid)
        sampler.start()
        try:
            # Production-like sweep: every 30 s, for work queued more than 2 minutes ago.
            run = drive_build("load", poll_s=2.0, reconcile_every_s=30, reconcile_age_s=120, timeout_s=3600)
        finally:
            sampler.stop_flag.set()
            sampler.join(5)
            log = (work / "worker.log").read_text(errors="replace")
            worker.stop()
        stuck = stuck_work(ctx, broker)
        resent = sum(line.count("(") for line in log.splitlines() if "whose message was lost" in line)
        out = {
            "videos": args.videos, "concurrency": args.concurrency, "cpus": os.cpu_count(),
            "media": {"size": "160x90", "frames": 38, "fps": 25, "make_s": round(make_s, 1)},
            "wall_s": round(run.wall_s, 1),
            "videos_per_min": round(args.videos / run.wall_s * 60, 1),
            "states": states(ctx),
            "stages": stage_stats(ctx),
            "memory_mb": {"worker_tree_peak": round(sampler.peak_tree / 2**20),
                          "largest_process_peak": round(sampler.peak_process / 2**20),
                          "driver_peak": round(sampler.peak_driver / 2**20), "samples": sampler.samples},
            "stuck": stuck, "reconciler_resent": resent, "reconcile_passes": run.reconciles,
            "failures": run.failures[:10], "logs": str(work),
        }
        verified = out["states"]["samples"].get("verified", 0)
        out["verified_samples_per_min"] = round(verified / run.wall_s * 60, 1)
        ctx.engine.dispose()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

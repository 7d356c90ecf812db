"""Airflow + Celery vs the embedded runner on the same videos, on this machine.

    .venv/bin/python benchmarks/bench_distributed.py [--videos 4] [--concurrency 2] [--modes deferrable blocking]

Starts the real stack locally (PostgreSQL databases for the dataset and for Airflow,
Redis, an S3 server, ``airflow api-server``, ``scheduler``, ``dag-processor`` and
``triggerer`` with the LocalExecutor, and a Celery worker with ``--concurrency``
processes), triggers ``opensubject_build`` through the REST API and waits for the run.
Then runs the embedded runner (``run_build``) over the same videos with ``jobs=1`` and
``jobs=concurrency``.

Reported:
* wall time of each build;
* per stage task of the DAG, the overhead: Airflow task time (first start to end, the
  wait included) minus the time the stage itself ran on the worker (stage_attempts);
* the gap between a task's end and the start of the next task of the same video
  (scheduler and executor latency);
* Airflow worker slot-seconds (task instances in state ``running``, sampled every
  0.25 s) and the peak number of slots held, with the stages deferred to the
  triggerer (``deferrable``) or waiting inside their task (``blocking``,
  ``OPENSUBJECT_AIRFLOW_DEFERRABLE=false``).
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
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _services import (  # noqa: E402
    BIN,
    REPO,
    Proc,
    celery_worker,
    free_port,
    pg_database,
    redis_db,
    s3_server,
    service_env,
)

ADMIN_PASSWORD = "bench-admin-password"


def http(method: str, url: str, body: dict | None = None, token: str | None = None) -> dict:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback
        return json.loads(r.read() or b"{}")


def wait_for(what: str, fn, timeout: float = 300, interval: float = 0.5):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception:  # noqa: BLE001, S110 - not up yet
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready after {timeout}s")


def ts(s: str | None) -> float | None:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None


class SlotSampler(threading.Thread):
    """Counts task instances of the run in state running (holding an executor slot)."""

    def __init__(self, airflow_db_url: str, dag_id: str) -> None:
        super().__init__(daemon=True)
        from sqlalchemy import create_engine

        self.engine = create_engine(airflow_db_url)
        self.dag_id = dag_id
        self.run_id: str | None = None
        self.samples: list[tuple[float, int, int]] = []  # time, running, deferred
        self.stop_flag = threading.Event()

    def run(self) -> None:
        from sqlalchemy import text

        while not self.stop_flag.is_set():
            if self.run_id:
                with self.engine.connect() as c:
                    rows = dict(c.execute(text(
                        "SELECT state, count(*) FROM task_instance WHERE dag_id = :d AND run_id = :r "
                        "GROUP BY state"), {"d": self.dag_id, "r": self.run_id}).all())
                self.samples.append((time.monotonic(), rows.get("running", 0), rows.get("deferred", 0)))
            time.sleep(0.25)

    def summary(self) -> dict:
        if len(self.samples) < 2:
            return {}
        slot_s = sum((b[0] - a[0]) * a[1] for a, b in zip(self.samples, self.samples[1:], strict=False))
        deferred_s = sum((b[0] - a[0]) * a[2] for a, b in zip(self.samples, self.samples[1:], strict=False))
        return {"slot_seconds": round(slot_s, 1), "peak_slots": max(s[1] for s in self.samples),
                "deferred_task_seconds": round(deferred_s, 1)}


def distributed(media: Path, n: int, concurrency: int, mode: str, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    with pg_database("os_bench_data") as data_url, pg_database("os_bench_airflow") as af_url, \
            redis_db(13) as broker, s3_server() as s3:
        env = service_env(data_url, broker, s3, f"bench-{uuid.uuid4().hex[:8]}")
        api_port = free_port()
        home = work / f"airflow-{mode}"
        home.mkdir()
        (home / "passwords.json").write_text(json.dumps({"admin": ADMIN_PASSWORD}))
        env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": af_url,
            "AIRFLOW__API_AUTH__JWT_SECRET": "bench-jwt-secret-" + "z" * 40,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "OPENSUBJECT_AIRFLOW_DEFERRABLE": "true" if mode == "deferrable" else "false",
            "OPENSUBJECT_CELERY__POLL_INTERVAL_S": "1",
        })
        os.environ.update(env)
        from opensubject_tasks.celery_app import configure
        from opensubject_tasks.db.engine import upgrade
        from opensubject_tasks.orchestrate import context

        configure()
        ctx = context()
        upgrade(ctx.engine)
        for f in sorted(media.glob("*.mp4"))[:n]:
            ctx.store.put_file(f"raw/{f.name}", f, "video/mp4")
        import subprocess

        subprocess.run([str(BIN / "airflow"), "db", "migrate"], env={**os.environ, **env}, check=True,
                       capture_output=True, timeout=600)
        t_start = time.monotonic()
        procs = [Proc([str(BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(api_port),
                       "--workers", "1"], env, work / f"{mode}-api.log")]
        for comp in ("scheduler", "dag-processor", "triggerer"):
            procs.append(Proc([str(BIN / "airflow"), comp], env, work / f"{mode}-{comp}.log"))
        procs.append(celery_worker(env, work / f"{mode}-worker.log", concurrency=concurrency))
        base = f"http://127.0.0.1:{api_port}"
        sampler = SlotSampler(af_url, "opensubject_build")
        try:
            token = wait_for("api-server", lambda: http(
                "POST", base + "/auth/token", {"username": "admin", "password": ADMIN_PASSWORD})["access_token"])
            wait_for("dag parsed", lambda: http("GET", base + "/api/v2/dags/opensubject_build", token=token))
            stack_ready_s = time.monotonic() - t_start
            http("PATCH", base + "/api/v2/dags/opensubject_build", {"is_paused": False}, token)
            sampler.start()
            t0 = time.monotonic()
            run = http("POST", base + "/api/v2/dags/opensubject_build/dagRuns",
                       {"logical_date": None, "conf": {"source": "store://raw/", "build_name": "bench"}}, token)
            sampler.run_id = run["dag_run_id"]
            state = wait_for("dag run", lambda: (s := http(
                "GET", base + f"/api/v2/dags/opensubject_build/dagRuns/{run['dag_run_id']}", token=token
            )["state"]) in ("success", "failed") and s, timeout=3600, interval=0.5)
            wall = time.monotonic() - t0
            sampler.stop_flag.set()
            run_url = base + f"/api/v2/dags/opensubject_build/dagRuns/{run['dag_run_id']}"
            tis = http("GET", run_url + "/taskInstances?limit=1000", token=token)["task_instances"]
            videos = http("GET", run_url + "/taskInstances/claim/xcomEntries/return_value", token=token)["value"]
        finally:
            sampler.stop_flag.set()
            for p in reversed(procs):
                p.stop()
        return {"mode": mode, "videos": n, "state": state, "wall_s": round(wall, 1), "stack_ready_s": round(stack_ready_s, 1),
                **sampler.summary(), **overheads(ctx, tis, videos)}


def overheads(ctx, tis: list[dict], videos: list[str]) -> dict:  # noqa: ANN001
    """Per stage task: Airflow time minus worker time; gaps between consecutive tasks."""
    from sqlalchemy import func, select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Sample, StageAttempt

    with session_scope(ctx.sessions) as s:
        stage_s = {(st, e): float(d or 0) for st, e, d in s.execute(
            select(StageAttempt.stage, StageAttempt.entity_id, func.sum(StageAttempt.duration_s))
            .group_by(StageAttempt.stage, StageAttempt.entity_id))}
        spans = {}
        for vid_prefix, first, last in s.execute(
                select(func.substr(Sample.id, 1, 32), func.min(StageAttempt.started_at),
                       func.max(StageAttempt.finished_at))
                .join(StageAttempt, StageAttempt.entity_id == Sample.id)
                .group_by(func.substr(Sample.id, 1, 32))):
            spans[vid_prefix] = (last - first).total_seconds()
    by_index: dict[int, dict[str, dict]] = {}
    video_of = dict(enumerate(videos))  # the group's map index is the position in claim's list
    for ti in tis:
        by_index.setdefault(ti["map_index"], {})[ti["task_id"]] = ti
    over: dict[str, list[float]] = {"curate": [], "mine": [], "synthesize_verify": [], "export": []}
    gaps: list[float] = []
    for idx, group in by_index.items():
        vid = video_of.get(idx)
        chain = [group.get(t) for t in ("video.curate", "video.mine", "video.synthesize_verify", "video.finalize")]
        for a, b in zip(chain, chain[1:], strict=False):
            if a and b and a.get("end_date") and b.get("start_date") and b["state"] == "success":
                gaps.append(ts(b["start_date"]) - ts(a["end_date"]))
        for stage, ti in (("curate", chain[0]), ("mine", chain[1]), ("synthesize_verify", chain[2])):
            if not (vid and ti and ti["state"] == "success" and ti.get("start_date") and ti.get("end_date")):
                continue
            airflow_s = ts(ti["end_date"]) - ts(ti["start_date"])
            worker_s = spans.get(vid, 0.0) if stage == "synthesize_verify" else stage_s.get((stage, vid), 0.0)
            over[stage].append(airflow_s - worker_s)
    export = by_index.get(-1, {}).get("export")
    if export and export["state"] == "success":
        over["export"].append(ts(export["end_date"]) - ts(export["start_date"])
                              - sum(v for (st, _), v in stage_s.items() if st == "export"))

    def stats(xs: list[float]) -> dict:
        return {"n": len(xs), "mean_s": round(statistics.mean(xs), 2), "median_s": round(statistics.median(xs), 2)} \
            if xs else {"n": 0}

    all_over = [x for xs in over.values() for x in xs]
    return {"task_overhead": {k: stats(v) for k, v in over.items()}, "task_overhead_all": stats(all_over),
            "gap_between_tasks": stats(gaps),
            "task_instances": len(tis), "stage_seconds_on_workers": round(sum(stage_s.values()), 1)}


def embedded(media: Path, n: int, jobs: int) -> dict:
    with pg_database("os_bench_emb") as data_url, s3_server() as s3:
        env = service_env(data_url, "redis://127.0.0.1:6379/14", s3, f"emb-{uuid.uuid4().hex[:8]}")
        os.environ.update(env)
        from opensubject_tasks.config import load_settings
        from opensubject_tasks.context import Context
        from opensubject_tasks.runner import run_build

        ctx = Context.from_settings(load_settings())
        for f in sorted(media.glob("*.mp4"))[:n]:
            ctx.store.put_file(f"raw/{f.name}", f, "video/mp4")
        t0 = time.monotonic()
        summary = run_build(ctx, ["store://raw/"], "bench", jobs=jobs)
        wall = time.monotonic() - t0
        ctx.engine.dispose()
        return {"mode": f"embedded jobs={jobs}", "wall_s": round(wall, 1), "videos": summary.videos,
                "samples": summary.samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["deferrable", "blocking"], choices=["deferrable", "blocking"])
    ap.add_argument("--overhead-videos", type=int, default=1,
                    help="videos for the per-task overhead runs (0: skip them)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    from opensubject_tasks.media.samples import make_samples

    make_samples(work / "media", count=args.videos)
    load_before = os.getloadavg()
    results = [embedded(work / "media", args.videos, 1)]
    if args.concurrency > 1:
        results.append(embedded(work / "media", args.videos, args.concurrency))
    for mode in args.modes:
        results.append(distributed(work / "media", args.videos, args.concurrency, mode, work))
    # One video: no task waits for a free worker process, so what Airflow adds per task is
    # its own scheduling, hand-off and hand-back.
    overhead = []
    if args.overhead_videos:
        for mode in args.modes:
            overhead.append(distributed(work / "media", args.overhead_videos, args.concurrency, mode,
                                        work / f"one-{mode}"))
    out = {"videos": args.videos, "concurrency": args.concurrency, "cpus": os.cpu_count(),
           "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "results": results, "overhead_runs": overhead, "logs": str(work)}
    print(json.dumps(out, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()

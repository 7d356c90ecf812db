"""Dashboard and ``status`` load times beside a large history.

    .venv/bin/python perf/bench_read.py [--videos 1000000 --samples 5000000 --attempts 4000000]
                                        [--old-dashboard FILE] [--json out.json]

A new PostgreSQL database gets one small real build first: tiny generated videos (160x90,
1.5 s, a photo with a cut-out subject moving across it; ``testmedia.tiny_video``) run
through every stage by the embedded runner. Its dashboard document and ``status``
document are read (empty database), then the synthetic history of earlier builds is
added (tests/corpus_history.py, SQL ``generate_series``: videos, clips, subjects, pairs,
samples and stage attempts over five finished builds) and everything is read again:

* the small build's dashboard (``dashboard.data.summary``) and status (``runner.funnel``,
  what ``opensubject status --build`` prints), which must equal the empty database's;
* the dashboard with no build named (the most recent build);
* a history build's dashboard (a finished build of videos/5 videos), and the same build's
  counts taken from its rows (``readmodel.counted_from_rows``: what every load paid before
  PostgreSQL kept each build's counts), which must equal the kept counts.

Each read is timed three times (median wall, and this process's CPU time: the rest is the
database's). ``--old-dashboard``: a file holding another version of
``dashboard/data.py`` (e.g. ``git show main:opensubject_tasks/dashboard/data.py``), timed
on the same reads for comparison.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _services import pg_database  # noqa: E402 - also puts tests/ on sys.path

from corpus_history import History, describe, fill  # noqa: E402
from opensubject_tasks.testmedia.samples import make_tiny_videos  # noqa: E402


def timed(fn, repeat: int = 3) -> tuple[float, float, object]:  # noqa: ANN001
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def comparable(doc: dict) -> dict:
    """The parts of a dashboard document that belong to its build (not the builds list,
    not the presigned links, which carry the time)."""
    keep = ("build", "funnel", "duplicates", "samples_by_state", "failures", "sample_rejections", "attempts",
            "resynthesized_samples")
    return {k: doc[k] for k in keep} | {"recent": [r["id"] for r in doc["recent_samples"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=10**6)
    ap.add_argument("--samples", type=int, default=5 * 10**6)
    ap.add_argument("--attempts", type=int, default=4 * 10**6)
    ap.add_argument("--build-videos", type=int, default=4)
    ap.add_argument("--old-dashboard", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    history = History(videos=args.videos, samples=args.samples, attempts=args.attempts)

    tmp = Path(tempfile.mkdtemp(prefix="bench-read-"))
    media = tmp / "media"
    make_tiny_videos(media, args.build_videos)
    results: dict[str, dict[str, float]] = {}
    with pg_database("bench_read", schema=True) as url:
        os.environ.update({
            "OPENSUBJECT_DATABASE_URL": url, "OPENSUBJECT_STORE__KIND": "local",
            "OPENSUBJECT_STORE__LOCAL_ROOT": str(tmp / "store"), "OPENSUBJECT_CURATE__MIN_SHORT_SIDE": "64",
            "OPENSUBJECT_MINE__MAX_PAIRS_PER_SUBJECT": "1", "OPENSUBJECT_VERIFY__MAX_ATTEMPTS": "2",
        })
        from opensubject_tasks import readmodel
        from opensubject_tasks.config import load_settings
        from opensubject_tasks.context import Context
        from opensubject_tasks.db.engine import session_scope
        from opensubject_tasks.dashboard.data import summary
        from opensubject_tasks.runner import funnel, run_build

        ctx = Context.from_settings(load_settings())
        old = None
        if args.old_dashboard:
            spec = importlib.util.spec_from_file_location("old_dashboard", args.old_dashboard)
            old = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(old)  # type: ignore[union-attr]

        t0 = time.perf_counter()
        run_build(ctx, [str(media)], "small", jobs=1)
        print(f"small build: {args.build_videos} tiny videos in {time.perf_counter() - t0:.1f} s", flush=True)

        def rows_counted(build_id: str) -> dict:
            with session_scope(ctx.sessions) as s:
                return readmodel.counted_from_rows(s, build_id)

        def reads(label: str) -> dict[str, object]:
            out = {}
            named = {
                "dashboard, small build": lambda: summary(ctx, "small"),
                "dashboard, no build named": lambda: summary(ctx),
                "status --build small": lambda: funnel(ctx, "small"),
            }
            if label == "history":
                named["dashboard, a history build"] = lambda: summary(ctx, history.build_ids()[0])
                # what each load paid before the kept counts: the build's rows counted
                named["history build counted from rows"] = lambda: rows_counted(history.build_ids()[0])
            if old is not None:
                named["old dashboard, small build"] = lambda: old.summary(ctx, "small")
                named["old dashboard, no build named"] = lambda: old.summary(ctx)
            for name, fn in named.items():
                wall, cpu, doc = timed(fn)
                results[f"{label}: {name}"] = {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4)}
                print(f"{label:<8} {name:<32} wall {wall * 1000:9.1f} ms   cpu {cpu * 1000:8.1f} ms", flush=True)
                out[name] = doc
            return out

        empty = reads("empty")
        print(f"filling the history: {describe(history)}", flush=True)
        seconds = fill(url, history, keys=False, log=lambda m: print(m, flush=True))
        print(f"history filled in {sum(seconds.values()):.0f} s", flush=True)
        full = reads("history")
        same_dashboard = comparable(empty["dashboard, small build"]) == comparable(full["dashboard, small build"])
        same_status = empty["status --build small"] == full["status --build small"]
        hb = history.build_ids()[0]
        with session_scope(ctx.sessions) as s:
            same_counts = readmodel.counts(s, hb) == full["history build counted from rows"]
        print(f"small build's dashboard equal beside the history: {same_dashboard}; status equal: {same_status}; "
              f"a history build's kept counts equal its rows counted: {same_counts}")
        results["equal"] = {"dashboard": same_dashboard, "status": same_status, "history counts": same_counts}
        ctx.engine.dispose()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if same_dashboard and same_status and same_counts else 1


if __name__ == "__main__":
    raise SystemExit(main())

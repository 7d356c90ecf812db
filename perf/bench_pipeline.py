"""End-to-end embedded build: wall time per stage, peak memory, and --jobs scaling.

    .venv/bin/python perf/bench_pipeline.py [--videos DIR] [--jobs 1 2] [--profile cpu]

Makes the sample media when no folder is given, runs `opensubject run` once per
--jobs value in a fresh output folder (a child process, so its peak RSS is its
own), and prints per-stage seconds, videos/hour, peak RSS and whether the exported
datasets are identical across job counts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD_BEFORE = " ".join(f"{x:.1f}" for x in os.getloadavg())


def dataset_digest(out: Path) -> str:
    h = hashlib.sha256()
    ds = out / "dataset"
    for p in sorted(ds.rglob("*")):
        if p.is_file() and p.name not in ("stats.json", "report.html"):
            h.update(str(p.relative_to(ds)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=Path)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--until", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    videos = args.videos
    if videos is None:
        from opensubject_tasks.testmedia.samples import make_samples

        videos = work / "media"
        make_samples(videos)
    n_videos = sum(1 for p in videos.iterdir() if p.suffix.lower() in (".mp4", ".mkv", ".mov", ".avi", ".webm"))
    rows = []
    for jobs in args.jobs:
        out = work / f"out_jobs{jobs}"
        cmd = [sys.executable, "-m", "opensubject_tasks.cli", "run", str(videos), "--out", str(out),
               "--jobs", str(jobs), "--quiet", "--profile", args.profile]
        if args.until:
            cmd += ["--until", args.until]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU of the run and its worker processes: steadier than wall time on a shared machine
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        peak_mb = max(before.ru_maxrss, after.ru_maxrss) / 1024
        summary = json.loads((out / "summary.json").read_text())
        digest = dataset_digest(out) if (out / "dataset").exists() else "-"
        rows.append((jobs, wall, cpu, (load, os.getloadavg()[0]), peak_mb, summary, digest))

    print(f"\n{n_videos} videos, profile {args.profile}, machine cores: {os.cpu_count()}, "
          f"load average before: {LOAD_BEFORE}, after: " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + "\n")
    stages = [t["stage"] for t in rows[0][-2]["timings"]]
    print("| jobs | wall s | CPU s | load (1 min) at start / end | videos/hour | peak RSS MB (largest process) | "
          + " | ".join(f"{s} s" for s in stages) + " | dataset digest |")
    print("|" + "---|" * (7 + len(stages)))
    for jobs, wall, cpu, load, peak, summary, digest in rows:
        per = {t["stage"]: t["seconds"] for t in summary["timings"]}
        print(f"| {jobs} | {wall:.1f} | {cpu:.1f} | {load[0]:.1f} / {load[1]:.1f} | {3600 * n_videos / wall:.0f} | "
              f"{peak:.0f} | " + " | ".join(f"{per.get(s, 0):.1f}" for s in stages) + f" | {digest} |")
    if len(rows) > 1:
        base_jobs, base_wall, base_cpu = rows[0][:3]
        for jobs, wall, cpu, *_ in rows[1:]:
            print(f"\nspeed-up jobs={jobs} vs jobs={base_jobs}: {base_wall / wall:.2f}x wall, "
                  f"CPU {cpu / base_cpu:.2f}x of jobs={base_jobs}")
        print("identical datasets:", len({r[-1] for r in rows}) == 1)
    print("\nsamples:", rows[-1][-2]["samples"], " videos:", rows[-1][-2]["videos"])


if __name__ == "__main__":
    main()

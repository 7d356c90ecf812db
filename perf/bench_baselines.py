"""The benchmark's baseline table: build a bench, run the baselines, score them.

    .venv/bin/python perf/bench_baselines.py [--out DIR] [--source auto|pipeline|constructed]
                                                   [--share 0.5] [--videos N] [--jobs N]

``pipeline`` makes the sample media and runs the embedded pipeline over it
(``runner.run_build``); ``constructed`` writes a small build straight into the
database and store (``bench.constructed``); ``auto`` tries the pipeline and falls
back to the constructed build when the pipeline cannot give verified samples from
at least two videos, saying why. Prints the Markdown table for docs/benchmark.md
and the scoring speed, and writes both to OUT/baselines.md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from opensubject_tasks.bench.baselines import BASELINES, run_baseline
from opensubject_tasks.bench.build import SPLITS, build_bench
from opensubject_tasks.bench.score import score_bench
from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context

BUILD = "bench"


def from_pipeline(ctx: Context, work: Path, jobs: int) -> str:
    from opensubject_tasks.testmedia.samples import make_samples
    from opensubject_tasks.runner import run_build

    media = work / "media"
    make_samples(media)
    t0 = time.perf_counter()
    summary = run_build(ctx, [str(media)], BUILD, jobs=jobs, export_dir=str(work / "dataset"))
    return (f"sample media ({len(list(media.glob('*.mp4')))} videos) through the embedded pipeline "
            f"in {time.perf_counter() - t0:.0f} s: samples {summary.samples}")


def from_constructed(ctx: Context, videos: int) -> str:
    from opensubject_tasks.bench.constructed import make_constructed_build

    n = len(make_constructed_build(ctx, BUILD, videos=videos))
    return f"constructed build ({videos} videos, {n} verified samples; bench.constructed)"


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    def f(v: Any) -> str:
        return "–" if v is None else f"{v:.2f}"

    head = ("| predictions | overall | " + " | ".join(SPLITS) + " | PF | SC | identity (gen) "
            "| prompt proxy (gen) | manipulation (man) | background (man) | PSNR / SSIM (man) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in rows:
        gen, man = s["tasks"]["generation"], s["tasks"]["manipulation"]
        lines.append(
            f"| {name} | **{f(s['overall'])}** | "
            + " | ".join(f(s["splits"][sp]["overall"]) for sp in SPLITS)
            + f" | {f(s['pf'])} | {f(s['sc'])} | {f(gen['axes']['identity']['classical'])} | "
            f"{f(gen['axes']['prompt_adherence']['classical'])} | {f(man['axes']['manipulation']['classical'])} | "
            f"{f(man['axes']['background']['classical'])} | {f(man['psnr'])} / {f(man['ssim'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--source", choices=["auto", "pipeline", "constructed"], default="auto")
    ap.add_argument("--share", type=float, default=0.5, help="held-out share (small builds: 0.5)")
    ap.add_argument("--videos", type=int, default=12, help="videos of the constructed build")
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="bench_baselines_"))
    work.mkdir(parents=True, exist_ok=True)
    settings = load_settings(database_url=f"sqlite:///{(work / 'opensubject.db').resolve()}",
                             store={"kind": "local", "local_root": str((work / "store").resolve())})
    ctx = Context.from_settings(settings)

    source = None
    if args.source in ("auto", "pipeline"):
        try:
            source = from_pipeline(ctx, work, args.jobs)
            info = build_bench(ctx, BUILD, work / "bench", share=args.share)
        except Exception as exc:  # noqa: BLE001 - auto falls back and says why
            if args.source == "pipeline":
                raise
            why = f"{type(exc).__name__}: {exc}"
            print(f"pipeline not usable for a bench ({why.splitlines()[0][:300]}); "
                  "using the constructed build\n" + traceback.format_exc(limit=2))
            source = None
            settings.database_url = f"sqlite:///{(work / 'constructed.db').resolve()}"
            settings.store.local_root = (work / "constructed-store").resolve()
            ctx = Context.from_settings(settings)
    if source is None:
        source = from_constructed(ctx, args.videos)
        info = build_bench(ctx, BUILD, work / "bench", share=args.share)

    rows, timing = [], []
    for name in BASELINES:
        preds = work / "predictions" / name
        run_baseline(name, work / "bench", preds)
        t0 = time.perf_counter()
        summary = score_bench(ctx, work / "bench", preds, work / "scores" / name, name=name)
        dt = time.perf_counter() - t0
        timing.append(f"{name}: {info.cases} cases scored in {dt:.1f} s ({info.cases / dt:.1f} cases/s)")
        rows.append((name, summary))
    doc = "\n".join([
        f"Source: {source}.",
        f"Bench: {info.cases} cases from {len(info.held_out_videos)} of {info.videos_total} videos "
        f"(share {args.share}); splits {json.dumps(info.splits)}.",
        f"Scored by: {rows[0][1]['labels']['mode']}; embedder {rows[0][1]['embedder']}; "
        f"judge {rows[0][1]['judge']['backend']} (every judge field unscored: "
        f"{rows[0][1]['counts']['judge_unscored']}).",
        "", table(rows), "", *timing, ""])
    (work / "baselines.md").write_text(doc)
    print(doc)
    print(f"results in {work}")


if __name__ == "__main__":
    main()

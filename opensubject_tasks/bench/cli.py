"""`opensubject bench ...`: build the benchmark, write baseline predictions, score.

    opensubject bench build --from BUILD --out DIR [--db-out OUT] [--share 0.2] [--seed 0]
    opensubject bench baseline copy-input|paste-reference --bench DIR --out DIR
    opensubject bench score --bench DIR --predictions DIR [--out DIR] [--scorer auto|judge|classical]
                            [--protocol opensubject|osbench] [--missing zero|skip] [--rubric FILE]
    opensubject bench import-osbench PATH --out DIR [--language en]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BASELINE_NAMES = ("copy-input", "paste-reference", "ground-truth")  # = bench.baselines.BASELINES


def _bench_settings(args: argparse.Namespace, db_out: str | None) -> Any:
    from opensubject_tasks.cli_common import _existing_out, _settings

    out = _existing_out(db_out, "--db-out", args)
    settings = _settings(args, out)
    for interface in ("vlm", "embedder"):
        name = getattr(args, interface, None)
        if name:
            setattr(settings.backends, interface, name)
    return settings


def cmd_bench_build(args: argparse.Namespace) -> int:
    from opensubject_tasks.bench.build import build_bench
    from opensubject_tasks.cli_common import EXIT_OK, _context, _existing_database, _known_build, _name

    _name(args.build, "--from")
    settings = _bench_settings(args, args.db_out)
    _existing_database(settings, "--db-out")
    ctx = _context(settings)
    _known_build(ctx, args.build, "--from")
    info = build_bench(ctx, args.build, Path(args.out), share=args.share, seed=args.seed)
    print(json.dumps({"bench": info.bench_dir, "cases": info.cases, "splits": info.splits,
                      "held_out_videos": len(info.held_out_videos), "videos_total": info.videos_total,
                      "skipped": len(info.skipped)}))
    print(f"held-out videos: {Path(info.bench_dir) / 'held_out_videos.json'}; export the training set "
          f"without them: opensubject export --build {args.build} --out {args.db_out or 'OUT'} "
          f"--exclude-bench {info.bench_dir}")
    return EXIT_OK


def cmd_bench_baseline(args: argparse.Namespace) -> int:
    from opensubject_tasks.bench.baselines import run_baseline
    from opensubject_tasks.cli_common import EXIT_OK, CannotRun

    if not (Path(args.bench) / "cases.jsonl").exists():
        raise CannotRun(f"not a bench directory: {args.bench}")
    n = run_baseline(args.name, args.bench, args.out)
    print(f"{args.name}: {n} predictions written to {args.out}")
    return EXIT_OK


def cmd_bench_score(args: argparse.Namespace) -> int:
    from opensubject_tasks.bench.score import ScoringContext, score_bench
    from opensubject_tasks.cli_common import EXIT_OK, CannotRun

    bench, preds = Path(args.bench), Path(args.predictions)
    if not (bench / "cases.jsonl").exists():
        raise CannotRun(f"not a bench directory: {bench}")
    if not preds.is_dir():
        raise CannotRun(f"predictions folder not found: {preds}")
    name = args.name or preds.resolve().name
    out = Path(args.out) if args.out else bench / "scores" / name
    ctx = ScoringContext(_bench_settings(args, None))
    if args.rubric and not Path(args.rubric).is_file():
        raise CannotRun(f"rubric file not found: {args.rubric}")
    score_bench(ctx, bench, preds, out, name=name, scorer=args.scorer,
                judge_attempts=args.judge_attempts, worst=args.worst, protocol=args.protocol,
                missing=args.missing, rubric=args.rubric)
    print((out / "summary.md").read_text())
    print(f"per-case results and summary files in {out}")
    return EXIT_OK


def cmd_bench_import_osbench(args: argparse.Namespace) -> int:
    from opensubject_tasks.bench.osbench import import_osbench
    from opensubject_tasks.cli_common import EXIT_OK, CannotRun

    if not Path(args.path).is_dir():
        raise CannotRun(f"OSBench dataset folder not found: {args.path}")
    info = import_osbench(args.path, Path(args.out), language=args.language)
    print(json.dumps({k: info[k] for k in ("cases", "splits", "task_types", "skipped_other_languages")}))
    print(f"score predictions with: opensubject bench score --bench {args.out} --predictions RESULTS "
          "--protocol osbench (RESULTS/fullset/<task_type>/<key>.png)")
    return EXIT_OK


def add_bench_commands(subparsers: Any) -> None:
    """Register `bench build|baseline|score` on the main parser's subparsers (imports
    nothing heavy: the commands import what they need when they run)."""
    bench = subparsers.add_parser("bench", help="benchmark: held-out split, baselines, scoring")
    sub = bench.add_subparsers(dest="sub", required=True)

    b = sub.add_parser("build", help="write a held-out benchmark split of a build")
    b.add_argument("--from", dest="build", required=True, help="build name to take the split from")
    b.add_argument("--out", required=True, help="bench directory to write")
    b.add_argument("--db-out", help="output folder of an embedded build (database + store); "
                                    "default: the configured database and store")
    b.add_argument("--share", type=float, default=0.2, help="share of videos held out (default 0.2)")
    b.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    b.set_defaults(fn=cmd_bench_build)

    bl = sub.add_parser("baseline", help="write reference predictions for every case")
    bl.add_argument("name", choices=BASELINE_NAMES)
    bl.add_argument("--bench", required=True)
    bl.add_argument("--out", required=True, help="predictions folder to write")
    bl.set_defaults(fn=cmd_bench_baseline)

    s = sub.add_parser("score", help="score predictions (one <case id>.png per case)")
    s.add_argument("--bench", required=True)
    s.add_argument("--predictions", required=True)
    s.add_argument("--out", help="results folder (default BENCH/scores/NAME)")
    s.add_argument("--name", help="model name in the results (default: the predictions folder name)")
    s.add_argument("--scorer", choices=["auto", "judge", "classical"], default="auto",
                   help="PF/SC from the VLM judge or classical metrics (auto: judge when a VLM is configured)")
    s.add_argument("--profile", choices=["cpu", "gpu", "tiny"])
    s.add_argument("--vlm", help="VLM backend for the judge (overrides the configuration)")
    s.add_argument("--embedder", help="embedder backend (overrides the configuration)")
    s.add_argument("--judge-attempts", type=int,
                   help="tries per judge question (default 3; 10 with --protocol osbench, as released)")
    s.add_argument("--worst", type=int, default=20, help="cases on the worst-cases page (default 20)")
    s.add_argument("--protocol", choices=["opensubject", "osbench"], default="opensubject",
                   help="opensubject: four axes, classical metrics and judge; osbench: the released OSBench "
                        "scorer's images, order and JSON replies (docs/benchmark.md)")
    s.add_argument("--missing", choices=["zero", "skip"],
                   help="a missing prediction scores 0 or is left out (default: zero; skip with --protocol osbench)")
    s.add_argument("--rubric", help="judge prompts file (default: the protocol's own)")
    s.set_defaults(fn=cmd_bench_score)

    i = sub.add_parser("import-osbench", help="read the released OSBench (a `datasets` folder) into a bench")
    i.add_argument("path", help="folder saved with datasets' save_to_disk")
    i.add_argument("--out", required=True, help="bench directory to write")
    i.add_argument("--language", default="en", help="instruction language to keep (default en, as released)")
    i.set_defaults(fn=cmd_bench_import_osbench)

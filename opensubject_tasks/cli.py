"""The `opensubject` command line.

Exit codes: 0 = the command ran (bad videos are recorded as failed, not an error);
1 = it could not run: a missing path, an unknown build or video, a database that does not
exist or cannot be reached (one line says which and what to do; ``-v`` adds details);
2 = invalid usage or configuration.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from opensubject_tasks.cli_common import (  # noqa: F401 - EXIT_* and CannotRun are this command's API
    EXIT_CANNOT_RUN, EXIT_OK, EXIT_USAGE, CannotRun, Parser, _context, _existing_database, _existing_out,
    _known_build, _name, _settings,
)
from opensubject_tasks.errors import ConfigError, OpenSubjectError


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[Any]:
    """Rich progress bars, one per stage (plain logging when not a terminal)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    # On stderr, like logging: stdout carries the run's summary only.
    with Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
                  console=Console(stderr=True)) as prog:
        def factory(stage: str):
            task = prog.add_task(stage, total=None)
            return lambda advance, total: prog.update(task, advance=advance, total=total)
        yield factory


def cmd_run(args: argparse.Namespace) -> int:
    from opensubject_tasks.runner import funnel, run_build

    out = Path(args.out)
    sources = []
    for src in args.videos:
        if src.startswith("store://"):
            sources.append(src)
            continue
        p = Path(src)
        if not p.exists():
            raise CannotRun(f"input not found: {src}")
        sources.append(str(p.resolve()))
    build_id = _name(args.build, "--build") if args.build else "default"
    if out.exists() and not out.is_dir():
        raise CannotRun(f"--out {out} is a file: give a folder for the database, store and dataset")
    settings = _settings(args, out)
    from opensubject_tasks.models_cli import require_models  # missing weights: stop before any video

    require_models(settings)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _context(settings)
    with _progress_bars(not args.quiet and sys.stderr.isatty() or args.progress) as bars:
        summary = run_build(ctx, sources, build_id, until=args.until, jobs=args.jobs,
                            progress=bars, export_dir=str(out / "dataset"))
    if args.until in (None, "synthesize", "verify", "export"):
        try:
            from opensubject_tasks.contact_sheet import write_contact_sheet

            write_contact_sheet(ctx, out / "contact_sheet.png")
        except ModuleNotFoundError:
            pass
    doc = funnel(ctx, build_id)
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    _print_funnel(doc, summary.to_dict())
    return EXIT_OK


def _print_funnel(doc: dict[str, Any], summary: dict[str, Any] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from opensubject_tasks.readmodel import FUNNEL

    console = Console(stderr=False)
    f = Table(title=f"Stage funnel of build {doc['build']}" if doc.get("build") else "Stage funnel")
    f.add_column("step")
    f.add_column("what it counts")
    f.add_column("count", justify="right")
    for k, v in doc["funnel"].items():
        f.add_row(k, FUNNEL.get(k, ""), str(v))
    console.print(f)
    if doc.get("duplicates"):
        t = Table(title="Inputs recorded as duplicates (byte-identical copies, not built again)")
        t.add_column("input file")
        t.add_column("copy of")
        for d in doc["duplicates"]:
            t.add_row(d["name"], d["copy_of"])
        console.print(t)
    bad = [v for v in doc["videos"] if v["state"] in ("failed", "rejected")]
    if bad:
        t = Table(title="Videos not used")
        t.add_column("video")
        t.add_column("state")
        t.add_column("reason")
        for v in bad:
            t.add_row(v["name"], v["state"], (v["reason"] or "")[:200])
        console.print(t)
    if summary:
        t = Table(title="Time per stage")
        t.add_column("stage")
        t.add_column("entities", justify="right")
        t.add_column("seconds", justify="right")
        for tm in summary["timings"]:
            t.add_row(tm["stage"], str(tm["entities"]), f"{tm['seconds']:.2f}")
        console.print(t)


def cmd_status(args: argparse.Namespace) -> int:
    from opensubject_tasks.runner import funnel

    out = _existing_out(args.out, args=args)
    settings = _settings(args, out)
    _existing_database(settings)
    ctx = _context(settings)
    if args.build:
        _known_build(ctx, _name(args.build, "--build"))
    doc = funnel(ctx, args.build)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_funnel(doc)
    return EXIT_OK


def cmd_samples_make(args: argparse.Namespace) -> int:
    from opensubject_tasks.testmedia.samples import SAMPLE_SIZE, make_samples

    size = tuple(int(x) for x in args.size.lower().split("x")) if args.size else SAMPLE_SIZE
    gt = make_samples(Path(args.dir), seed=args.seed, size=size)  # type: ignore[arg-type]
    print(f"sample videos and ground truth written: {gt}")
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from opensubject_tasks.db.engine import make_engine, upgrade

    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    settings = _settings(args, Path(args.out) if args.out else None)
    applied = upgrade(make_engine(settings.database_url))
    print("schema up to date" + (f"; applied {', '.join(applied)}" if applied else ""))
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    from opensubject_tasks.db.engine import upgrade
    from opensubject_tasks.services.ingest import register_source

    source = args.source if args.source.startswith("store://") else str(Path(args.source).resolve())
    if not source.startswith("store://") and not Path(source).exists():
        raise CannotRun(f"input not found: {args.source}")
    if args.build:
        _name(args.build, "--build")
    settings = _settings(args, Path(args.out) if args.out else None)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = _context(settings)
    upgrade(ctx.engine)
    res = register_source(ctx, source, build_id=args.build)
    print(json.dumps({"new": len(res.new_ids), "known": len(res.known_ids),
                      "skipped": res.skipped.counts, "skipped_examples": res.skipped.examples}))
    return EXIT_OK


def cmd_events_forward_sqs(args: argparse.Namespace) -> int:
    """AWS S3's bucket notifications, from their SQS queue into the events table."""
    import boto3

    from opensubject_tasks.services.events import forward_sqs

    settings = _settings(args, None)
    ctx = _context(settings)
    client = boto3.client("sqs", region_name=args.region or settings.store.region or None,
                          endpoint_url=args.endpoint_url or None)
    print(json.dumps(forward_sqs(ctx, args.queue_url, client, wait_s=args.wait, until_empty=args.until_empty)))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from opensubject_tasks.export.service import export_build_to

    out = _existing_out(args.out, args=args)
    _name(args.build, "--build")
    settings = _settings(args, out)
    if args.exclude_bench:
        settings.export.exclude_bench_dirs = [*settings.export.exclude_bench_dirs,
                                              *map(Path, args.exclude_bench)]
    ctx = _context(settings)
    _known_build(ctx, args.build)
    dest = Path(args.dest) if args.dest else out / "dataset"
    res = export_build_to(ctx, args.build, str(dest))
    print(f"exported build {args.build!r} to {dest}: {res}")
    return EXIT_OK


def cmd_rerun(args: argparse.Namespace) -> int:
    """Re-run one stage of one video: in this process (embedded builds, or --in-process), or
    handed to the Celery workers as an orchestrator does, waiting for its outcome."""
    from opensubject_tasks.services.rerun import check_rerun, default_actor, invalidate

    out = _existing_out(args.out, args=args)
    settings = _settings(args, out)
    _existing_database(settings)
    ctx = _context(settings)
    check_rerun(ctx, args.stage, args.video_id)
    if args.recompute:
        why = f"rerun {args.stage} --recompute" + (f": {args.reason}" if args.reason else "")
        print(f"{args.stage} {args.video_id}: {invalidate(ctx, args.stage, args.video_id, reason=why, actor=default_actor())}")
    if out is None and not args.in_process and ctx.engine.dialect.name != "sqlite":
        from opensubject_tasks.orchestrate import rerun_on_workers

        outcome = rerun_on_workers(args.stage, args.video_id, timeout_s=args.timeout)
    else:
        from opensubject_tasks.services.common import run_stage

        outcome = run_stage(ctx, args.stage, args.video_id).to_dict()
    details = outcome.get("details") or {}
    line = f"{args.stage} {args.video_id}: {outcome['status']}"
    if outcome.get("reason"):
        line += f" ({outcome['reason'].splitlines()[0]})"
    if details.get("skipped"):
        line += f"; {details['skipped']}"
    print(line + f"; follow-up units: {len(outcome.get('next') or [])}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="opensubject", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML settings file (also OPENSUBJECT_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a build over video folders/files, embedded (no services)")
    r.add_argument("videos", nargs="+", help="video folders or files, or store://PREFIX")
    r.add_argument("--out", required=True, help="output folder (database, store, dataset)")
    r.add_argument("--build", help="build name (default: 'default')")
    r.add_argument("--profile", choices=["cpu", "gpu", "tiny", "small"])
    r.add_argument("--until", choices=["ingest", "curate", "mine", "synthesize", "verify", "export"])
    r.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel worker processes (default: number of cores)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--progress", action="store_true", help="progress bars even when not a terminal")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("status", help="stage funnel and per-video states of one build")
    s.add_argument("--out", help="output folder of an embedded build")
    s.add_argument("--build", help="build name (default: the most recent build)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    sm = sub.add_parser("samples", help="sample media").add_subparsers(dest="sub", required=True)
    mk = sm.add_parser("make", help="write sample videos with ground truth")
    mk.add_argument("dir")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--size", help="WIDTHxHEIGHT, default 854x480")
    mk.set_defaults(fn=cmd_samples_make)

    db = sub.add_parser("db", help="database").add_subparsers(dest="sub", required=True)
    up = db.add_parser("upgrade", help="apply the schema")
    up.add_argument("--out")
    up.set_defaults(fn=cmd_db_upgrade)

    ing = sub.add_parser("ingest", help="register new videos from a folder or store://PREFIX")
    ing.add_argument("source")
    ing.add_argument("--out")
    ing.add_argument("--build")
    ing.set_defaults(fn=cmd_ingest)

    ev = sub.add_parser("events", help="bucket notifications").add_subparsers(dest="sub", required=True)
    fw = ev.add_parser("forward-sqs", help="move AWS S3 notifications from an SQS queue into the events "
                                           "table (credentials: the usual AWS environment)")
    fw.add_argument("queue_url")
    fw.add_argument("--region", help="default: the store's region")
    fw.add_argument("--endpoint-url", help="an SQS-compatible endpoint (default: AWS)")
    fw.add_argument("--wait", type=int, default=20, help="long-poll seconds per receive (0-20)")
    fw.add_argument("--until-empty", action="store_true", help="stop when the queue is empty")
    fw.set_defaults(fn=cmd_events_forward_sqs)

    ex = sub.add_parser("export", help="re-export a build from the database (no recompute)")
    ex.add_argument("--build", default="default")
    ex.add_argument("--out", required=True, help="output folder of the build")
    ex.add_argument("--dest", help="export folder (default OUT/dataset)")
    ex.add_argument("--exclude-bench", action="append", metavar="BENCH_DIR", default=[],
                    help="leave out the videos held out by this bench (repeatable; "
                         "also export.exclude_bench_dirs)")
    ex.set_defaults(fn=cmd_export)

    rr = sub.add_parser("rerun", help="re-run one stage of one video (finished work is kept "
                                      "unless --recompute)")
    rr.add_argument("stage", choices=["curate", "mine"])
    rr.add_argument("video_id")
    rr.add_argument("--out", help="output folder of an embedded build (default: the configured "
                                  "database; with PostgreSQL the stage runs on the Celery workers)")
    rr.add_argument("--recompute", action="store_true",
                    help="drop what this stage and later ones produced for the video (recorded in "
                         "the invalidations table) and run it from scratch")
    rr.add_argument("--reason", help="why, recorded with a recompute")
    rr.add_argument("--in-process", action="store_true",
                    help="run here instead of on the workers (distributed database)")
    rr.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds to wait for the workers (default 3600)")
    rr.set_defaults(fn=cmd_rerun)

    from opensubject_tasks.bench.cli import add_bench_commands
    from opensubject_tasks.models_cli import add_models_commands

    add_bench_commands(sub)
    add_models_commands(sub)
    return p


def one_line(exc: BaseException) -> str:
    """An error as one sentence: the first line of its message, without the library's
    documentation link or the SQL it ran."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError) and exc.orig is not None:
        text = str(exc.orig)
        if "does not exist" in text and "database" in text:
            return f"the configured database does not exist ({text.strip().splitlines()[0]}): " \
                   "create it, or run `opensubject db upgrade` against an existing one"
        if "unable to open database file" in text:
            return "the database file cannot be opened: check the --out folder or OPENSUBJECT_DATABASE_URL"
        return f"database error: {text.strip().splitlines()[0] if text.strip() else type(exc.orig).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"opensubject: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - one sentence, no traceback (details with -v)
        from sqlalchemy.exc import SQLAlchemyError

        if args.verbose:
            raise
        known = isinstance(exc, (CannotRun, OpenSubjectError, OSError, SQLAlchemyError))
        prefix = "cannot run" if known else f"internal error ({type(exc).__name__})"
        print(f"opensubject: {prefix}: {one_line(exc)}" + ("" if known else " (use -v for details)"),
              file=sys.stderr)
        return EXIT_CANNOT_RUN


if __name__ == "__main__":
    sys.exit(main())

"""The `opensubject` command line.

Exit codes: 0 = the command ran (bad videos are recorded as failed, not an error);
1 = it could not run (missing input, unreachable service); 2 = invalid usage or config.
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

from opensubject_tasks.errors import ConfigError, OpenSubjectError

EXIT_OK, EXIT_CANNOT_RUN, EXIT_USAGE = 0, 1, 2


class CannotRun(OpenSubjectError):
    """The command cannot start; the message says why."""


def _settings(args: argparse.Namespace, out: Path | None = None, **overrides: Any):
    """Settings from --config/env/YAML; ``--out`` supplies the embedded database and
    store locations unless they were configured explicitly."""
    from opensubject_tasks.config import load_settings

    if getattr(args, "profile", None):
        overrides["profile"] = args.profile
    settings = load_settings(getattr(args, "config", None), **overrides)
    if out is not None:
        if "database_url" not in settings.model_fields_set:
            settings.database_url = f"sqlite:///{(out / 'opensubject.db').resolve()}"
        if "store" not in settings.model_fields_set:
            settings.store.local_root = (out / "store").resolve()
    return settings


def _context(settings):
    from opensubject_tasks.context import Context

    return Context.from_settings(settings)


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
    settings = _settings(args, out)
    from opensubject_tasks.models_cli import require_models  # missing weights: stop before any video

    require_models(settings)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _context(settings)
    build_id = args.build or "default"
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

    console = Console(stderr=False)
    f = Table(title="Stage funnel")
    for k in doc["funnel"]:
        f.add_column(k, justify="right")
    f.add_row(*[str(v) for v in doc["funnel"].values()])
    console.print(f)
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

    out = Path(args.out) if args.out else None
    if out is not None and not (out / "opensubject.db").exists():
        raise CannotRun(f"no build found in {out} (expected {out / 'opensubject.db'})")
    ctx = _context(_settings(args, out))
    doc = funnel(ctx, args.build)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_funnel(doc)
    return EXIT_OK


def cmd_samples_make(args: argparse.Namespace) -> int:
    from opensubject_tasks.media.samples import make_samples

    size = tuple(int(x) for x in args.size.lower().split("x")) if args.size else (640, 360)
    gt = make_samples(Path(args.dir), seed=args.seed, size=size)  # type: ignore[arg-type]
    print(f"sample videos and ground truth written: {gt}")
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from opensubject_tasks.db.engine import make_engine, upgrade

    settings = _settings(args, Path(args.out) if args.out else None)
    applied = upgrade(make_engine(settings.database_url))
    print("schema up to date" + (f"; applied {', '.join(applied)}" if applied else ""))
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    from opensubject_tasks.db.engine import upgrade
    from opensubject_tasks.services.ingest import register_source

    settings = _settings(args, Path(args.out) if args.out else None)
    ctx = _context(settings)
    upgrade(ctx.engine)
    source = args.source if args.source.startswith("store://") else str(Path(args.source).resolve())
    if not source.startswith("store://") and not Path(source).exists():
        raise CannotRun(f"input not found: {args.source}")
    res = register_source(ctx, source, build_id=args.build)
    print(json.dumps({"new": len(res.new_ids), "known": len(res.known_ids),
                      "skipped": [list(s) for s in res.skipped]}))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from opensubject_tasks.services.export import export_build_to

    out = Path(args.out)
    settings = _settings(args, out)
    if args.exclude_bench:
        settings.export.exclude_bench_dirs = [*settings.export.exclude_bench_dirs,
                                              *map(Path, args.exclude_bench)]
    ctx = _context(settings)
    dest = Path(args.dest) if args.dest else out / "dataset"
    res = export_build_to(ctx, args.build, str(dest))
    print(f"exported build {args.build!r} to {dest}: {res}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opensubject", description=__doc__.splitlines()[0])
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

    s = sub.add_parser("status", help="stage funnel and per-video states")
    s.add_argument("--out", help="output folder of an embedded build")
    s.add_argument("--build")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    sm = sub.add_parser("samples", help="sample media").add_subparsers(dest="sub", required=True)
    mk = sm.add_parser("make", help="write sample videos with ground truth")
    mk.add_argument("dir")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--size", help="WIDTHxHEIGHT, default 640x360")
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

    ex = sub.add_parser("export", help="re-export a build from the database (no recompute)")
    ex.add_argument("--build", default="default")
    ex.add_argument("--out", required=True, help="output folder of the build")
    ex.add_argument("--dest", help="export folder (default OUT/dataset)")
    ex.add_argument("--exclude-bench", action="append", metavar="BENCH_DIR", default=[],
                    help="leave out the videos held out by this bench (repeatable; "
                         "also export.exclude_bench_dirs)")
    ex.set_defaults(fn=cmd_export)

    from opensubject_tasks.bench.cli import add_bench_commands
    from opensubject_tasks.models_cli import add_models_commands

    add_bench_commands(sub)
    add_models_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"opensubject: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CannotRun, OpenSubjectError, OSError) as exc:
        print(f"opensubject: cannot run: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except Exception as exc:  # noqa: BLE001 - e.g. database unreachable: say so, no traceback
        if args.verbose:
            raise
        print(f"opensubject: cannot run: {type(exc).__name__}: {exc} (use -v for details)",
              file=sys.stderr)
        return EXIT_CANNOT_RUN


if __name__ == "__main__":
    sys.exit(main())

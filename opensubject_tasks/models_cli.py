"""`opensubject models ...`: the weights a profile needs, fetched and checked before a build.

    opensubject models check [--profile gpu] [--verify]       # one table; exit 1 when something is missing
    opensubject models fetch [--profile gpu] [--endpoint URL] # every weight, resumable, checksummed
    opensubject models lock [--profile gpu] [--endpoint URL]  # pin the hub's current commits in the lock file
    opensubject models calibrate [--profile gpu] [--media DIR] # same-individual threshold of the embedder
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from opensubject_tasks.errors import ModelNotAvailable


def require_models(settings: Any) -> None:
    """Refuse to start a build whose profile lacks weights (or a calibrated threshold),
    naming all of them at once, before any video is touched."""
    from opensubject_tasks.weights import check

    report = check(settings)
    if not report.ok:
        raise ModelNotAvailable(report.missing_text(settings.profile))


def _print_report(report: Any, profile: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Models for profile {profile}")
    for col in ("interface", "model", "state", "size", "where / why"):
        t.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    for s in report.statuses:
        w = s.weight
        pinned = f" (pinned {w.revision[:12]}{', ' + w.variant if w.variant else ''})" if w.revision else ""
        size = s.size if s.state == "present" else w.size
        t.add_row(", ".join(w.interfaces), w.label + pinned, s.state,
                  size_text(size) if size else "", s.detail)
    for p in report.problems:
        t.add_row("verify", p.what, "missing", "", p.detail)
    if not report.statuses and not report.problems:
        t.add_row("-", "(no weights: this profile's backends need none)", "present", "", "")
    Console(width=160).print(t)
    todo, unknown = report.to_fetch()
    total, total_unknown = report.total()
    print(f"To fetch: {size_text(todo)} of {size_text(total)} for profile {profile} (sizes from the lock file "
          f"{_lock_name()})" + (f"; size not in the lock file: {', '.join(unknown)}" if unknown else "")
          + (f"; not counted in the total: {', '.join(total_unknown)}" if total_unknown and not unknown else ""))


def size_text(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _lock_name() -> str:
    from opensubject_tasks import weights

    return weights.LOCK_FILE.name


def cmd_models_check(args: argparse.Namespace) -> int:
    from opensubject_tasks.cli_common import EXIT_CANNOT_RUN, EXIT_OK, _settings
    from opensubject_tasks.weights import check

    settings = _settings(args)
    report = check(settings, verify=args.verify)
    _print_report(report, settings.profile)
    return EXIT_OK if report.ok else EXIT_CANNOT_RUN


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from opensubject_tasks.cli_common import EXIT_CANNOT_RUN, EXIT_OK, CannotRun, _settings
    from opensubject_tasks.weights import Fetcher, fetch

    settings = _settings(args)
    if args.models_dir:
        settings.backends.models_dir = Path(args.models_dir)
    where = Path(settings.backends.models_dir).expanduser()
    if where.exists() and not where.is_dir():
        raise CannotRun(f"the models folder {where} is a file: give a folder (--models-dir or "
                        "OPENSUBJECT_BACKENDS__MODELS_DIR)")
    report = fetch(settings, Fetcher(endpoint=args.endpoint))
    _print_report(report, settings.profile)
    return EXIT_OK if report.ok else EXIT_CANNOT_RUN


def cmd_models_lock(args: argparse.Namespace) -> int:
    from opensubject_tasks.cli_common import EXIT_OK, _settings
    from opensubject_tasks import weights

    pins = weights.lock(_settings(args), weights.Fetcher(endpoint=args.endpoint))
    print(f"{len(pins)} repositories pinned in {weights.LOCK_FILE}")
    return EXIT_OK


def cmd_models_calibrate(args: argparse.Namespace) -> int:
    from opensubject_tasks.calibrate import calibrate, track_crops
    from opensubject_tasks.cli_common import EXIT_OK, _context, _settings
    from opensubject_tasks.config import embedder_key

    settings = _settings(args)
    media = Path(args.media) if args.media else None
    if media is None:
        from opensubject_tasks.testmedia.samples import make_samples

        media = Path(tempfile.mkdtemp(prefix="opensubject-calibrate-"))
        print(f"writing the sample media (seed {args.seed}) to {media} ...")
        make_samples(media, seed=args.seed)
    if not (media / "ground_truth.json").is_file():
        raise ModelNotAvailable(f"{media} has no ground_truth.json (make one with `opensubject samples make`)")
    embedder = _context(settings).backend("embedder")
    result = calibrate(embedder, track_crops(media, mine=settings.mine),
                       centre=settings.verify.same_individual_centre)
    print(f"embedder {result.embedder} on {media}: {result.same} same-track pairs, "
          f"{result.different} different-individual pairs")
    print(f"  same-track cosine      {result.same_quantiles}")
    print(f"  different-individual   {result.different_quantiles}")
    print(f"  threshold {result.threshold:.2f}: keeps {result.same_accuracy:.1%} of same-track pairs, "
          f"rejects {result.different_accuracy:.1%} of different-individual pairs")
    print("Add to your settings (every individual in the sample media is of another category: "
          "the VLM question covers look-alikes of one category):")
    print(f"verify:\n  same_individual_min:\n    {embedder_key(result.embedder)}: {result.threshold:.2f}")
    return EXIT_OK


def add_models_commands(sub: Any) -> None:
    m = sub.add_parser("models", help="model weights: check, fetch, calibrate").add_subparsers(
        dest="sub", required=True)
    profiles = ["cpu", "gpu", "tiny", "small"]

    c = m.add_parser("check", help="table of the profile's weights, present or missing (exit 1 if any missing)")
    c.add_argument("--profile", choices=profiles)
    c.add_argument("--verify", action="store_true", help="also recompute every file's checksum")
    c.set_defaults(fn=cmd_models_check)

    f = m.add_parser("fetch", help="download every weight the profile needs into backends.models_dir")
    f.add_argument("--profile", choices=profiles)
    f.add_argument("--endpoint", help="Hugging Face Hub endpoint (default $HF_ENDPOINT or huggingface.co)")
    f.add_argument("--models-dir", help="override backends.models_dir")
    f.set_defaults(fn=cmd_models_fetch)

    lk = m.add_parser("lock", help="pin the profile's Hub repositories at their current commit (fp16 where "
                                   "published) in the lock file, with their sizes")
    lk.add_argument("--profile", choices=profiles)
    lk.add_argument("--endpoint", help="Hugging Face Hub endpoint (default $HF_ENDPOINT or huggingface.co)")
    lk.set_defaults(fn=cmd_models_lock)

    k = m.add_parser("calibrate", help="same-individual threshold of the profile's embedder, on "
                                       "ground-truth tracks")
    k.add_argument("--profile", choices=profiles)
    k.add_argument("--media", help="folder from `opensubject samples make` (default: made now)")
    k.add_argument("--seed", type=int, default=0, help="seed of the sample media made when --media is not given")
    k.set_defaults(fn=cmd_models_calibrate)

"""What every `opensubject` subcommand shares: exit codes, one-line errors, settings from
--config/--out, and the checks that turn a wrong argument into a sentence."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from opensubject_tasks.errors import OpenSubjectError

EXIT_OK, EXIT_CANNOT_RUN, EXIT_USAGE = 0, 1, 2


class CannotRun(OpenSubjectError):
    """The command cannot start; the message says why."""


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, with where to look (argparse prints the whole usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


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


def _existing_out(value: str | None, flag: str = "--out", args: argparse.Namespace | None = None) -> Path | None:
    """The output folder of a build, which must hold its database unless one is configured
    (``OPENSUBJECT_DATABASE_URL`` or --config), as ``run --out`` uses it."""
    if value is None:
        return None
    out = Path(value)
    if out.is_dir() and _database_configured(args):
        return out
    if not (out / "opensubject.db").is_file():
        what = "does not exist" if not out.exists() else "holds no build (no opensubject.db)"
        raise CannotRun(f"{flag} {value} {what}: give the folder an `opensubject run ... --out` wrote")
    return out


def _database_configured(args: argparse.Namespace | None) -> bool:
    from opensubject_tasks.config import load_settings

    return "database_url" in load_settings(getattr(args, "config", None)).model_fields_set


def _existing_database(settings, flag: str = "--out") -> None:  # noqa: ANN001
    """A configured SQLite database must exist already (it is never created by a reader)."""
    url = settings.database_url
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        path = make_url(url).database
        if path and path != ":memory:" and not Path(path).is_file():
            raise CannotRun(f"no database at {path}: pass {flag} OUT (the folder of an embedded build) "
                            "or set OPENSUBJECT_DATABASE_URL")


def _name(value: str, flag: str) -> str:
    """A build name, refusing what is plainly a path."""
    if "/" in value or value in (".", "..") or Path(value).is_dir():
        raise CannotRun(f"{flag} takes a build name, not a folder (got {value!r}); "
                        "`opensubject status --out OUT` lists the builds")
    return value


def _known_build(ctx, build: str, flag: str = "--build") -> str:  # noqa: ANN001
    from sqlalchemy import select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Build

    with session_scope(ctx.sessions) as s:
        names = list(s.scalars(select(Build.id).order_by(Build.id)))
    if build not in names:
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        raise CannotRun(f"{flag}: no build named {build!r} in this database"
                        + (f" (builds: {shown})" if names else " (it holds no build yet)"))
    return build

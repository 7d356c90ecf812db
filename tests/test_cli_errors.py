"""Every CLI error is one sentence: each subcommand, given a missing path, a path where a
name is expected, an unknown build or video, or a database that does not exist, answers
with one line that names the thing and what to do, and its documented exit code (1: cannot
run, 2: usage) — no traceback, no library's documentation link.

``python tests/test_cli_errors.py`` prints the table of cases with the actual messages.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest

from opensubject_tasks.cli import main

# (case, argv with {out} = an embedded build, {empty} = a folder without one, {file} = a
# plain file, {nope} = a path that does not exist), exit code, words the message must hold
CASES = [
    ("run: missing input", ["run", "{nope}", "--out", "{empty}/o"], 1, "input not found"),
    ("run: --out is a file", ["run", "{empty}", "--out", "{file}"], 1, "is a file"),
    ("run: path as build name", ["run", "{empty}", "--out", "{empty}/o", "--build", "{out}"], 1,
     "takes a build name, not a folder"),
    ("run: unknown profile", ["run", "{empty}", "--out", "{empty}/o", "--profile", "big"], 2, "invalid choice"),
    ("status: missing --out", ["status", "--out", "{nope}"], 1, "does not exist"),
    ("status: --out without a build", ["status", "--out", "{empty}"], 1, "holds no build"),
    ("status: unknown build", ["status", "--out", "{out}", "--build", "other"], 1, "no build named 'other'"),
    ("status: path as build name", ["status", "--out", "{out}", "--build", "{out}"], 1, "takes a build name"),
    ("status: no database", ["status"], 1, "no database at"),
    ("export: missing --out", ["export", "--out", "{nope}"], 1, "does not exist"),
    ("export: unknown build", ["export", "--out", "{out}", "--build", "other"], 1, "no build named 'other'"),
    ("export: path as build name", ["export", "--out", "{out}", "--build", "{out}/"], 1, "takes a build name"),
    ("ingest: missing source", ["ingest", "{nope}", "--out", "{empty}/o"], 1, "input not found"),
    ("ingest: path as build name", ["ingest", "{empty}", "--out", "{empty}/o", "--build", "a/b"], 1,
     "takes a build name"),
    ("rerun: missing --out", ["rerun", "curate", "v1", "--out", "{nope}"], 1, "does not exist"),
    ("rerun: unknown video", ["rerun", "mine", "v1", "--out", "{out}"], 1, "no video with id 'v1'"),
    ("rerun: unknown stage", ["rerun", "export", "v1", "--out", "{out}"], 2, "invalid choice"),
    ("rerun: no database", ["rerun", "curate", "v1"], 1, "no database at"),
    ("db upgrade: --out under a file", ["db", "upgrade", "--out", "{file}/o"], 1, "Not a directory"),
    ("samples make: a file as folder", ["samples", "make", "{file}"], 1, "{file}"),
    ("bench build: path as build name", ["bench", "build", "--from", "{out}", "--db-out", "{out}",
                                         "--out", "{empty}/b"], 1, "--from takes a build name"),
    ("bench build: unknown build", ["bench", "build", "--from", "other", "--db-out", "{out}",
                                    "--out", "{empty}/b"], 1, "no build named 'other'"),
    ("bench build: missing --db-out", ["bench", "build", "--from", "default", "--db-out", "{nope}",
                                       "--out", "{empty}/b"], 1, "--db-out"),
    ("bench build: no database", ["bench", "build", "--from", "default", "--out", "{empty}/b"], 1,
     "no database at"),
    ("bench baseline: not a bench", ["bench", "baseline", "copy-input", "--bench", "{empty}",
                                     "--out", "{empty}/p"], 1, "not a bench directory"),
    ("bench score: not a bench", ["bench", "score", "--bench", "{nope}", "--predictions", "{empty}"], 1,
     "not a bench directory"),
    ("models check: unknown profile", ["models", "check", "--profile", "big"], 2, "invalid choice"),
    ("models calibrate: missing media", ["models", "calibrate", "--media", "{nope}"], 1, "{nope}"),
    ("models fetch: a file as models folder", ["models", "fetch", "--profile", "small", "--models-dir", "{file}"],
     1, "{file} is a file"),
    ("models fetch: hub unreachable", ["models", "fetch", "--profile", "small", "--models-dir", "{empty}/m",
                                       "--endpoint", "http://127.0.0.1:9"], 1, "cannot reach http://127.0.0.1:9"),
    ("missing required option", ["export", "--build", "default"], 2, "--out"),
    ("unknown command", ["frobnicate"], 2, "invalid choice"),
]


def make_places(root: Path) -> dict[str, str]:
    """An embedded database holding one build and nothing else, an empty folder, a file."""
    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import upgrade
    from opensubject_tasks.services.ingest import ensure_build

    out, empty = root / "out", root / "empty"
    out.mkdir()
    empty.mkdir()
    (root / "file.txt").write_text("not a folder")
    ctx = Context.from_settings(load_settings(database_url=f"sqlite:///{out / 'opensubject.db'}",
                                              store={"kind": "local", "local_root": str(out / "store")}))
    upgrade(ctx.engine)
    ensure_build(ctx, "default", {}, "cpu")
    ctx.engine.dispose()
    return {"out": str(out), "empty": str(empty), "file": str(root / "file.txt"), "nope": str(root / "nope")}


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    return make_places(tmp_path_factory.mktemp("cli-errors"))


def run_case(argv: list[str], places: dict[str, str]) -> tuple[int, str]:
    args = [a.format(**places) for a in argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, err.getvalue()


@pytest.mark.parametrize(("case", "argv", "code", "words"), CASES, ids=[c[0] for c in CASES])
def test_every_cli_error_is_one_sentence(case, argv, code, words, places, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default database (out/opensubject.db) is not here
    for k in [k for k in os.environ if k.startswith("OPENSUBJECT_")]:
        monkeypatch.delenv(k)
    got, err = run_case(argv, places)
    lines = err.strip().splitlines()
    assert got == code, (case, err)
    assert len(lines) == 1, (case, err)
    assert words.format(**places) in lines[0], (case, lines[0])
    assert "Traceback" not in err and "sqlalche.me" not in err
    # no library's documentation link: any address shown is one the user gave
    import re

    assert all(any(u.rstrip(")") in a for a in argv) for u in re.findall(r"https?://\S+", err)), err


def test_a_database_that_does_not_exist_on_the_server(pg_url, monkeypatch, places, tmp_path):
    from sqlalchemy.engine import make_url

    monkeypatch.chdir(tmp_path)
    missing = make_url(pg_url).set(database="opensubject_no_such_db").render_as_string(hide_password=False)
    monkeypatch.setenv("OPENSUBJECT_DATABASE_URL", missing)
    for argv in (["status"], ["rerun", "curate", "v1"], ["db", "upgrade"]):
        code, err = run_case(argv, places)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert "database does not exist" in err and "opensubject_no_such_db" in err, err


def test_verbose_shows_the_details(places, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="no video with id"):
        main(["-v", "rerun", "mine", "v1", "--out", places["out"]])


if __name__ == "__main__":  # the table for the docs
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    where = make_places(tmp)
    os.chdir(where["empty"])  # no out/opensubject.db (the default database) here
    print("| case | command | exit | message |\n|---|---|---|---|")
    for case, argv, _code, _words in CASES:
        code, err = run_case(argv, where)
        msg = err.strip().replace(str(tmp), "…").replace("|", "\\|")
        print(f"| {case} | `opensubject {' '.join(argv)}` | {code} | {msg} |")
    sys.exit(0)


def test_commands_taking_out_use_the_configured_database(pg_db, tmp_path, monkeypatch):
    """`run --out DIR` with OPENSUBJECT_DATABASE_URL naming PostgreSQL keeps its rows there
    (DIR holds the store and dataset only): status, export and rerun with the same --out
    read that database instead of refusing a folder without opensubject.db."""
    import json

    from opensubject_tasks.testmedia.samples import tiny_video

    media, out = tmp_path / "media", tmp_path / "out"
    media.mkdir()
    tiny_video(media / "one.mp4", 1)
    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith("OPENSUBJECT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("OPENSUBJECT_DATABASE_URL", pg_db)
    monkeypatch.setenv("OPENSUBJECT_CURATE__MIN_SHORT_SIDE", "64")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(media), "--out", str(out), "--until", "curate", "--quiet"]) == 0
    assert not (out / "opensubject.db").exists()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["status", "--out", str(out), "--json"]) == 0
    doc = json.loads(printed.getvalue())
    [video] = doc["videos"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["rerun", "curate", video["id"], "--out", str(out)]) == 0
        assert main(["export", "--out", str(out), "--build", "default"]) == 0
    assert (out / "dataset").is_dir()
    # without a configured database the folder must still hold one
    monkeypatch.delenv("OPENSUBJECT_DATABASE_URL")
    code, err = run_case(["status", "--out", str(out)], {})
    assert code == 1 and "holds no build (no opensubject.db)" in err

"""Security: configured secrets stay out of logs, task results, rows and the dataset's
report; no shell is ever run, let alone with user data; ruff's security rules pass.

(Object keys from hostile names: tests/test_storage.py; presigned URL expiry:
tests/test_storage.py; dashboard tokens: tests/test_dashboard.py.)
"""
from __future__ import annotations

import ast
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from fault_fixtures import drive_build

REPO = Path(__file__).resolve().parents[1]
PRODUCT_CODE = ("opensubject_tasks", "dags", "plugins")

# Distinctive values: any occurrence is a leak. The database password carries characters
# a URL must percent-encode, so both spellings are looked for.
DB_PASSWORD = "pw@Db-7Hq2/x"
ACCESS_KEY = "AKIA-OS-SECRET-3F9Q"
SECRET_KEY = "sk-os-secret-key-Zr81vB"
SECRETS = (DB_PASSWORD, quote(DB_PASSWORD, safe=""), ACCESS_KEY, SECRET_KEY)


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


@pytest.mark.timeout(300)
def test_secrets_never_reach_logs_results_rows_or_report(stack, pg_db, s3_server, tmp_path):
    """A build with a password in the database URL and store credentials, a worker logging
    at DEBUG, a video that fails with an error: none of the secrets appears in the worker's
    log, the task outcome rows, any row of the database or any object the build wrote."""
    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.engine import make_url

    from opensubject_tasks.config import StoreSettings
    from disk_cache import sample_videos

    sample_videos(tmp_path / "media", count=1, size=(320, 180))
    url = make_url(pg_db).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    assert quote(DB_PASSWORD, safe="") in url  # the URL really carries it (trust auth ignores it)
    store_settings = StoreSettings(kind="minio", endpoint=s3_server.endpoint, access_key=ACCESS_KEY,
                                   secret_key=SECRET_KEY, bucket=f"t-{uuid.uuid4().hex[:12]}")
    env = stack.apply(url, store_settings)
    for f in (tmp_path / "media").glob("*.mp4"):
        stack.store.put_file(f"raw/{f.name}", f, "video/mp4")
    stack.store.put_bytes("raw/notes.mp4", b"not a video at all\n", "video/mp4")
    worker = stack.worker(env, "secrets", concurrency=1, loglevel="DEBUG")

    run = drive_build("secrets", timeout_s=240)

    assert run.videos and "failed" in run.videos.values()  # the error path ran too
    log = worker.log()
    assert "Task opensubject.curate[" in log and "DEBUG" in log
    assert leaks(log) == []

    engine = create_engine(pg_db)
    with engine.connect() as c:
        tables = inspect(c).get_table_names()
        assert "task_outcomes" in tables
        dumped = {t: "\n".join(str(r) for r in c.execute(text(f'SELECT * FROM "{t}"'))) for t in tables}
    engine.dispose()
    assert "success" in dumped["task_outcomes"]  # the outcomes the orchestrator read are there
    assert {t: leaks(v) for t, v in dumped.items() if leaks(v)} == {}

    written = [k for k in (o.key for o in stack.store.list("")) if not k.startswith("raw/")]
    assert "datasets/secrets/report.html" in written and "datasets/secrets/stats.json" in written
    found = {k: leaks(stack.store.get_bytes(k).decode("utf-8", "replace")) for k in written}
    assert {k: v for k, v in found.items() if v} == {}


# --- no shell -------------------------------------------------------------------------------------
SHELL_CALLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput", "pty.spawn",
               "commands.getoutput"}
SUBPROCESS_CALLS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
                    "subprocess.check_output"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def shell_uses(path: Path, root: Path = REPO) -> list[str]:
    """Calls that run a shell, or a process from a command string, in one file."""
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, str] = {}  # from subprocess import run as r -> r: subprocess.run
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "subprocess", "pty", "commands"):
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        name = aliases.get(name, name)
        where = f"{path.relative_to(root)}:{node.lineno} {name}"
        if name in SHELL_CALLS or name.startswith(("os.exec", "os.spawn")):
            out.append(where)
        elif any(kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False)
                 for kw in node.keywords):
            out.append(f"{where} shell=")
        elif name in SUBPROCESS_CALLS and not (node.args and isinstance(node.args[0], (ast.List, ast.Tuple))):
            out.append(f"{where} without an argument list")
    return out


def test_no_shell_in_product_code():
    files = [p for d in PRODUCT_CODE for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 30
    assert [u for p in files for u in shell_uses(p)] == []


def test_shell_check_finds_what_it_must(tmp_path):
    """The scan above is not blind: it flags each form of shell use."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os, subprocess\nfrom subprocess import check_output as co\n"
                   "os.system('ls ' + name)\nsubprocess.run(f'ffprobe {name}', shell=True)\n"
                   "co('ffmpeg -i ' + name)\nos.execvp('sh', ['sh'])\nsubprocess.run(['ffprobe', name])\n")
    found = shell_uses(bad, tmp_path)
    assert [f.split(" ", 1)[1] for f in found] == [
        "os.system", "subprocess.run shell=", "subprocess.check_output without an argument list", "os.execvp"]


def test_ruff_security_rules_pass():
    """ruff's flake8-bandit rules (S) over the product code, as CI runs them."""
    out = subprocess.run([str(Path(sys.executable).parent / "ruff"), "check", "--select", "S",
                          "--ignore", "S101,S311", *PRODUCT_CODE], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr

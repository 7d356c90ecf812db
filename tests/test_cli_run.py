"""The embedded product end to end through its command line: run, status, resume,
parallel jobs, exit codes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opensubject_tasks.cli import main

OPENSUBJECT = [sys.executable, "-m", "opensubject_tasks.cli"]


def _subset(sample_media: Path, dest: Path, n: int) -> Path:
    """A folder with the first n sample videos (the run takes folders)."""
    gt = json.loads((sample_media / "ground_truth.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    good = [v for v in gt["videos"] if not v.get("bad")]
    for v in good[:n]:
        shutil.copy(sample_media / v["file"], dest / v["file"])
    return dest


def _dataset_digest(out: Path) -> dict[str, str]:
    """Hashes of every exported file that must not depend on timing."""
    ds = out / "dataset"
    skip = {"stats.json", "report.html"}  # carry throughput/timestamps
    root = str(ds.resolve()).encode()     # the OmniGen2 records hold the folder's absolute path
    return {str(p.relative_to(ds)): hashlib.sha256(p.read_bytes().replace(root, b"<root>")).hexdigest()
            for p in sorted(ds.rglob("*")) if p.is_file() and p.name not in skip}


def _status(out: Path) -> dict:
    proc = subprocess.run([*OPENSUBJECT, "status", "--out", str(out), "--json"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def full_run(sample_media: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run_full")
    proc = subprocess.run([*OPENSUBJECT, "run", str(sample_media), "--out", str(out), "--jobs", "2",
                           "--progress"], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "run.stderr").write_text(proc.stderr)
    return out


def test_run_produces_dataset_and_status(full_run: Path, sample_media: Path) -> None:
    doc = _status(full_run)
    gt = json.loads((sample_media / "ground_truth.json").read_text())
    assert doc["funnel"]["videos"] == len(gt["videos"])
    # every video in a terminal state with a reason when not done
    for v in doc["videos"]:
        assert v["state"] in ("done", "rejected", "failed"), v
        if v["state"] != "done":
            assert v["reason"], v
    f = doc["funnel"]
    assert f["clips"] > 0 and f["subjects"] > 0 and f["pairs"] > 0
    assert f["samples"] == f["verified"] + f["rejected"]
    assert f["verified"] > 0
    ds = full_run / "dataset"
    assert list(ds.glob("shard-*.tar")) and (ds / "manifest.parquet").exists()
    assert (ds / "stats.json").exists() and (ds / "report.html").exists()
    assert (full_run / "contact_sheet.png").stat().st_size > 1000


def test_progress_bars_count_every_unit_of_each_stage(full_run: Path) -> None:
    """The bars' totals grow as follow-up units appear and end at what each stage ran."""
    import re

    bars = {m[1]: (int(m[2]), int(m[3])) for m in
            re.finditer(r"^(curate|mine|samples)\s.*?(\d+)/(\d+)", (full_run / "run.stderr").read_text(),
                         re.MULTILINE)}
    assert set(bars) == {"curate", "mine", "samples"}, bars
    assert all(done == total for done, total in bars.values()), bars
    con = sqlite3.connect(full_run / "opensubject.db")
    try:
        ran = dict(con.execute("SELECT stage, COUNT(*) FROM stage_attempts GROUP BY stage").fetchall())
    finally:
        con.close()
    assert {st: total for st, (_, total) in bars.items()} == {st: ran[st] for st in bars}


def test_status_json_shape(full_run: Path) -> None:
    doc = _status(full_run)
    assert set(doc["funnel"]) >= {"videos", "clips", "subjects", "pairs", "samples",
                                  "verified", "rejected"}
    for v in doc["videos"]:
        assert {"name", "state", "reason", "clips"} <= set(v)
        for a, b in v["clips"]:
            assert 0 <= a < b


def test_parallel_workers_do_not_wait_for_a_whole_stage(full_run: Path) -> None:
    """With two workers, samples of mined videos are synthesized while the last videos
    are still being mined: no worker idles at the end of a stage."""
    with sqlite3.connect(full_run / "opensubject.db") as con:
        last_mine_end = con.execute("SELECT max(finished_at) FROM stage_attempts WHERE stage = 'mine'").fetchone()[0]
        first_synth = con.execute("SELECT min(started_at) FROM stage_attempts WHERE stage = 'synthesize'").fetchone()[0]
    assert first_synth < last_mine_end


@pytest.mark.slow
def test_jobs_and_resume_give_the_same_dataset(sample_media: Path, tmp_path: Path) -> None:
    media = _subset(sample_media, tmp_path / "media", 3)
    ref = tmp_path / "ref"
    assert main(["run", str(media), "--out", str(ref), "--jobs", "1", "--quiet"]) == 0
    par = tmp_path / "par"
    assert main(["run", str(media), "--out", str(par), "--jobs", "2", "--quiet"]) == 0
    assert _dataset_digest(par) == _dataset_digest(ref)

    # Kill a run once some samples are synthesized, run again: same dataset.
    out = tmp_path / "killed"
    proc = subprocess.Popen([*OPENSUBJECT, "run", str(media), "--out", str(out), "--jobs", "1",
                             "--quiet"], start_new_session=True)
    db = out / "opensubject.db"
    deadline = time.monotonic() + 600
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if not db.exists():
            continue
        try:
            with sqlite3.connect(db, timeout=1) as con:
                n = con.execute("SELECT count(*) FROM samples WHERE state != 'pending'").fetchone()[0]
        except sqlite3.Error:
            continue
        if n >= 1:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait(30)
    assert killed, "the run finished before it could be interrupted"
    assert main(["run", str(media), "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    assert _dataset_digest(out) == _dataset_digest(ref)
    with sqlite3.connect(out / "opensubject.db") as con:
        dup = con.execute("SELECT count(*) - count(DISTINCT pair_id) FROM samples").fetchone()[0]
    assert dup == 0


def test_cannot_run_exits_nonzero_with_reason(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "input not found" in capsys.readouterr().err


def test_invalid_config_names_the_field(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("OPENSUBJECT_CURATE__MIN_SHORT_SIDE", "-5")
    assert main(["run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "curate.min_short_side" in capsys.readouterr().err


def test_bench_on_the_sample_build(full_run: Path, tmp_path: Path) -> None:
    """Benchmark split of the real sample build, baselines, and scoring."""
    bench = tmp_path / "bench"
    assert main(["bench", "build", "--from", "default", "--db-out", str(full_run),
                 "--out", str(bench), "--share", "0.5"]) == 0
    cases = [json.loads(line) for line in (bench / "cases.jsonl").read_text().splitlines()]
    assert {c["task"] for c in cases} == {"generation", "manipulation"}
    summaries = {}
    for name in ("copy-input", "paste-reference"):
        preds = tmp_path / name
        assert main(["bench", "baseline", name, "--bench", str(bench), "--out", str(preds)]) == 0
        out = tmp_path / f"scores-{name}"
        assert main(["bench", "score", "--bench", str(bench), "--predictions", str(preds),
                     "--out", str(out)]) == 0
        summaries[name] = json.loads((out / "summary.json").read_text())
    assert summaries["copy-input"] and summaries["paste-reference"]


@pytest.mark.slow
def test_tiny_profile_end_to_end(sample_media: Path, tmp_path: Path, monkeypatch) -> None:
    """The hf code path with tiny random models, offline on CPU, through every stage.
    Outputs are meaningless; the plumbing is real."""
    media = _subset(sample_media, tmp_path / "media", 1)
    monkeypatch.setenv("OPENSUBJECT_MINE__MAX_PAIRS_PER_SUBJECT", "1")
    monkeypatch.setenv("OPENSUBJECT_VERIFY__MAX_ATTEMPTS", "1")
    out = tmp_path / "tiny"
    assert main(["run", str(media), "--out", str(out), "--profile", "tiny", "--jobs", "1",
                 "--quiet"]) == 0
    doc = _status(out)
    assert doc["funnel"]["samples"] > 0
    # every sample reached a terminal state through the tiny VLM verifier
    assert doc["funnel"]["samples"] == doc["funnel"]["verified"] + doc["funnel"]["rejected"]
    with sqlite3.connect(out / "opensubject.db") as con:
        backends = [json.loads(b) for (b,) in con.execute("SELECT backends FROM samples")]
        subj = [json.loads(b) for (b,) in con.execute("SELECT backends FROM subjects")]
    assert all("tiny" in json.dumps(b) or "hf:" in json.dumps(b) for b in backends), backends[:2]
    assert subj

"""The embedded product end to end through its command line, beyond one run: parallel
jobs and a killed run resumed give the same dataset; the tiny-model profile through every
stage."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import OPENSUBJECT, dataset_digest, status, subset

from opensubject_tasks.cli import main


@pytest.mark.slow
def test_jobs_and_resume_give_the_same_dataset(sample_media: Path, tmp_path: Path) -> None:
    media = subset(sample_media, tmp_path / "media", 2)
    ref = tmp_path / "ref"
    assert main(["run", str(media), "--out", str(ref), "--jobs", "1", "--quiet"]) == 0
    par = tmp_path / "par"
    assert main(["run", str(media), "--out", str(par), "--jobs", "2", "--quiet"]) == 0
    assert dataset_digest(par) == dataset_digest(ref)

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
    assert dataset_digest(out) == dataset_digest(ref)
    with sqlite3.connect(out / "opensubject.db") as con:
        dup = con.execute("SELECT count(*) - count(DISTINCT pair_id) FROM samples").fetchone()[0]
    assert dup == 0


@pytest.mark.slow
def test_tiny_profile_end_to_end(sample_media: Path, tmp_path: Path, monkeypatch) -> None:
    """The hf code path with tiny random models, offline on CPU, through every stage.
    Outputs are meaningless; the plumbing is real."""
    media = subset(sample_media, tmp_path / "media", 1)
    monkeypatch.setenv("OPENSUBJECT_MINE__MAX_PAIRS_PER_SUBJECT", "1")
    monkeypatch.setenv("OPENSUBJECT_VERIFY__MAX_ATTEMPTS", "1")
    out = tmp_path / "tiny"
    assert main(["run", str(media), "--out", str(out), "--profile", "tiny", "--jobs", "1",
                 "--quiet"]) == 0
    doc = status(out)
    assert doc["funnel"]["samples"] > 0
    # every sample reached a terminal state through the tiny VLM verifier
    assert doc["funnel"]["samples"] == doc["funnel"]["verified"] + doc["funnel"]["rejected"]
    with sqlite3.connect(out / "opensubject.db") as con:
        backends = [json.loads(b) for (b,) in con.execute("SELECT backends FROM samples")]
        subj = [json.loads(b) for (b,) in con.execute("SELECT backends FROM subjects")]
    assert all("tiny" in json.dumps(b) or "hf:" in json.dumps(b) for b in backends), backends[:2]
    assert subj

"""The embedded product end to end through its command line: one 8-video run with two
jobs (dataset, status, progress bars, the benchmark built from it) and exit codes
(tests/test_cli_resume.py: parallel jobs and resume)."""
from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cli_helpers import OPENSUBJECT, status

from opensubject_tasks.cli import main


@pytest.fixture(scope="module")
def full_run(sample_media: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run_full")
    proc = subprocess.run([*OPENSUBJECT, "run", str(sample_media), "--out", str(out), "--jobs", "2",
                           "--progress"], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "run.stderr").write_text(proc.stderr)
    return out


def test_run_produces_dataset_and_status(full_run: Path, sample_media: Path) -> None:
    doc = status(full_run)
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
    doc = status(full_run)
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

"""Every surface reads the same counts: `opensubject status --json`, stats.json, the HTML
report, the dashboard's data and the Airflow report task, on one build (with a rejected
video, re-synthesized and rejected samples, and an input recorded as a duplicate)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from opensubject_tasks.cli import main


@pytest.mark.slow
def test_all_surfaces_agree_on_one_build(sample_media: Path, tmp_path: Path, monkeypatch, capsys):
    gt = json.loads((sample_media / "ground_truth.json").read_text())
    media = tmp_path / "media"
    media.mkdir()
    for v in [v for v in gt["videos"] if not v.get("bad")][:3]:
        shutil.copy(sample_media / v["file"], media / v["file"])
    first = sorted(media.glob("*.mp4"))[0]
    shutil.copy(first, media / f"copy-of-{first.name}")           # a byte-identical input
    (media / "broken.mp4").write_bytes(b"not a video at all")       # a failed input
    out = tmp_path / "out"
    monkeypatch.setenv("OPENSUBJECT_VERIFY__MAX_ATTEMPTS", "2")
    assert main(["run", str(media), "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    capsys.readouterr()

    assert main(["status", "--out", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    stats = json.loads((out / "dataset" / "stats.json").read_text())
    report = (out / "dataset" / "report.html").read_text()
    report_funnel = {m.group(1): int(m.group(2)) for m in
                     re.finditer(r'data-step="(\w+)" data-count="(\d+)"', report)}

    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.dashboard.data import summary
    from opensubject_tasks.orchestrate import build_report

    ctx = Context.from_settings(load_settings(database_url=f"sqlite:///{out / 'opensubject.db'}",
                                              store={"kind": "local", "local_root": str(out / "store")}))
    dashboard = summary(ctx, "default")
    dashboard_funnel = {f["stage"]: f["count"] for f in dashboard["funnel"]}
    monkeypatch.setenv("OPENSUBJECT_DATABASE_URL", f"sqlite:///{out / 'opensubject.db'}")
    airflow = build_report("default")

    funnel = status["funnel"]
    assert funnel == stats["funnel"] == report_funnel == dashboard_funnel == airflow["funnel"]
    # the build covers every case the counts must agree on
    assert funnel["duplicates"] == 1 and funnel["inputs"] == funnel["videos"] + 1 == 5
    assert funnel["samples"] == funnel["verified"] + funnel["rejected"] and funnel["verified"] > 0
    assert stats["states"]["videos"] == airflow["videos_by_state"] and "failed" in airflow["videos_by_state"]
    assert stats["states"]["samples"] == airflow["samples_by_state"] == dashboard["samples_by_state"]
    assert [d["name"] for d in status["duplicates"]] == [f"copy-of-{first.name}"] == \
        [d["name"] for d in stats["duplicates"]] == [d["name"] for d in dashboard["duplicates"]]
    assert f"copy-of-{first.name}" in report
    ctx.engine.dispose()

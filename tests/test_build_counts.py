"""The counts PostgreSQL keeps per build (sql/008_build_counts.sql) equal the rows counted
again: after a small real build with a failed video and a duplicate input, after a
``rerun --recompute`` that deletes and makes its later work again, and after a rejected
sample; the dashboard and `status` show them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select, text

from opensubject_tasks.cli import main

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _kept_and_counted(ctx, build_id):  # noqa: ANN001, ANN202
    from opensubject_tasks import readmodel
    from opensubject_tasks.db.engine import session_scope

    with session_scope(ctx.sessions) as s:
        return readmodel.counts(s, build_id), readmodel.counted_from_rows(s, build_id)


def _assert_exact(ctx, build_id):  # noqa: ANN001, ANN202
    kept, counted = _kept_and_counted(ctx, build_id)
    assert kept == counted, {k: (kept.get(k), counted.get(k)) for k in kept.keys() | counted.keys()
                             if kept.get(k) != counted.get(k)}
    everything_kept, everything_counted = _kept_and_counted(ctx, None)
    assert everything_kept == everything_counted
    return kept


def test_kept_counts_equal_the_rows_through_a_build_a_recompute_and_a_rejection(
        sample_media: Path, tmp_path: Path, pg_db, monkeypatch, capsys):  # noqa: ANN001
    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.dashboard.data import summary
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Sample, Video

    gt = json.loads((sample_media / "ground_truth.json").read_text())
    media = tmp_path / "media"
    media.mkdir()
    good = next(v for v in gt["videos"] if not v.get("bad"))
    shutil.copy(sample_media / good["file"], media / good["file"])
    shutil.copy(sample_media / good["file"], media / f"copy-of-{good['file']}")   # a duplicate input
    (media / "broken.mp4").write_bytes(b"not a video at all")                    # a failed video
    out = tmp_path / "out"
    monkeypatch.setenv("OPENSUBJECT_DATABASE_URL", pg_db)
    monkeypatch.setenv("OPENSUBJECT_VERIFY__MAX_ATTEMPTS", "2")
    assert main(["run", str(media), "--out", str(out), "--jobs", "1", "--quiet", "--build", "small"]) == 0
    ctx = Context.from_settings(load_settings(database_url=pg_db,
                                              store={"kind": "local", "local_root": str(out / "store")}))
    try:
        kept = _assert_exact(ctx, "small")
        assert kept[("videos", "failed")] == 1 and kept[("duplicates", "")] == 1
        assert kept[("pairs", "")] > 0 and sum(n for (k, _), n in kept.items() if k == "samples") > 0
        assert any(k.startswith("attempts:") for k, _ in kept)

        # a recompute deletes the video's subjects, pairs and samples and the build makes them again
        with session_scope(ctx.sessions) as s:
            vid = s.scalar(select(Video.id).where(Video.state == "done"))
        capsys.readouterr()
        assert main(["rerun", "mine", vid, "--out", str(out), "--recompute", "--reason", "counts"]) == 0
        _assert_exact(ctx, "small")
        assert main(["run", str(media), "--out", str(out), "--jobs", "1", "--quiet", "--build", "small"]) == 0
        _assert_exact(ctx, "small")

        # a sample rejected on its second attempt moves between states, attempts and reasons
        with session_scope(ctx.sessions) as s:
            sample = s.scalars(select(Sample).where(Sample.build_id == "small").order_by(Sample.id)).first()
            sample.state, sample.attempt, sample.reason = "rejected", 2, "identity not preserved"
        kept = _assert_exact(ctx, "small")
        assert kept[("sample_reason:rejected", "identity not preserved")] >= 1
        assert kept[("resynthesized", "")] >= 1

        # the surfaces read them: the dashboard and `status` (the most recent build by default)
        doc = summary(ctx, "small")
        funnel = {f["stage"]: f["count"] for f in doc["funnel"]}
        assert funnel["videos"] == sum(n for (k, _), n in kept.items() if k == "videos") == 2
        assert {"reason": "identity not preserved", "state": "rejected", "count":
                kept[("sample_reason:rejected", "identity not preserved")]} in doc["sample_rejections"]
        capsys.readouterr()
        assert main(["status", "--out", str(out), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["build"] == "small" and status["funnel"] == funnel and len(status["videos"]) == 2
        with ctx.engine.connect() as c:   # every change folded: nothing left to fold
            assert c.scalar(text("SELECT count(*) FROM build_count_deltas")) == 0
    finally:
        ctx.engine.dispose()

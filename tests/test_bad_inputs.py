"""Each bad input ends failed or rejected with a readable reason; the others finish."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy import select

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.models import Clip, StageAttempt, Video
from opensubject_tasks.testmedia.samples import HOSTILE_NAME, make_bad_samples
from opensubject_tasks.services.common import run_stage
from opensubject_tasks.storage.sources import file_uri


def test_bad_inputs_through_the_stage_shell(embedded_settings, sample_media: Path, tmp_path: Path):
    bad = tmp_path / "bad"
    make_bad_samples(bad)
    expect = {e["file"]: e["expect"] for e in json.loads((bad / "bad_inputs.json").read_text())["inputs"]}
    good = ["cat_pan_cut.mp4", "static_scene.mp4"]
    paths = [bad / name for name in expect] + [sample_media / g for g in good]
    expect.update({g: "ok" for g in good})

    ctx = Context.from_settings(embedded_settings)
    upgrade(ctx.engine)
    ids: dict[str, str] = {}
    with session_scope(ctx.sessions) as s:
        for p in paths:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            ids[p.name] = digest[:32]
            s.add(Video(id=digest[:32], content_hash=digest, source_uri=file_uri(p), name=p.name,
                        size_bytes=p.stat().st_size))
    # a registered video whose file has gone away
    gone = tmp_path / "gone.mp4"
    with session_scope(ctx.sessions) as s:
        s.add(Video(id="0" * 32, content_hash="gone", source_uri=file_uri(gone), name=gone.name))
    ids[gone.name], expect[gone.name] = "0" * 32, "failed"

    results = {name: run_stage(ctx, "curate", vid) for name, vid in ids.items()}

    with session_scope(ctx.sessions) as s:
        rows = {v.name: (v.state, v.reason) for v in s.scalars(select(Video))}
        attempts = s.scalars(select(StageAttempt)).all()
        clips = {vid: s.scalars(select(Clip).where(Clip.video_id == vid)).all() for vid in ids.values()}
    assert len(attempts) == len(ids) and all(a.finished_at is not None for a in attempts)
    for name, want in expect.items():
        state, reason = rows[name]
        res = results[name]
        if want == "ok":
            assert (res.status, state, reason) == ("ok", "running", None), (name, res.reason)
            assert res.next == [("mine", ids[name])]
            assert any(c.state == "kept" for c in clips[ids[name]])
            continue
        assert (res.status, state) == (want, want), (name, res.status, state, reason)
        assert reason and reason == res.reason and "Traceback" not in reason, name
        assert 10 < len(reason) < 1000 and reason.isprintable(), (name, reason)
        assert not any(c.state == "kept" for c in clips[ids[name]])

    assert rows["empty.mp4"][1] == "empty file (0 bytes)"
    assert "not a video" in rows["notes.mp4"][1] and "not a video" in rows["random.mp4"][1]
    assert "still image" in rows["photo.mp4"][1]
    assert "truncated" in rows["cut_short.mp4"][1]
    assert rows["one_frame.mp4"][1].startswith("too short")
    assert "quality" in rows["all_black.mp4"][1] and "exposure 0.00" in rows["all_black.mp4"][1]
    assert "missing" in rows["gone.mp4"][1]
    assert rows[HOSTILE_NAME][0] == "running"
    ctx.engine.dispose()

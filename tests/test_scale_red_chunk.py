"""A build through the real Airflow components (tests/scale_stack.py) in which one video
fails on an error: its chunk turns red and lists it, the run fails and the failure notifier
writes its message; clearing the red chunk (and what follows it) runs again exactly that
video's work and the run turns green; clearing a green chunk hands nothing out again."""
from __future__ import annotations

import json

import pytest
from airflow_stack import wait_for
from scale_stack import WIDE, attempt_counts, upload_videos

pytestmark = pytest.mark.timeout(1800)


def test_clearing_a_red_chunk_reruns_only_its_failed_video(scale, tmp_path):
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Video
    from opensubject_tasks.orchestrate import context
    from opensubject_tasks.testmedia.samples import make_tiny_videos, tiny_video

    stack, flag = scale["stack"], scale["flag"]
    videos = make_tiny_videos(tmp_path / "media", 5, start=100)
    wide = tmp_path / "media" / "wide.mp4"
    tiny_video(wide, 200, size=WIDE)
    upload_videos(scale["store"], [*videos, wide], "raw2")
    flag.write_text("fail")
    stack.unpause("opensubject_build")
    run_id = stack.trigger("opensubject_build", {"source": "store://raw2/", "build_name": "red", "chunk_size": 2})
    assert stack.wait_run("opensubject_build", run_id, timeout=900) == "failed"

    ctx = context()
    with session_scope(ctx.sessions) as s:
        bad = s.query(Video).filter(Video.name == "wide.mp4").one()
        assert bad.state == "failed" and bad.error_stage == "curate" and "injected error" in bad.reason
        bad_id, bad_chunk = bad.id, bad.chunk
        others = {v.id: v.state for v in s.query(Video).filter(Video.build_id == "red", Video.id != bad.id)}
        debug = [(v.name, v.state, v.chunk, v.stage_done, v.queued_at) for v in s.query(Video)]
    assert len(others) == 5 and set(others.values()) <= {"done", "rejected"}, (
        debug, [(t["task_id"], t["map_index"], t["state"]) for t in stack.task_instances("opensubject_build", run_id)])
    states = {(t["task_id"], t["map_index"]): t["state"] for t in stack.task_instances("opensubject_build", run_id)}
    assert states[("chunk", bad_chunk)] == "failed" and states[("watch", -1)] == "failed"
    assert {st for (t, i), st in states.items() if t == "chunk" and i != bad_chunk} == {"success"}
    assert states[("export", -1)] == "success" and states[("report", -1)] == "success"
    # The red chunk's log names the video, the stage, the error and the dataset page.
    log = stack.log("opensubject_build", run_id, "chunk", bad_chunk)
    assert f"video {bad_id} (wide.mp4), video, stage curate" in log and "injected error" in log, log[-3000:]
    assert "/opensubject/?build=red" in log
    # Only the red chunk needed its task back after the wait; a green chunk ended in the
    # triggerer, its summary in its log, with no second task process.
    assert "resumed to read its outcome" in log
    green_log = stack.log("opensubject_build", run_id, "chunk", min(
        i for (t, i), st in states.items() if t == "chunk" and i != bad_chunk))
    assert "video(s) by state" in green_log and "resumed to read its outcome" not in green_log, green_log[-3000:]
    # The failure notifier (configured for this stack) wrote its message.
    notes = wait_for("failure notification", lambda: [
        json.loads(line) for line in (scale["work"] / "notify.jsonl").read_text().splitlines()
        if json.loads(line)["run_id"] == run_id] if (scale["work"] / "notify.jsonl").exists() else None, 120)
    assert notes[0]["dag_id"] == "opensubject_build" and notes[0]["build"] == "red"

    before = attempt_counts(ctx)
    flag.unlink()  # the cause is fixed
    cleared = stack.clear("opensubject_build", run_id, [["chunk", bad_chunk]], downstream=True)
    assert {t["task_id"] for t in cleared} >= {"chunk", "export", "report", "watch"}
    assert stack.wait_run("opensubject_build", run_id, timeout=900) == "success"
    after = attempt_counts(ctx)
    rerun = {e for e in after if after[e] != before.get(e, 0)}
    # Only the failed video's work ran again: its curate, mine and its samples' stages.
    assert bad_id in rerun and not rerun & set(others), rerun
    with session_scope(ctx.sessions) as s:
        assert s.get(Video, bad_id).state in ("done", "rejected")
        assert {v.id: v.state for v in s.query(Video).filter(Video.build_id == "red", Video.id != bad_id)} == others

    # Clearing a chunk whose videos all finished (an operator's "retry" of finished work)
    # hands nothing out again: every verified sample stays exactly as it was.
    from opensubject_tasks.db.models import Sample

    def verified() -> dict:
        with session_scope(ctx.sessions) as s:
            return {x.id: (x.attempt, x.seed, json.dumps(x.keys, sort_keys=True)) for x in s.query(Sample)
                    .filter(Sample.build_id == "red", Sample.state == "verified")}

    green = min(i for (t, i), st in states.items() if t == "chunk" and i != bad_chunk)
    kept, attempts_before = verified(), attempt_counts(ctx)
    assert kept
    stack.clear("opensubject_build", run_id, [["chunk", green]], downstream=True)
    assert stack.wait_run("opensubject_build", run_id, timeout=900) == "success"
    assert verified() == kept and attempt_counts(ctx) == attempts_before
    assert "; 0 handed to the workers now" in stack.log("opensubject_build", run_id, "chunk", green, try_number=2)

"""Re-runs never destroy finished work; operator actions and bad arguments are safe.

* a backend that answers differently on every call (tests/fickle_backend.py), a finished
  build, then `rerun curate` and `rerun mine` of every video and the build resumed: the
  verified samples, their images and the exported shards are byte-identical, nothing is
  recorded as invalidated;
* `rerun ... --recompute` drops the video's later work and records every row and object;
* two Celery workers run the same stage of the same video at once: one waits for the
  other, nothing is duplicated, nothing fails;
* sources from outside are confined; every CLI error is one sentence with its exit code.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
import uuid
from pathlib import Path

import fickle_backend  # noqa: F401 - registers the fickle and slow test backends
import pytest
from sqlalchemy import select

from opensubject_tasks.cli import main


def _media(sample_media: Path, dest: Path, n: int) -> Path:
    gt = json.loads((sample_media / "ground_truth.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for v in [v for v in gt["videos"] if not v.get("bad")][:n]:
        shutil.copy(sample_media / v["file"], dest / v["file"])
    return dest


def _finished_work(out: Path) -> dict:
    """Verified sample ids with the bytes of every image they point to, and the shards."""
    with sqlite3.connect(out / "opensubject.db") as con:
        rows = con.execute("SELECT id, keys FROM samples WHERE state = 'verified' ORDER BY id").fetchall()
    images = {sid: {name: hashlib.sha256((out / "store" / key).read_bytes()).hexdigest()
                    for name, key in sorted(json.loads(keys).items())} for sid, keys in rows}
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted((out / "dataset").glob("shard-*.tar"))}
    return {"samples": images, "shards": shards}


def _count(out: Path, sql: str) -> int:
    with sqlite3.connect(out / "opensubject.db") as con:
        return con.execute(sql).fetchone()[0]


def test_fickle_backend_really_answers_differently(sample_media: Path):
    import cv2

    from opensubject_tasks.backends.registry import get_backend

    det = get_backend("detector", "fickle", marker=uuid.uuid4().hex)  # an instance of its own
    cap = cv2.VideoCapture(str(sample_media / "person_zoom.mp4"))
    frames = []
    for i in range(60):
        ok, bgr = cap.read()
        if ok and i % 12 == 0:
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    first, second = det.detect(frames, ["person"]), det.detect(frames, ["person"])
    assert sum(map(len, first)) > 0
    assert any(a.box != b.box for fa, fb in zip(first, second) for a, b in zip(fa, fb))
    vlm = get_backend("vlm", "fickle", marker=uuid.uuid4().hex)
    assert vlm.list_categories(frames[:1])[0].categories != vlm.list_categories(frames[:1])[0].categories


@pytest.mark.slow
def test_reruns_with_a_fickle_backend_keep_every_verified_sample(sample_media: Path, tmp_path: Path,
                                                                  monkeypatch, capsys):
    for interface in ("detector", "vlm", "quality"):
        monkeypatch.setenv(f"OPENSUBJECT_BACKENDS__{interface.upper()}", "fickle")
    monkeypatch.setenv("OPENSUBJECT_MINE__MAX_PAIRS_PER_SUBJECT", "1")
    media = _media(sample_media, tmp_path / "media", 3)
    out = tmp_path / "out"
    assert main(["run", str(media), "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    before = _finished_work(out)
    assert before["samples"] and before["shards"]
    with sqlite3.connect(out / "opensubject.db") as con:
        videos = [v for (v,) in con.execute("SELECT id FROM videos ORDER BY id")]
        stages_before = dict(con.execute("SELECT stage, count(*) FROM stage_attempts GROUP BY stage").fetchall())
    capsys.readouterr()

    for vid in videos:
        assert main(["rerun", "curate", vid, "--out", str(out)]) == 0
        assert main(["rerun", "mine", vid, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 * len(videos) and all("already done" in line for line in printed), printed
    assert main(["run", str(media), "--out", str(out), "--jobs", "1", "--quiet"]) == 0

    assert _finished_work(out) == before
    assert _count(out, "SELECT count(*) FROM invalidations") == 0
    # the re-runs were real runs of the stages (recorded attempts), not refused commands
    with sqlite3.connect(out / "opensubject.db") as con:
        stages_after = dict(con.execute("SELECT stage, count(*) FROM stage_attempts GROUP BY stage").fetchall())
    assert stages_after["curate"] == stages_before["curate"] + len(videos)
    assert stages_after["mine"] == stages_before["mine"] + len(videos)


@pytest.mark.slow
def test_recompute_drops_later_work_and_records_it(sample_media: Path, tmp_path: Path, capsys):
    media = _media(sample_media, tmp_path / "media", 1)
    out = tmp_path / "out"
    assert main(["run", str(media), "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    vid = _count(out, "SELECT id FROM videos")
    subjects = _count(out, "SELECT count(*) FROM subjects")
    pairs = _count(out, "SELECT count(*) FROM pairs")
    samples = _count(out, "SELECT count(*) FROM samples")
    verified = _count(out, "SELECT count(*) FROM samples WHERE state = 'verified'")
    sample_objects = len([p for p in (out / "store" / "videos" / vid / "samples").rglob("*") if p.is_file()])
    assert verified and sample_objects
    capsys.readouterr()

    assert main(["rerun", "mine", vid, "--out", str(out), "--recompute", "--reason", "new detector"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert f"{subjects + pairs + samples} row(s) and {sample_objects} object(s) invalidated" in line
    with sqlite3.connect(out / "opensubject.db") as con:
        kinds = dict(con.execute("SELECT entity_type, count(*) FROM invalidations GROUP BY entity_type"))
        reasons = {r for (r,) in con.execute("SELECT DISTINCT reason FROM invalidations")}
        states = {s for (s,) in con.execute("SELECT state FROM invalidations WHERE entity_type = 'sample'")}
        objects = sum(len(json.loads(o)) for (o,) in con.execute("SELECT objects FROM invalidations"))
    assert kinds == {"subject": subjects, "pair": pairs, "sample": samples}
    assert reasons == {"rerun mine --recompute: new detector"} and "verified" in states
    assert objects == sample_objects
    assert not (out / "store" / "videos" / vid / "samples").exists() or \
        not any(p.is_file() for p in (out / "store" / "videos" / vid / "samples").rglob("*"))
    # the recomputed mine ran, the build resumes and verifies again
    assert _count(out, "SELECT stage_done FROM videos") == "mine"
    assert main(["run", str(media), "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    assert _count(out, "SELECT count(*) FROM samples WHERE state = 'verified'") == verified


def test_a_finished_video_or_verified_sample_never_turns_failed(embedded_settings):
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import session_scope, upgrade
    from opensubject_tasks.db.models import Video
    from opensubject_tasks.services.common import mark_terminal

    ctx = Context.from_settings(embedded_settings)
    upgrade(ctx.engine)
    with session_scope(ctx.sessions) as s:
        s.add_all([Video(id="done", content_hash="a", source_uri="file:///a.mp4", name="a.mp4", state="done"),
                   Video(id="busy", content_hash="b", source_uri="file:///b.mp4", name="b.mp4", state="running")])
    mark_terminal(ctx, "video", "done", "failed", "curate failed: source file gone")
    mark_terminal(ctx, "video", "busy", "failed", "curate failed: source file gone")
    with session_scope(ctx.sessions) as s:
        assert s.get(Video, "done").state == "done" and s.get(Video, "done").reason is None
        assert s.get(Video, "busy").state == "failed"
    ctx.engine.dispose()


# --- two copies of a stage at once, on real workers ----------------------------------------------
@pytest.fixture(scope="module")
def race_media(tmp_path_factory) -> Path:
    from disk_cache import sample_videos

    return sample_videos(tmp_path_factory.mktemp("race-media"), count=1, size=(320, 180))


def test_two_workers_running_the_same_stage_of_a_video_at_once(stack, pg_db, s3_store_settings,
                                                              race_media, tmp_path):
    """A video's curate is sent twice at the same moment to two worker processes, so every
    stage of its chain runs twice. The second copy of each waits for the first (attempts
    on one entity never overlap), then finds the work done; the video ends with the rows
    and objects of an undisturbed embedded build, no duplicate, no failure."""
    from fault_fixtures import SMALL, rows, store_keys, upload

    from opensubject_tasks import orchestrate as o
    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import StageAttempt
    from opensubject_tasks.runner import run_build
    from opensubject_tasks.services.ingest import register_source
    from opensubject_tasks.storage import make_store
    from opensubject_tasks.tasks import send, waiting_in_broker

    def attempts_now(c):  # noqa: ANN001, ANN202
        with session_scope(c.sessions) as s:
            return list(s.scalars(select(StageAttempt)))

    slow = {"OPENSUBJECT_BACKENDS__QUALITY": "slow", "OPENSUBJECT_TEST_SLOW_S": "2",
            "PYTHONPATH": str(Path(__file__).parent)}
    # the reference: the same video and settings, embedded, undisturbed
    ref_store = s3_store_settings.model_copy(update={"bucket": f"ref-{uuid.uuid4().hex[:10]}"})
    upload(make_store(ref_store), race_media)
    ref_ctx = Context.from_settings(load_settings(database_url=f"sqlite:///{tmp_path / 'ref.db'}",
                                                  store=ref_store.model_dump(), **SMALL))
    run_build(ref_ctx, ["store://raw/"], "race")
    reference = {"rows": rows(ref_ctx), "objects": set(store_keys(ref_ctx.store, "videos/"))}
    ref_ctx.engine.dispose()

    env = stack.apply(pg_db, s3_store_settings, **slow)
    upload(stack.store, race_media)
    ctx = stack.context()
    build = o.start_build({"build_name": "race"}, "race-run")
    register_source(ctx, "store://raw/", build_id=build)
    assert o.claim_build_videos(build) == [0]
    (vid,) = [v for v, _ in rows(ctx)["videos"].values()]
    stack.worker(env, "r1", include="fickle_backend")
    stack.worker(env, "r2", include="fickle_backend")

    # Curate sent twice at the same moment: each copy then hands the video on down its
    # chain, so every later stage (mine, each sample's synthesize and verify) runs twice too.
    send("curate", vid)
    send("curate", vid)
    deadline = time.monotonic() + 240
    while o.chunk_progress(build, 0) is None:
        assert time.monotonic() < deadline, "the video did not settle"
        time.sleep(0.3)
    # ... and the duplicates still in flight after it settled have ended too
    while waiting_in_broker() or any(a.status == "running" for a in attempts_now(ctx)):
        assert time.monotonic() < deadline, "duplicates still in flight"
        time.sleep(0.3)

    with session_scope(ctx.sessions) as s:
        att = list(s.execute(select(StageAttempt.stage, StageAttempt.entity_id, StageAttempt.status,
                                    StageAttempt.started_at, StageAttempt.finished_at, StageAttempt.details,
                                    StageAttempt.worker).order_by(StageAttempt.started_at)).all())
    by_entity: dict[str, list] = {}
    for a in att:
        by_entity.setdefault(a.entity_id, []).append(a)
    curate = [a for a in by_entity[vid] if a.stage == "curate"]
    assert len(curate) == 2 and curate[0].worker != curate[1].worker  # two processes ran it
    assert "skipped" not in (curate[0].details or {}) and "already done" in curate[1].details["skipped"]
    assert curate[1].details["waited_for_other_run_s"] >= 1.0  # it arrived while the first ran
    assert len([a for a in by_entity[vid] if a.stage == "mine"]) == 2
    for entity, runs in by_entity.items():  # one run of an entity at a time, never overlapping
        for first, second in zip(runs, runs[1:]):
            assert second.started_at >= first.finished_at, (entity, first, second)
    assert {a.status for a in att} <= {"ok", "rejected"}, {a.status for a in att}

    got = rows(ctx)
    for table in ("videos", "clips", "subjects", "pairs", "samples"):
        assert got[table] == reference["rows"][table], table
    objects = store_keys(stack.store, "videos/")
    assert len(objects) == len(set(objects)) and set(objects) == reference["objects"]


def test_reruns_on_the_workers_keep_every_verified_sample(stack, pg_db, s3_store_settings, race_media):
    """The distributed path of `opensubject rerun`: curate and mine of every video handed to
    the workers again (as a cleared chunk would hand them), each carried on down its chain;
    with the fickle backends, nothing finished changes and nothing is invalidated."""
    from fault_fixtures import drive_build, upload

    from opensubject_tasks import orchestrate as o
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Invalidation, Sample, Video

    env = stack.apply(pg_db, s3_store_settings, OPENSUBJECT_BACKENDS__DETECTOR="fickle",
                      OPENSUBJECT_BACKENDS__VLM="fickle", PYTHONPATH=str(Path(__file__).parent))
    upload(stack.store, race_media)
    stack.worker(env, "rerun", include="fickle_backend")
    run = drive_build("faults", timeout_s=240)
    assert not run.failures, run.failures
    ctx = stack.context()

    def finished() -> dict:
        with session_scope(ctx.sessions) as s:
            samples = {x.id: (x.state, x.attempt, x.seed, json.dumps(x.keys, sort_keys=True), x.caption_long)
                       for x in s.query(Sample)}
            videos = {v.id: (v.state, v.stage_done) for v in s.query(Video)}
        objects = {k: hashlib.sha256(stack.store.get_bytes(k)).hexdigest()
                   for k in (o.key for o in stack.store.list("videos/"))}
        return {"samples": samples, "videos": videos, "objects": objects}

    before = finished()
    assert any(st == "verified" for st, *_ in before["samples"].values())
    for vid in before["videos"]:
        for stage in ("curate", "mine"):
            out = o.rerun_on_workers(stage, vid, timeout_s=120)
            assert out["status"] in ("ok", "rejected") and "already done" in out["details"]["skipped"], out
    assert finished() == before
    with session_scope(ctx.sessions) as s:
        assert s.query(Invalidation).count() == 0

"""No waves: a build whose in-flight bound is smaller than its videos hands them out as
places free up, from any chunk, and finishes every one. Real PostgreSQL, Redis, the S3
test server and a real Celery worker process; the chunk tasks' calls made here as the
chunk operator makes them."""
from __future__ import annotations

import time
import uuid

import pytest
from airflow_fixtures import BROKER_PREFIX, Worker, service_env, use_services
from sqlalchemy import func, select

pytestmark = pytest.mark.timeout(900)

BOUND = 2
VIDEOS = 6
SETTINGS = {"OPENSUBJECT_CURATE__MIN_SHORT_SIDE": "64", "OPENSUBJECT_MINE__MAX_PAIRS_PER_SUBJECT": "1",
            "OPENSUBJECT_VERIFY__MAX_ATTEMPTS": "2", "OPENSUBJECT_CELERY__MAX_VIDEOS_IN_FLIGHT": str(BOUND)}


def _flow_counts(ctx) -> dict[str | None, int]:  # noqa: ANN001
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Video

    with session_scope(ctx.sessions) as s:
        return dict(s.execute(select(Video.flow, func.count()).group_by(Video.flow)).all())


def test_a_build_bounded_below_its_videos_finishes_every_video_never_above_the_bound(
        pg_db, redis_url, s3_store_settings, monkeypatch, tmp_path):
    import redis

    from opensubject_tasks import orchestrate
    from opensubject_tasks.catalogue import VIDEO_TERMINAL
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import StageAttempt, Video
    from opensubject_tasks.services.ingest import register_source
    from opensubject_tasks.storage import make_store
    from opensubject_tasks.testmedia.samples import make_tiny_videos

    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(match=f"{BROKER_PREFIX}*"):
        r.delete(key)
    env = service_env(pg_db, redis_url, s3_store_settings, **SETTINGS)
    use_services(env, monkeypatch)
    ctx = orchestrate.context()
    store = make_store(s3_store_settings)
    for p in make_tiny_videos(tmp_path / "media", VIDEOS):
        store.put_file(f"raw/{p.name}", p, "video/mp4")

    build_id = orchestrate.start_build({"build_name": f"waves-{uuid.uuid4().hex[:6]}"}, "run")
    assert len(register_source(ctx, "store://raw/", build_id).new_ids) == VIDEOS
    chunks = orchestrate.claim_build_videos(build_id, chunk_size=2)
    assert chunks == [0, 1, 2]
    # Every chunk starts at once; only BOUND videos go to the queues, the rest wait.
    counts = [orchestrate.start_chunk(build_id, c) for c in chunks]
    assert sum(c["handed_out"] for c in counts) == BOUND
    assert _flow_counts(ctx) == {"queued": BOUND, "waiting": VIDEOS - BOUND}

    worker = Worker(env, "waves", tmp_path / "worker.log", concurrency=2).start()
    try:
        peak, deadline = 0, time.monotonic() + 600
        while time.monotonic() < deadline:
            flows = _flow_counts(ctx)
            peak = max(peak, flows.get("queued", 0))
            if all(orchestrate.chunk_progress(build_id, c) is not None for c in chunks):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"build not settled after 600 s: {_flow_counts(ctx)}\n{worker.log()[-3000:]}")
    finally:
        worker.stop()

    with session_scope(ctx.sessions) as s:
        videos = s.execute(select(Video.id, Video.state, Video.flow, Video.resends)
                           .where(Video.build_id == build_id)).all()
        curated = s.scalars(select(StageAttempt.entity_id).where(StageAttempt.stage == "curate")
                            .order_by(StageAttempt.id)).all()
    print(f"{VIDEOS} videos, bound {BOUND}: peak in flight {peak}, states "
          f"{sorted({v.state for v in videos})}")
    assert len(videos) == VIDEOS and all(v.state in VIDEO_TERMINAL for v in videos)
    assert any(v.state == "done" for v in videos)
    # each video handed out once, its place given back when it ended
    assert sorted(curated) == sorted(v.id for v in videos)
    assert {v.flow for v in videos} == {None} and {v.resends for v in videos} == {0}
    assert 1 <= peak <= BOUND

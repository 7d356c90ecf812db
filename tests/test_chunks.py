"""How a build splits into chunks and what a chunk task hands out (orchestrate.py), on a
real PostgreSQL, with the Celery hand-off recorded instead of sent (the broker's view is
given explicitly): what runs is decided here, the workers' part is tested elsewhere."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select

from opensubject_tasks import orchestrate
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Build, Clip, Pair, Sample, StageAttempt, Subject, Video


@pytest.fixture()
def ctx(orchestrate_ctx):
    return orchestrate_ctx


@pytest.fixture()
def sent(monkeypatch):
    """Messages the chunk hands out, and the broker's contents the test decides."""
    out: list[tuple] = []
    broker: set[tuple[str, str]] = set()
    monkeypatch.setattr(orchestrate, "_send", lambda stage, *a, **kw: out.append((stage, *a)))
    import opensubject_tasks.tasks as tasks

    monkeypatch.setattr(tasks, "waiting_in_broker", lambda: set(broker))
    return out, broker


def add_videos(c, build: str, n: int, **kw) -> list[str]:
    with session_scope(c.sessions) as s:
        if s.get(Build, build) is None:
            s.add(Build(id=build, params={}))
            s.flush()
        ids = [f"{build}-v{i:03d}" for i in range(n)]
        for vid in ids:
            s.add(Video(id=vid, content_hash=vid, source_uri=f"store://raw/{vid}.mp4", name=f"{vid}.mp4",
                        build_id=build, **kw))
    return ids


@pytest.mark.parametrize(("videos", "wanted", "limit", "size"), [
    (10, 0, 1024, 1000), (3000, 0, 1024, 1000), (300_000, 0, 1024, 1000), (1_000_000, 0, 1024, 1000),
    (2_000_000, 0, 1024, 1954),
    (20, 2, 8, 3), (20, 5, 8, 5)])
def test_chunk_size_keeps_a_build_within_the_mapping_limit(videos, wanted, limit, size):
    got = orchestrate.chunk_size_for(videos, limit, wanted)
    assert got == size and -(-videos // got) <= limit


def test_claim_numbers_chunks_evenly_and_only_videos_with_work_left(ctx):
    ids = add_videos(ctx, "b", 7)
    with session_scope(ctx.sessions) as s:  # finished ones are not chunked again
        s.get(Video, ids[0]).state = "done"
        s.get(Video, ids[1]).state, s.get(Video, ids[1]).reason = "failed", "not a video"
        s.get(Video, ids[2]).state, s.get(Video, ids[2]).error_stage = "failed", "mine"  # retried
    assert orchestrate.claim_build_videos("b", chunk_size=2) == [0, 1, 2]
    with session_scope(ctx.sessions) as s:
        chunks = dict(s.execute(select(Video.id, Video.chunk)).all())
    assert [chunks[v] for v in ids[2:]] == [0, 0, 1, 1, 2]
    # More chunks than Airflow maps: the size grows to fit.
    assert orchestrate.claim_build_videos("b", chunk_size=1, max_chunks=2) == [0, 1]


def test_a_chunk_hands_out_each_video_once_and_a_clear_only_what_needs_it(ctx, sent):
    out, broker = sent
    ids = add_videos(ctx, "b", 4)
    assert orchestrate.claim_build_videos("b", chunk_size=4) == [0]
    counts = orchestrate.start_chunk("b", 0)
    assert sorted(v for _, v in out) == ids and {st for st, _ in out} == {"curate"}
    assert counts == {"videos": 4, "waiting": 4, "retried": 0, "resent": 0, "in_flight": 0, "handed_out": 4}
    assert orchestrate.chunk_progress("b", 0) is None

    # The chunk task runs again (an Airflow retry, an operator's clear) while the work is
    # queued or running: nothing is sent twice.
    out.clear()
    broker |= {("curate", ids[0]), ("curate", ids[1]), ("curate", ids[2])}
    with session_scope(ctx.sessions) as s:
        s.add(StageAttempt(entity_type="video", entity_id=ids[3], stage="curate", status="running"))
    assert orchestrate.start_chunk("b", 0)["handed_out"] == 0 and out == []

    # Meanwhile: one video failed on an error (and one of its samples with it), one on its
    # input, one finished, one's message was lost and nothing runs it.
    with session_scope(ctx.sessions) as s:
        s.execute(StageAttempt.__table__.delete())
        v0, v1, v2 = (s.get(Video, v) for v in ids[:3])
        v0.state, v0.error_stage, v0.reason = "failed", "curate", "curate failed: RuntimeError"
        v1.state, v1.reason = "failed", "not a video: moov atom not found"
        v2.state, v2.stage_done = "done", "mine"
        s.add(Clip(id="c2", video_id=ids[2], idx=0, start_frame=0, end_frame=9, start_s=0, end_s=1))
        s.flush()
        s.add(Subject(id="s2", clip_id="c2", idx=0, category="cat", category_source="t", boxes={}))
        s.flush()
        for i, (state, err) in enumerate([("verified", None), ("failed", "synthesize")]):
            s.add(Pair(id=f"p{i}", subject_id="s2", ref_frame=i, tgt_frame=i + 1, ref_box=[0, 0, 1, 1],
                       tgt_box=[0, 0, 1, 1]))
            s.flush()
            s.add(Sample(id=f"p{i}", pair_id=f"p{i}", build_id="b", state=state, seed=i, error_stage=err,
                         reason="synthesize failed: CUDA error" if err else None))
    broker.clear()
    report = orchestrate.chunk_report("b", 0)
    assert [(e["video"], e["sample"], e["stage"]) for e in report["errors"]] == \
        [(ids[0], None, "curate"), (ids[2], "p1", "synthesize")]
    assert report["bad_input"] == {"not a video": 1}

    out.clear()
    counts = orchestrate.start_chunk("b", 0)
    # The errored video and the video with an errored sample go back to work; the lost one
    # is sent again; the bad input and the finished work stay as they are.
    assert sorted(v for _, v in out) == sorted([ids[0], ids[2], ids[3]])
    assert counts["retried"] == 2 and counts["resent"] == 1
    with session_scope(ctx.sessions) as s:
        assert (s.get(Video, ids[0]).state, s.get(Video, ids[0]).error_stage) == ("running", None)
        assert s.get(Video, ids[1]).state == "failed"
        assert (s.get(Sample, "p1").state, s.get(Sample, "p1").error_stage) == ("pending", None)
        assert s.get(Sample, "p0").state == "verified"
        assert {v.id: v.resends for v in s.query(Video)} == {ids[0]: 1, ids[1]: 0, ids[2]: 1, ids[3]: 1}


def test_a_chunk_is_settled_as_far_as_its_build_goes(ctx, sent):
    ids = add_videos(ctx, "u", 2)
    with session_scope(ctx.sessions) as s:
        s.get(Build, "u").params = {"until": "curate"}
    orchestrate.claim_build_videos("u", chunk_size=2)
    orchestrate.start_chunk("u", 0)
    assert orchestrate.chunk_progress("u", 0) is None
    with session_scope(ctx.sessions) as s:
        s.get(Video, ids[0]).stage_done = "curate"
        s.get(Video, ids[1]).state = "rejected"
    assert orchestrate.chunk_progress("u", 0) == {"videos": 2, "settled": 2}
    with session_scope(ctx.sessions) as s:  # the whole pipeline: curated is not enough
        s.get(Build, "u").params = {"until": "verify"}
    assert orchestrate.chunk_progress("u", 0) is None


def test_finalize_decides_only_on_evidence(ctx):
    """A video whose mining never completed (a stage killed, a message on its way back) is
    not rejected for having no pair: it keeps its state until mining has run."""
    from opensubject_tasks.services.common import finalize_video

    (vid,) = add_videos(ctx, "f", 1, state="running", stage_done="curate")
    assert finalize_video(ctx, vid) == "running"
    with session_scope(ctx.sessions) as s:
        s.get(Video, vid).stage_done = "mine"
    assert finalize_video(ctx, vid) == "rejected"
    with session_scope(ctx.sessions) as s:
        assert s.get(Video, vid).reason == "no subject pair found"


def test_claims_of_more_ids_than_a_statement_may_bind_work_through_psycopg3(pg_db, monkeypatch):
    """psycopg 3 refuses more than 65,535 bind parameters in a statement: a claim of 66,000
    registered videos, and a build given 66,000 video ids, go through in batches."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from opensubject_tasks.services.ingest import ensure_build

    url = make_url(pg_db).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    monkeypatch.setenv("OPENSUBJECT_DATABASE_URL", url)
    c = orchestrate.context()
    assert c.engine.dialect.driver == "psycopg"
    n = 66_000
    with c.engine.begin() as conn:
        conn.execute(text("INSERT INTO videos (id, content_hash, source_uri, name) "
                          "SELECT 'v' || lpad(i::text, 6, '0'), 'h' || i, 'store://raw/' || i, i || '.mp4' "
                          "FROM generate_series(0, :n - 1) AS i"), {"n": n})

    def owners() -> dict:
        with session_scope(c.sessions) as s:
            return dict(s.execute(select(Video.build_id, func.count()).group_by(Video.build_id)).all())

    try:
        for build in ("claimed", "given"):
            ensure_build(c, build, {}, "cpu")
        chunks = orchestrate.claim_build_videos("claimed", max_chunks=300, chunk_size=220)
        assert owners() == {"claimed": n} and len(chunks) == 300  # chunks of 220
        with c.engine.begin() as conn:  # given back, then asked for by id
            conn.execute(text("UPDATE videos SET build_id = NULL, chunk = NULL"))
        given = orchestrate.claim_build_videos("given", video_ids=[f"v{i:06d}" for i in range(n)], max_chunks=300,
                                               chunk_size=100)  # grown to 220 to fit 300 chunks
        assert owners() == {"given": n} and len(given) == 300
        with session_scope(c.sessions) as s:
            assert s.scalar(select(func.count(func.distinct(Video.chunk)))) == 300
    finally:
        c.engine.dispose()


def test_places_in_flight_pass_from_chunk_to_chunk_and_the_reconciler_frees_lost_ones(ctx, sent, monkeypatch):
    """Two chunks, a bound of 2: each video that leaves the queues hands out the next
    waiting one (whatever its chunk) in its own transaction; a video that ended outside the
    chain frees its place at the reconcile pass; a pulled video whose message was lost is
    sent again by the reconciler, and no pass ever exceeds the bound."""
    from opensubject_tasks.services.handoff import leave_flight
    from opensubject_tasks.services.reconcile import reconcile

    out, broker = sent
    monkeypatch.setenv("OPENSUBJECT_CELERY__MAX_VIDEOS_IN_FLIGHT", "2")
    ctx = orchestrate.context()
    ids = add_videos(ctx, "w", 5)
    assert orchestrate.claim_build_videos("w", chunk_size=3) == [0, 1]
    assert orchestrate.start_chunk("w", 0)["handed_out"] == 2
    assert orchestrate.start_chunk("w", 1)["handed_out"] == 0     # no place left
    assert [v for _, v in out] == ids[:2]

    def flows() -> dict[str, str | None]:
        with session_scope(ctx.sessions) as s:
            return dict(s.execute(select(Video.id, Video.flow)).all())

    # ids[0] ends through the chain: its place goes to ids[2], in the same transaction
    with session_scope(ctx.sessions) as s:
        s.get(Video, ids[0]).state = "rejected"
        s.flush()
        pulled = leave_flight(s, ids[0], "verify")
        assert leave_flight(s, ids[1], "verify") == []   # still in work
    assert [(st, v) for st, v, _ in pulled] == [("curate", ids[2])]
    assert list(flows().values()).count("queued") == 2

    # ids[1] fails after its retries (not through the chain): its place stays taken until a
    # reconcile pass frees it and hands out ids[3] (chunk 1); ids[2]'s message is on the broker
    with session_scope(ctx.sessions) as s:
        s.get(Video, ids[1]).state, s.get(Video, ids[1]).error_stage = "failed", "curate"
    out.clear()
    broker.add(("curate", ids[2]))
    got = reconcile(ctx, lambda st, v, task_id=None: out.append((st, v)), older_than_s=3600, waiting=broker)
    assert got == [("curate", ids[3])] and out == got
    f = flows()
    assert (f[ids[1]], f[ids[3]], f[ids[4]]) == (None, "queued", "waiting")

    # ids[3]'s message is lost: a later pass sends it again, still within the bound
    out.clear()
    with session_scope(ctx.sessions) as s:
        s.get(Video, ids[3]).queued_at = s.get(Video, ids[3]).queued_at.replace(year=2000)
    got = reconcile(ctx, lambda st, v, task_id=None: out.append((st, v)), older_than_s=3600, waiting=broker)
    assert got == [("curate", ids[3])]
    assert list(flows().values()).count("queued") == 2 and flows()[ids[4]] == "waiting"

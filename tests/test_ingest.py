"""Stage 0: register videos by content identity, never twice; claim them for builds."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.models import Duplicate, Build, Video
from opensubject_tasks.errors import BadInput
from opensubject_tasks.services.ingest import claim_videos, ensure_build, register_source, video_id_for
from opensubject_tasks.storage.sources import local_copy, parse_source


def _ctx(settings) -> Context:
    ctx = Context.from_settings(settings)
    upgrade(ctx.engine)
    return ctx


@pytest.fixture()
def ctx(service_ctx):
    """Embedded (SQLite, local directory) and production (PostgreSQL, S3): conftest's service_ctx."""
    return service_ctx


@pytest.fixture()
def pg_ctx(pg_db, tmp_path):
    c = _ctx(load_settings(database_url=pg_db, store={"kind": "local", "local_root": str(tmp_path / "s")}))
    yield c
    c.engine.dispose()


def vid(content: bytes) -> str:
    return video_id_for(hashlib.sha256(content).hexdigest())


def make_folder(root: Path) -> dict[str, bytes]:
    """Small files with video names (any bytes register; curate judges them later)."""
    a = os.urandom(2000)
    files = {
        "a.mp4": a,
        "sub/b.MOV": os.urandom(3000),
        "sub/deeper/c.mkv": os.urandom(10),
        "dup-of-a.mp4": a,
        "empty.mp4": b"",
        "we ird;$(rm -rf ~)\n'name.mp4": os.urandom(50),
        os.fsdecode(b"bad-\xff-bytes.webm"): os.urandom(60),
        "notes.txt": b"not a video",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def count_videos(ctx) -> int:
    with session_scope(ctx.sessions) as s:
        return s.scalar(select(func.count()).select_from(Video))


def test_folder_ingest_registers_each_content_once(ctx, tmp_path):
    root = tmp_path / "media"
    files = make_folder(root)
    res = register_source(ctx, str(root))
    videos = {rel: data for rel, data in files.items() if not rel.endswith(".txt")}
    distinct = {vid(d) for d in videos.values()}
    assert len(distinct) == 6
    assert sorted(res.new_ids) == sorted(distinct)
    assert res.known_ids == []
    # the byte-identical copy is no new video: it is recorded as a duplicate of the first
    assert res.duplicates == [("dup-of-a.mp4", vid(files["a.mp4"]))]
    reason = "not a video file name (extension '.txt')"
    assert res.skipped.counts == {reason: 1} and res.skipped.examples == {reason: ["notes.txt"]}
    assert res.to_dict()["skipped"] == {reason: 1}
    assert count_videos(ctx) == 6
    with session_scope(ctx.sessions) as s:
        [dup] = s.query(Duplicate).all()
        assert (dup.video_id, dup.name, parse_source(dup.source_uri).path) == \
            (vid(files["a.mp4"]), "dup-of-a.mp4", root / "dup-of-a.mp4")
    with session_scope(ctx.sessions) as s:
        for rel, data in videos.items():
            if rel == "dup-of-a.mp4":
                continue
            v = s.get(Video, vid(data))
            assert v.content_hash == hashlib.sha256(data).hexdigest()
            assert (v.size_bytes, v.state, v.build_id) == (len(data), "registered", None)
            assert parse_source(v.source_uri).path == root / rel  # exact path, odd bytes included
            with local_copy(ctx.store, v.source_uri) as p:
                assert p.read_bytes() == data
        assert s.get(Video, vid(videos["we ird;$(rm -rf ~)\n'name.mp4"])).name == "we ird;$(rm -rf ~)\n'name.mp4"
        assert s.get(Video, vid(videos[os.fsdecode(b"bad-\xff-bytes.webm")])).name == "bad-\ufffd-bytes.webm"


def test_rerun_registers_nothing_and_a_new_file_registers_alone(ctx, tmp_path):
    root = tmp_path / "media"
    files = make_folder(root)
    first = register_source(ctx, str(root))
    again = register_source(ctx, root.as_uri())  # the file:// form names the same folder
    assert again.new_ids == []
    assert sorted(again.known_ids) == sorted(first.new_ids)
    assert again.duplicates == first.duplicates  # seen again, recorded once
    (root / "sub" / "new.mp4").write_bytes(b"new content")
    (root / "moved-a.mp4").write_bytes(files["a.mp4"])  # same content, new name: a duplicate
    third = register_source(ctx, str(root))
    assert third.new_ids == [vid(b"new content")]
    assert ("moved-a.mp4", vid(files["a.mp4"])) in third.duplicates
    assert count_videos(ctx) == 7
    with session_scope(ctx.sessions) as s:
        assert s.query(Duplicate).count() == 2


def test_limit_and_build(ctx, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(9):
        (root / f"v{i}.mp4").write_bytes(f"video {i}".encode())
    got: list[str] = []
    for _ in range(4):
        got += register_source(ctx, str(root), build_id="b1", limit=4).new_ids
    assert len(got) == len(set(got)) == 9
    with session_scope(ctx.sessions) as s:
        assert s.get(Build, "b1").state == "running"
        assert set(s.scalars(select(Video.build_id))) == {"b1"}


def test_store_prefix_ingest(ctx):
    store = ctx.store
    store.put_bytes("incoming/x.mp4", b"x video")
    store.put_bytes("incoming/sub/y.mov", b"y video")
    store.put_bytes("incoming/copy-of-x.mp4", b"x video")
    store.put_bytes("incoming/readme.txt", b"text")
    store.put_bytes("other/z.mp4", b"elsewhere")
    res = register_source(ctx, "store://incoming/")
    info_x, info_y = store.stat("incoming/x.mp4"), store.stat("incoming/sub/y.mov")
    expected = {video_id_for(f"{i.etag}:{i.size}"): i for i in (info_x, info_y)}
    assert sorted(res.new_ids) == sorted(expected)
    # same etag+size: a duplicate of the first one listed
    assert res.known_ids == [] and res.duplicates == [("x.mp4", video_id_for(f"{info_x.etag}:{info_x.size}"))]
    assert res.skipped.counts == {"not a video file name": 1}
    assert res.skipped.examples == {"not a video file name": ["readme.txt"]}
    with session_scope(ctx.sessions) as s:
        uris = {v.source_uri for v in s.scalars(select(Video))}
    # Listed in key order: copy-of-x comes first and x is then known by its etag+size.
    assert uris == {"store://incoming/copy-of-x.mp4", "store://incoming/sub/y.mov"}
    for uri in uris:
        with local_copy(store, uri) as p:
            assert p.read_bytes() in (b"x video", b"y video")
    assert register_source(ctx, "store://incoming/").new_ids == []
    assert count_videos(ctx) == 2


def test_an_object_overwritten_at_the_same_key_is_a_new_video_version(ctx):
    from opensubject_tasks.services.common import run_stage
    from opensubject_tasks.services.ingest import ensure_build

    store = ctx.store
    store.put_bytes("in/a.mp4", b"first a")
    store.put_bytes("in/b.mp4", b"first b")
    first = {v: k for k, v in zip(("a", "b"), register_source(ctx, "store://in/").new_ids, strict=True)}
    old_a, old_b = sorted(first, key=lambda v: first[v])
    ensure_build(ctx, "b1", {}, "cpu")
    with session_scope(ctx.sessions) as s:  # b was handed to curate already; a was not
        s.get(Video, old_b).queued_at = s.get(Video, old_b).created_at
        s.get(Video, old_b).build_id = "b1"
    store.put_bytes("in/a.mp4", b"second a, another encode")
    store.put_bytes("in/b.mp4", b"second b, another encode")
    res = register_source(ctx, "store://in/")
    assert len(res.new_ids) == 2 and not set(res.new_ids) & {old_a, old_b}
    assert res.replaced == [old_a]
    with session_scope(ctx.sessions) as s:
        a = s.get(Video, old_a)
        assert a.state == "rejected" and "replaced by a new version at store://in/a.mp4" in a.reason
        assert s.get(Video, old_b).state == "registered"
    # the old b started before the new version came: curate refuses bytes it did not register
    out = run_stage(ctx, "curate", old_b)
    assert out.status == "failed" and "changed since it was registered" in out.reason


def test_bad_sources_are_refused(ctx, tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        register_source(ctx, str(tmp_path / "nowhere"))
    with pytest.raises(BadInput):
        register_source(ctx, "store://../escape/")
    with pytest.raises(BadInput):
        register_source(ctx, "ftp://host/videos/")


def test_concurrent_ingests_register_each_video_once(ctx, tmp_path):
    root = tmp_path / "race"
    root.mkdir()
    for i in range(40):
        (root / f"v{i:02d}.mp4").write_bytes(f"race video {i}".encode())
    results, errors = [], []
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        try:
            results.append(register_source(ctx, str(root)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    new = [i for r in results for i in r.new_ids]
    assert len(new) == len(set(new)) == 40
    assert sorted(results[0].new_ids + results[0].known_ids) == sorted(new)
    assert count_videos(ctx) == 40


def _register_n(ctx, tmp_path, n: int) -> list[str]:
    root = tmp_path / f"n{n}"
    root.mkdir()
    for i in range(n):
        (root / f"v{i:03d}.mp4").write_bytes(f"claim video {i}".encode())
    return register_source(ctx, str(root)).new_ids


def test_claim_videos(ctx, tmp_path):
    ids = _register_n(ctx, tmp_path, 10)
    with session_scope(ctx.sessions) as s:  # a failed video is not handed to a build
        s.get(Video, ids[0]).state = "failed"
    first = claim_videos(ctx, "b1", 4)
    second = claim_videos(ctx, "b2", None)
    assert len(first) == 4 and len(second) == 5 and not set(first) & set(second)
    assert set(first) | set(second) == set(ids) - {ids[0]}
    assert claim_videos(ctx, "b3", None) == []
    with session_scope(ctx.sessions) as s:
        owners = dict(s.execute(select(Video.id, Video.build_id)).all())
    assert {owners[i] for i in first} == {"b1"} and {owners[i] for i in second} == {"b2"}


def test_ensure_build_upserts(ctx):
    ensure_build(ctx, "b", {"limit": 5}, "cpu")
    with session_scope(ctx.sessions) as s:
        s.get(Build, "b").state = "done"
    ensure_build(ctx, "b", {"limit": 9}, "tiny")
    with session_scope(ctx.sessions) as s:
        b = s.get(Build, "b")
        assert (b.params, b.profile, b.state) == ({"limit": 9}, "tiny", "running")
        assert s.scalar(select(func.count()).select_from(Build)) == 1


def test_concurrent_claims_never_share_a_video(pg_ctx, tmp_path):
    ids = _register_n(pg_ctx, tmp_path, 60)
    claimed: dict[str, list[str]] = {"A": [], "B": []}
    barrier = threading.Barrier(2)

    def claimer(build):
        barrier.wait()
        while batch := claim_videos(pg_ctx, build, 3):
            claimed[build] += batch

    threads = [threading.Thread(target=claimer, args=(b,)) for b in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    a, b = claimed["A"], claimed["B"]
    assert len(a) + len(b) == 60 and set(a) | set(b) == set(ids) and not set(a) & set(b)
    with session_scope(pg_ctx.sessions) as s:
        owners = dict(s.execute(select(Video.id, Video.build_id)).all())
    assert all(owners[i] == "A" for i in a) and all(owners[i] == "B" for i in b)


def test_claims_skip_rows_locked_by_another_claimer(pg_ctx, pg_db, tmp_path):
    """A claimer holding rows in an open transaction does not block the next one,
    and the rows it holds are not claimed twice."""
    ids = _register_n(pg_ctx, tmp_path, 12)
    ensure_build(pg_ctx, "holder", {}, "cpu")
    other = create_engine(pg_db)
    conn = other.connect()
    tx = conn.begin()
    held = [r[0] for r in conn.execute(text(
        "SELECT id FROM videos ORDER BY created_at, id LIMIT 5 FOR UPDATE"))]
    result: list[list[str]] = []
    t = threading.Thread(target=lambda: result.append(claim_videos(pg_ctx, "fast", None)))
    try:
        t.start()
        t.join(15)
        assert not t.is_alive(), "claim_videos waited on rows locked by another transaction"
        assert set(result[0]) == set(ids) - set(held)
    finally:
        tx.rollback()
        conn.close()
        t.join(15)
        other.dispose()
    assert sorted(claim_videos(pg_ctx, "late", None)) == sorted(held)


def test_sources_from_outside_are_confined_to_the_store_and_allowed_roots(tmp_path, monkeypatch):
    from opensubject_tasks import orchestrate
    from opensubject_tasks.db.engine import session_scope, upgrade
    from opensubject_tasks.db.models import Build
    from opensubject_tasks.services.ingest import SourceNotAllowed, check_source_allowed

    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (allowed / "link").symlink_to(tmp_path / "secret")
    ctx = Context.from_settings(load_settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                              ingest={"allowed_roots": [str(allowed)]}))
    for ok in ("store://raw/", "store://incoming/2026/", str(allowed), str(allowed / "sub"),
               (allowed / "sub").as_uri()):
        assert check_source_allowed(ctx, ok) == ok
    for bad in (str(tmp_path / "secret"), str(allowed / ".." / "secret"), str(allowed / "link"),
                "/etc", "/", str(tmp_path / "allowed-not")):
        with pytest.raises(SourceNotAllowed, match="is not allowed: use store://PREFIX"):
            check_source_allowed(ctx, bad)
    with pytest.raises(Exception, match="unsafe store key"):
        check_source_allowed(ctx, "store://../escape/")
    bare = Context.from_settings(load_settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}"))
    with pytest.raises(SourceNotAllowed, match="none configured"):
        check_source_allowed(bare, str(allowed))

    # from the build DAG's first task: refused before anything is written
    monkeypatch.setenv("OPENSUBJECT_DATABASE_URL", f"sqlite:///{tmp_path / 'db.sqlite'}")
    monkeypatch.setenv("OPENSUBJECT_INGEST__ALLOWED_ROOTS", json.dumps([str(allowed)]))
    upgrade(ctx.engine)
    with pytest.raises(SourceNotAllowed):
        orchestrate.start_build({"build_name": "b", "source": "/etc"}, "run-1")
    with session_scope(ctx.sessions) as s:
        assert s.get(Build, "b") is None
    assert orchestrate.start_build({"build_name": "b", "source": str(allowed / "sub")}, "run-1") == "b"


def test_skipped_inputs_travel_as_counts(ctx, tmp_path):
    """A prefix laid out like video2dataset output holds a caption and a metadata file per
    video: what goes to the orchestrator (task outcome, trigger event, XCom, log) counts
    them per reason, whatever their number; the first few names are kept as examples."""
    root = tmp_path / "shards"
    root.mkdir()
    for i in range(40):
        (root / f"{i:05d}.txt").write_text("a caption")
        (root / f"{i:05d}.json").write_text("{}")
    res = register_source(ctx, str(root))
    txt, js = "not a video file name (extension '.txt')", "not a video file name (extension '.json')"
    assert res.to_dict()["skipped"] == {txt: 40, js: 40} and len(res.skipped) == 80
    assert res.skipped.examples == {js: ["00000.json", "00001.json", "00002.json"],
                                    txt: ["00000.txt", "00001.txt", "00002.txt"]}
    assert "00039" not in json.dumps(res.to_dict())

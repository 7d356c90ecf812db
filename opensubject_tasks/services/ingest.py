"""Stage 0: register videos from a folder or a store prefix, and hand them to builds.

Identity is content: the SHA-256 of a local file (streamed), or ``<etag>:<size>`` of
a store object (no download needed). The video id is the first 32 hex characters of
``sha256(content_hash)``, and ``content_hash`` is unique, so re-running registers
nothing twice — also when two ingests race (insert-if-absent in the database).

Every file with a video extension is registered, even an empty or corrupt one: the
curate stage then rejects it with a recorded reason. Files that cannot be read at
all, or that do not look like videos by name, are reported as skipped.
"""
from __future__ import annotations

import hashlib
import os
from datetime import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import Select, Update, select, tuple_, update
from sqlalchemy.orm import Session

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.models import Build, Duplicate, Video, utcnow
from opensubject_tasks.errors import BadInput, UnsafeKey
from opensubject_tasks.storage.sources import file_uri, parse_source, store_uri

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".m2v", ".ts", ".mts",
    ".m2ts", ".flv", ".wmv", ".asf", ".3gp", ".3g2", ".ogv", ".vob", ".mxf", ".y4m",
})
_BATCH = 500  # candidates per database round trip


_SKIP_EXAMPLES = 3  # names kept per skip reason (the counts are complete)


@dataclass
class Skipped:
    """Inputs not registered, counted per reason, with the first few names of each: a
    prefix laid out like video2dataset output holds a caption and a metadata file per
    video, and no list of them travels to an orchestrator or a log."""
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _SKIP_EXAMPLES:
            shown.append(name)

    def __len__(self) -> int:
        return sum(self.counts.values())


@dataclass
class IngestResult:
    new_ids: list[str] = field(default_factory=list)
    known_ids: list[str] = field(default_factory=list)
    skipped: Skipped = field(default_factory=Skipped)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (name, id of the video it copies)
    replaced: list[str] = field(default_factory=list)               # old versions of overwritten objects

    def to_dict(self) -> dict[str, Any]:
        """Counts only: this goes to task_outcomes, a trigger's event and Airflow's XCom."""
        return {"new": len(self.new_ids), "known": len(self.known_ids), "duplicates": len(self.duplicates),
                "replaced": len(self.replaced), "skipped": dict(self.skipped.counts)}


@dataclass(frozen=True)
class _Candidate:
    content_hash: str
    source_uri: str
    name: str
    size: int

    @property
    def video_id(self) -> str:
        return video_id_for(self.content_hash)


def video_id_for(content_hash: str) -> str:
    return hashlib.sha256(content_hash.encode()).hexdigest()[:32]


def is_video_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in VIDEO_EXTENSIONS


def _display(name: str) -> str:
    # File names may hold bytes that are not UTF-8 (kept as surrogates by Python): the
    # database needs valid text, the exact name lives on in source_uri.
    return os.fsencode(name).decode("utf-8", "replace").replace("\x00", "")


def _insert(session: Session, model: type) -> Any:  # noqa: ANN401 - a dialect insert construct
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"ingest supports PostgreSQL and SQLite, not {dialect}")
    return insert(model)


class SourceNotAllowed(BadInput):
    """A source outside the store and the configured folders: refused before any work."""


def check_source_allowed(ctx: Context, source: str) -> str:
    """The source, if a build started from outside (the UI, the API) may read it:
    ``store://PREFIX`` (its key cannot leave the bucket's prefix space), or a folder or file
    on the workers under one of ``ingest.allowed_roots`` (links and ``..`` resolved first)."""
    src = parse_source(source)
    if src.kind == "store":
        return source
    assert src.path is not None
    roots = [Path(r).resolve() for r in ctx.settings.ingest.allowed_roots]
    target = src.path.resolve()
    if any(target == r or target.is_relative_to(r) for r in roots):
        return source
    allowed = ", ".join(str(r) for r in roots) if roots else "none configured"
    raise SourceNotAllowed(
        f"source {source!r} is not allowed: use store://PREFIX, or a folder under an allowed root "
        f"({allowed}; set OPENSUBJECT_INGEST__ALLOWED_ROOTS on the workers and Airflow)")


# -- candidates ----------------------------------------------------------------
def _folder_candidates(root: Path, skipped: Skipped) -> Iterator[_Candidate]:
    if root.is_file():
        files: Iterable[Path] = [root]
    elif root.is_dir():
        files = _walk(root, skipped)
    else:
        raise BadInput(f"source folder does not exist: {root}")
    for path in files:
        name = _display(path.name)
        if not is_video_name(path.name):
            skipped.add(name, f"not a video file name (extension {path.suffix.lower() or 'none'!r})")
            continue
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            skipped.add(name, f"unreadable: {exc.strerror or type(exc).__name__}")
            continue
        yield _Candidate(digest, file_uri(path), name, size)


def _walk(root: Path, skipped: Skipped) -> Iterator[Path]:
    """Files under root in a stable order; does not follow symlinked folders (no loops)."""
    def onerror(exc: OSError) -> None:
        skipped.add(_display(str(exc.filename)), f"unreadable folder: {exc.strerror or type(exc).__name__}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _store_candidates(ctx: Context, prefix: str, skipped: Skipped) -> Iterator[_Candidate]:
    for info in ctx.store.list(prefix):
        cand = store_candidate(info.key, info.etag, info.size)
        if isinstance(cand, str):
            skipped.add(PurePosixPath(info.key).name, cand)
            continue
        yield cand


def store_candidate(key: str, etag: str, size: int) -> _Candidate | str:
    """What registering a store object needs, or the reason it is skipped."""
    name = PurePosixPath(key).name
    if not is_video_name(name):
        return "not a video file name"
    if not etag:
        return "the store gave no etag to identify it by"
    try:
        uri = store_uri(key)
    except UnsafeKey:
        return "unsafe object key"
    return _Candidate(f"{etag}:{size}", uri, name, size)


# -- registration ----------------------------------------------------------------
def register_source(ctx: Context, source: str, build_id: str | None = None,
                    limit: int | None = None) -> IngestResult:
    """Register the videos of a folder (or one file) or of ``store://<prefix>``.

    New videos get ``build_id`` when given (the build row is created if absent);
    known videos keep theirs. ``limit`` caps how many new videos are registered.
    """
    src = parse_source(source)
    result = IngestResult()
    if limit is not None and limit <= 0:
        return result
    if build_id is not None:
        _ensure_build_exists(ctx, build_id)
    if src.kind == "store":
        candidates = _store_candidates(ctx, src.key, result.skipped)
    else:
        assert src.path is not None
        candidates = _folder_candidates(src.path, result.skipped)

    batch: list[_Candidate] = []
    for cand in candidates:
        batch.append(cand)
        # With a limit, smaller batches: no file is hashed far past the point of stopping.
        wanted = _BATCH if limit is None else min(_BATCH, limit - len(result.new_ids))
        if len(batch) >= wanted:
            _register_batch(ctx, batch, build_id, limit, result)
            batch = []
            if limit is not None and len(result.new_ids) >= limit:
                break
    if batch:
        _register_batch(ctx, batch, build_id, limit, result)
    return result


def _register_batch(ctx: Context, batch: list[_Candidate], build_id: str | None,
                    limit: int | None, result: IngestResult) -> None:
    """One round trip for a batch: what is new becomes a video (the first file of each
    content), a file whose bytes equal a registered video's is recorded as its duplicate,
    and a new version of an object at a known key retires the old one if it never started."""
    with session_scope(ctx.sessions) as s:
        known = {h: (vid, uri) for h, vid, uri in s.execute(known_by_content({c.content_hash for c in batch}))}
        firsts: dict[str, _Candidate] = {}
        copies: list[_Candidate] = []
        for c in batch:
            if c.content_hash in known:
                if c.source_uri == known[c.content_hash][1]:
                    result.known_ids.append(known[c.content_hash][0])
                else:
                    copies.append(c)
            elif c.content_hash in firsts:
                copies.append(c)
            else:
                firsts[c.content_hash] = c
        fresh = list(firsts.values())
        if limit is not None:
            fresh = fresh[: max(0, limit - len(result.new_ids))]
        inserted: set[str] = set()
        now = utcnow()
        if fresh:
            rows = [{"id": c.video_id, "content_hash": c.content_hash, "source_uri": c.source_uri,
                     "name": c.name, "size_bytes": c.size, "build_id": build_id,
                     "state": "registered", "created_at": now, "updated_at": now} for c in fresh]
            # Another ingest may have registered some of these since the select above:
            # the unique content_hash makes the database keep exactly one.
            stmt = _insert(s, Video).values(rows).on_conflict_do_nothing().returning(Video.id)
            inserted = set(s.scalars(stmt))
        for c in fresh:
            (result.new_ids if c.video_id in inserted else result.known_ids).append(c.video_id)
        registered = set(known) | {c.content_hash for c in fresh}
        copies = [c for c in copies if c.content_hash in registered]  # not those the limit left out
        if copies:
            s.execute(_insert(s, Duplicate).values([
                {"video_id": c.video_id, "source_uri": c.source_uri, "name": c.name, "size_bytes": c.size,
                 "created_at": now} for c in copies]).on_conflict_do_nothing())
            result.duplicates += [(c.name, c.video_id) for c in copies]
        if inserted:
            result.replaced += _retire_old_versions(s, [c for c in fresh if c.video_id in inserted])


@hot_query("ingest batch", lambda f: {"content_hashes": f.content_hashes})
def known_by_content(content_hashes: Iterable[str]) -> Select:
    return (select(Video.content_hash, Video.id, Video.source_uri)
            .where(Video.content_hash.in_(sorted(content_hashes))))


@hot_query("ingest batch", lambda f: {"by_uri": dict(zip(f.source_uris, f.video_ids, strict=True))})
def old_versions(by_uri: dict[str, str]) -> Select:
    """Videos registered at these source URIs, other than ``by_uri``'s new ones, that no
    work has touched yet."""
    return select(Video.id, Video.source_uri).where(
        Video.source_uri.in_(list(by_uri)), Video.id.not_in(list(by_uri.values())),
        Video.state == "registered", Video.stage_done.is_(None), Video.queued_at.is_(None))


def _retire_old_versions(s: Session, new: list[_Candidate]) -> list[str]:
    """An object overwritten at the same key is a new video: the row of the old version is
    rejected with that reason if no work on it has started (a started one is checked by
    curate, which refuses bytes that are no longer the ones registered)."""
    by_uri = {c.source_uri: c.video_id for c in new}
    old = s.execute(old_versions(by_uri)).all()
    for vid, uri in old:
        s.execute(update(Video).where(Video.id == vid).values(
            state="rejected", reason=f"replaced by a new version at {uri} (video {by_uri[uri]}) before "
                                     "any work on it started").execution_options(synchronize_session=False))
    return [vid for vid, _ in old]


# -- builds ------------------------------------------------------------------------
def ensure_build(ctx: Context, build_id: str, params: dict[str, Any], profile: str) -> None:
    """Create the build, or update its params and profile and mark it running again."""
    now = utcnow()
    with session_scope(ctx.sessions) as s:
        stmt = _insert(s, Build).values(id=build_id, params=params, profile=profile,
                                        state="running", created_at=now, updated_at=now)
        s.execute(stmt.on_conflict_do_update(
            index_elements=[Build.id],
            set_={"params": stmt.excluded.params, "profile": stmt.excluded.profile,
                  "state": "running", "updated_at": now},
        ))


def _ensure_build_exists(ctx: Context, build_id: str) -> None:
    now = utcnow()
    with session_scope(ctx.sessions) as s:
        s.execute(_insert(s, Build).values(
            id=build_id, params={}, profile=ctx.settings.profile, state="running",
            created_at=now, updated_at=now,
        ).on_conflict_do_nothing())


CLAIM_BATCH = 10_000  # videos per claiming statement (and transaction)


@hot_query("claim", lambda f: {"build_id": f.build, "limit": CLAIM_BATCH, "after": (utcnow(), f.video)})
def claim_statement(build_id: str, limit: int, postgresql: bool = True,
                    after: tuple[datetime, str] | None = None) -> Update:
    """Give up to ``limit`` registered videos that no build holds to ``build_id``, oldest
    first; returns their ids.

    PostgreSQL: the candidates are picked in a MATERIALIZED CTE with FOR UPDATE SKIP LOCKED,
    so concurrent claimers never wait on each other and never share a video, and the pick
    runs exactly once (an ``IN (SELECT ... LIMIT n)`` may run again per row and update more
    than n). SQLite: one UPDATE, serialised by the database write lock. ``after``: the
    (created_at, id) of the last video claimed by the previous batch, so that a batch starts
    where the last one ended instead of stepping over the index entries of the videos
    claimed before (dead until vacuumed)."""
    pick = (select(Video.id).where(Video.build_id.is_(None), Video.state == "registered")
            .order_by(Video.created_at, Video.id).limit(limit))
    if after is not None:
        pick = pick.where(tuple_(Video.created_at, Video.id) > tuple_(*after))
    if postgresql:
        picked = pick.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
        target = Video.id == picked.c.id
    else:
        target = Video.id.in_(pick.scalar_subquery())
    return (update(Video).where(target, Video.build_id.is_(None))
            .values(build_id=build_id, updated_at=utcnow()).returning(Video.id, Video.created_at)
            .execution_options(synchronize_session=False))


def claim_batches(ctx: Context, build_id: str, limit: int | None = None) -> Iterator[list[str]]:
    """Claim registered videos that no build holds yet for ``build_id``, up to ``limit``
    (None: all), ``CLAIM_BATCH`` per transaction; yields the ids of each batch. No list of
    ids is ever sent to the database: a claim of 10^6 videos costs 10^2 statements."""
    if limit is not None and limit <= 0:
        return
    _ensure_build_exists(ctx, build_id)
    left, after = limit, None
    while left is None or left > 0:
        size = CLAIM_BATCH if left is None else min(CLAIM_BATCH, left)
        with session_scope(ctx.sessions) as s:
            postgresql = s.get_bind().dialect.name == "postgresql"
            rows = s.execute(claim_statement(build_id, size, postgresql, after)).all()
        ids = [r.id for r in rows]
        if ids:
            last = max(rows, key=lambda r: (r.created_at, r.id))
            after = (last.created_at, last.id)
            yield ids
        if len(ids) < size:
            return
        if left is not None:
            left -= len(ids)


def claim_videos(ctx: Context, build_id: str, limit: int | None = None) -> list[str]:
    """Assign registered videos that no build holds yet to build_id; returns their ids,
    sorted (``claim_count`` when only their number matters)."""
    return sorted(vid for ids in claim_batches(ctx, build_id, limit) for vid in ids)


def claim_count(ctx: Context, build_id: str, limit: int | None = None) -> int:
    """``claim_videos`` in memory bounded by a batch; returns how many were claimed."""
    return sum(len(ids) for ids in claim_batches(ctx, build_id, limit))

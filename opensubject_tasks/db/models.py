"""SQLAlchemy 2.0 models mirroring ``sql/*.sql`` (tests/test_schema.py checks for drift).

PostgreSQL is created from ``sql/``; SQLite (embedded mode) from these models.
"""
from __future__ import annotations

from datetime import datetime, UTC
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONType = JSON().with_variant(JSONB(), "postgresql")
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType}


def _ts(nullable: bool = False, onupdate: bool = False) -> Mapped[Any]:
    return mapped_column(
        DateTime(timezone=True),
        nullable=nullable,
        default=None if nullable else utcnow,
        onupdate=utcnow if onupdate else None,
    )


def _where(condition: str) -> dict[str, Any]:
    """A partial index's condition, for both dialects."""
    return {"postgresql_where": text(condition), "sqlite_where": text(condition)}


class SchemaMigration(Base):
    __tablename__ = "schema_migrations"
    filename: Mapped[str] = mapped_column(Text, primary_key=True)
    applied_at: Mapped[datetime] = _ts()


class Build(Base):
    __tablename__ = "builds"
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    profile: Mapped[str] = mapped_column(Text, default="cpu")
    state: Mapped[str] = mapped_column(Text, default="running")
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = _ts(onupdate=True)
    # sql/002_reliability.sql: the build-level stage last handed to a queue (export)
    queued_stage: Mapped[str | None] = mapped_column(Text, nullable=True)
    queued_task_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    queued_at: Mapped[datetime | None] = _ts(nullable=True)


class Video(Base):
    __tablename__ = "videos"
    __table_args__ = (
        Index("videos_state_idx", "state"),
        Index("videos_build_idx", "build_id"),
        Index("videos_build_chunk_idx", "build_id", "chunk"),
        # sql/005_hot_path_indexes.sql
        Index("videos_in_flight_idx", "queued_at", "id", **_where("state NOT IN ('done', 'rejected', 'failed')")),
        Index("videos_unclaimed_idx", "created_at", "id", **_where("build_id IS NULL AND state = 'registered'")),
        Index("videos_source_uri_idx", "source_uri"),
        # sql/006_leases_and_build_reads.sql
        Index("videos_build_state_idx", "build_id", "state"),
        # sql/009_continuous_hand_out.sql
        Index("videos_waiting_idx", "id", **_where("flow = 'waiting'")),
        Index("videos_flow_queued_idx", "id", **_where("flow = 'queued'")),
    )
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    content_hash: Mapped[str] = mapped_column(Text, unique=True)
    source_uri: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    build_id: Mapped[str | None] = mapped_column(
        Text, ForeignKey("builds.id", ondelete="SET NULL"), nullable=True
    )
    state: Mapped[str] = mapped_column(Text, default="registered")
    stage_done: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    probe: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = _ts(onupdate=True)
    # sql/002_reliability.sql: the stage last handed to a queue, its Celery task id and when
    queued_stage: Mapped[str | None] = mapped_column(Text, nullable=True)
    queued_task_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    queued_at: Mapped[datetime | None] = _ts(nullable=True)
    # sql/004_corpus_scale.sql
    chunk: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_stage: Mapped[str | None] = mapped_column(Text, nullable=True)
    resends: Mapped[int] = mapped_column(Integer, default=0)
    # sql/009_continuous_hand_out.sql: waiting | queued | NULL (services/handoff.py)
    flow: Mapped[str | None] = mapped_column(Text, nullable=True)


class Clip(Base):
    __tablename__ = "clips"
    __table_args__ = (UniqueConstraint("video_id", "idx"),)
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    video_id: Mapped[str] = mapped_column(Text, ForeignKey("videos.id", ondelete="RESTRICT"))
    idx: Mapped[int] = mapped_column(Integer)
    start_frame: Mapped[int] = mapped_column(Integer)
    end_frame: Mapped[int] = mapped_column(Integer)
    start_s: Mapped[float] = mapped_column(Float)
    end_s: Mapped[float] = mapped_column(Float)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    quality: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    state: Mapped[str] = mapped_column(Text, default="kept")
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    keyframes: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    created_at: Mapped[datetime] = _ts()


class Subject(Base):
    __tablename__ = "subjects"
    __table_args__ = (UniqueConstraint("clip_id", "idx"),)
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    clip_id: Mapped[str] = mapped_column(Text, ForeignKey("clips.id", ondelete="RESTRICT"))
    idx: Mapped[int] = mapped_column(Integer)
    category: Mapped[str] = mapped_column(Text)
    category_source: Mapped[str] = mapped_column(Text)
    consensus: Mapped[float | None] = mapped_column(Float, nullable=True)
    boxes: Mapped[dict[str, Any]] = mapped_column(JSONType)
    backends: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    state: Mapped[str] = mapped_column(Text, default="kept")
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _ts()


class Pair(Base):
    __tablename__ = "pairs"
    __table_args__ = (UniqueConstraint("subject_id", "ref_frame", "tgt_frame"),)
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    subject_id: Mapped[str] = mapped_column(Text, ForeignKey("subjects.id", ondelete="RESTRICT"))
    ref_frame: Mapped[int] = mapped_column(Integer)
    tgt_frame: Mapped[int] = mapped_column(Integer)
    ref_box: Mapped[list[Any]] = mapped_column(JSONType)
    tgt_box: Mapped[list[Any]] = mapped_column(JSONType)
    scores: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = _ts()


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (Index("samples_state_idx", "state"),
                      Index("samples_build_state_idx", "build_id", "state"),
                      # sql/008_build_counts.sql
                      Index("samples_build_updated_idx", "build_id", "updated_at", "id"))
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    pair_id: Mapped[str] = mapped_column(
        Text, ForeignKey("pairs.id", ondelete="RESTRICT"), unique=True
    )
    build_id: Mapped[str | None] = mapped_column(
        Text, ForeignKey("builds.id", ondelete="SET NULL"), nullable=True
    )
    state: Mapped[str] = mapped_column(Text, default="pending")
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    seed: Mapped[int] = mapped_column(BigInteger)
    keys: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    augment: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    backends: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    verdict: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    history: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    caption_short: Mapped[str | None] = mapped_column(Text, nullable=True)
    caption_long: Mapped[str | None] = mapped_column(Text, nullable=True)
    caption_source: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    queued_at: Mapped[datetime | None] = _ts(nullable=True)
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = _ts(onupdate=True)
    # sql/004_corpus_scale.sql
    error_stage: Mapped[str | None] = mapped_column(Text, nullable=True)
    resends: Mapped[int] = mapped_column(Integer, default=0)


class StageAttempt(Base):
    __tablename__ = "stage_attempts"
    __table_args__ = (
        Index("stage_attempts_entity_idx", "entity_type", "entity_id", "stage"),
        # sql/005_hot_path_indexes.sql
        Index("stage_attempts_build_idx", "build_id"),
        Index("stage_attempts_running_idx", "entity_type", "entity_id", **_where("status = 'running'")),
    )
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    build_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    entity_type: Mapped[str] = mapped_column(Text)
    entity_id: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    worker: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = _ts()
    finished_at: Mapped[datetime | None] = _ts(nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)


class Invalidation(Base):
    """sql/003_keep_finished_work.sql: what an explicit recompute removed, why and by whom."""
    __tablename__ = "invalidations"
    __table_args__ = (Index("invalidations_video_idx", "video_id"),)
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = _ts()
    actor: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(Text)
    video_id: Mapped[str] = mapped_column(Text)
    entity_type: Mapped[str] = mapped_column(Text)
    entity_id: Mapped[str] = mapped_column(Text)
    state: Mapped[str | None] = mapped_column(Text, nullable=True)
    objects: Mapped[list[Any]] = mapped_column(JSONType, default=list)


class TaskOutcome(Base):
    """sql/004_corpus_scale.sql: the outcome of a worker task an orchestrator waits for."""
    __tablename__ = "task_outcomes"
    task_id: Mapped[str] = mapped_column(Text, primary_key=True)
    task: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    finished_at: Mapped[datetime] = _ts()


class Duplicate(Base):
    """sql/004_corpus_scale.sql: an input whose bytes equal a registered video's."""
    __tablename__ = "duplicates"
    __table_args__ = (UniqueConstraint("source_uri", "video_id"), Index("duplicates_video_idx", "video_id"))
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    video_id: Mapped[str] = mapped_column(Text, ForeignKey("videos.id", ondelete="RESTRICT"))
    source_uri: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = _ts()


class ExportShard(Base):
    """sql/004_corpus_scale.sql: one shard of a build's export, planned then written."""
    __tablename__ = "export_shards"
    build_id: Mapped[str] = mapped_column(Text, primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    first_sample: Mapped[str] = mapped_column(Text)
    samples: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sha256: Mapped[str | None] = mapped_column(Text, nullable=True)
    written_at: Mapped[datetime | None] = _ts(nullable=True)


class ListingSegment(Base):
    """sql/007_listing_and_events.sql: a run of about a thousand keys of a listed source and
    the digest of their (key, etag, size) when a pass last registered them."""
    __tablename__ = "listing_segments"
    source: Mapped[str] = mapped_column(Text, primary_key=True)
    lower_key: Mapped[str] = mapped_column(Text, primary_key=True)
    objects: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(Text)


class ListingProgress(Base):
    """sql/007_listing_and_events.sql: where the listing of a source stands."""
    __tablename__ = "listing_progress"
    source: Mapped[str] = mapped_column(Text, primary_key=True)
    resume_after: Mapped[str | None] = mapped_column(Text, nullable=True)
    watermark: Mapped[str | None] = mapped_column(Text, nullable=True)
    passes: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = _ts()


class StoreEvent(Base):
    """sql/007_listing_and_events.sql: a bucket notification, as MinIO's PostgreSQL target
    (format access) writes it."""
    __tablename__ = "store_events"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    event_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    event_data: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)


class EntityLease(Base):
    """sql/006_leases_and_build_reads.sql: one run per entity at a time (db/locks.py)."""
    __tablename__ = "entity_leases"
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    holder: Mapped[str] = mapped_column(Text)
    taken_at: Mapped[datetime] = _ts()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BuildCount(Base):
    """sql/008_build_counts.sql: a build's counts, kept by PostgreSQL triggers (readmodel.py);
    SQLite counts its rows instead."""
    __tablename__ = "build_counts"
    build_id: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class BuildCountDelta(Base):
    """sql/008_build_counts.sql: one change of a build's counts, not yet folded into build_counts."""
    __tablename__ = "build_count_deltas"
    __table_args__ = (Index("build_count_deltas_build_idx", "build_id"),)
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    build_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(Text)
    d: Mapped[int] = mapped_column(BigInteger)

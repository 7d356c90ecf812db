-- Builds of 10^5-10^6 videos: Airflow maps over chunks of videos, the workers chain each
-- video's stages, and the database says when a chunk is finished.

-- The chunk of its build a video was handed out in (videos of a chunk are one Airflow task).
ALTER TABLE videos ADD COLUMN IF NOT EXISTS chunk INTEGER;
CREATE INDEX IF NOT EXISTS videos_build_chunk_idx ON videos (build_id, chunk);
-- The stage whose error (not bad input) failed the video or sample; null otherwise. A
-- retry (clearing the chunk) redoes exactly these.
ALTER TABLE videos ADD COLUMN IF NOT EXISTS error_stage TEXT;
ALTER TABLE samples ADD COLUMN IF NOT EXISTS error_stage TEXT;
-- Times the reconciler sent this work again because its message was lost.
ALTER TABLE videos ADD COLUMN IF NOT EXISTS resends INTEGER NOT NULL DEFAULT 0;
ALTER TABLE samples ADD COLUMN IF NOT EXISTS resends INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS samples_build_state_idx ON samples (build_id, state);

-- The outcome of each worker task an orchestrator waits for (registration, export), read
-- by Airflow's triggers with their own pooled connections (Celery keeps no results).
CREATE TABLE IF NOT EXISTS task_outcomes (
    task_id      TEXT PRIMARY KEY,                -- the Celery task id
    task         TEXT NOT NULL,                   -- e.g. ingest, export_part, export
    status       TEXT NOT NULL,                   -- success | failure
    result       JSONB,
    error        TEXT,
    finished_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every input is accounted for: a file or object whose bytes equal a registered video's.
CREATE TABLE IF NOT EXISTS duplicates (
    id           BIGSERIAL PRIMARY KEY,
    video_id     TEXT NOT NULL REFERENCES videos(id) ON DELETE RESTRICT,
    source_uri   TEXT NOT NULL,
    name         TEXT NOT NULL,
    size_bytes   BIGINT NOT NULL DEFAULT 0,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (source_uri, video_id)
);
CREATE INDEX IF NOT EXISTS duplicates_video_idx ON duplicates (video_id);

-- An export's shards: which verified samples each holds (from first_sample, in id order,
-- up to the next shard's first sample), planned before the shard tasks run and filled in
-- by the task that writes the shard.
CREATE TABLE IF NOT EXISTS export_shards (
    build_id      TEXT NOT NULL,
    shard         INTEGER NOT NULL,
    first_sample  TEXT NOT NULL,
    samples       INTEGER NOT NULL,
    bytes         BIGINT,
    sha256        TEXT,
    written_at    TIMESTAMPTZ,
    PRIMARY KEY (build_id, shard)
);

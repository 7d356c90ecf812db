-- OpenSubject metadata schema (PostgreSQL). Files in sql/ are applied in name order
-- by `opensubject db upgrade` and by the docker-compose postgres init.
-- Ids are text derived from content, so every task is an idempotent upsert.

CREATE TABLE IF NOT EXISTS schema_migrations (
    filename    TEXT PRIMARY KEY,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS builds (
    id          TEXT PRIMARY KEY,                -- the build name
    params      JSONB NOT NULL DEFAULT '{}'::jsonb,
    profile     TEXT NOT NULL DEFAULT 'cpu',
    state       TEXT NOT NULL DEFAULT 'running', -- running | done | failed
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS videos (
    id            TEXT PRIMARY KEY,              -- first 32 hex chars of the content sha256
    content_hash  TEXT NOT NULL UNIQUE,          -- sha256 hex, or etag:size for store objects
    source_uri    TEXT NOT NULL,                 -- file:///abs/path or store://<key> (an object in the configured bucket)
    name          TEXT NOT NULL,                 -- original file name (display only)
    size_bytes    BIGINT NOT NULL DEFAULT 0,
    build_id      TEXT REFERENCES builds(id) ON DELETE SET NULL,
    state         TEXT NOT NULL DEFAULT 'registered', -- registered | running | done | rejected | failed
    stage_done    TEXT,                          -- last completed stage: curate | mine | ...
    reason        TEXT,                          -- why rejected / failed
    probe         JSONB,                         -- container, codec, width, height, fps, frames, duration
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS videos_state_idx ON videos (state);
CREATE INDEX IF NOT EXISTS videos_build_idx ON videos (build_id);

CREATE TABLE IF NOT EXISTS clips (
    id            TEXT PRIMARY KEY,              -- <video_id>-c<idx>
    video_id      TEXT NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    start_frame   INTEGER NOT NULL,              -- inclusive
    end_frame     INTEGER NOT NULL,              -- exclusive
    start_s       DOUBLE PRECISION NOT NULL,
    end_s         DOUBLE PRECISION NOT NULL,
    score         DOUBLE PRECISION,              -- quality / aesthetic score used by the filter
    quality       JSONB,                         -- per-metric scores and the scorer's name
    state         TEXT NOT NULL DEFAULT 'kept',  -- kept | rejected | mined | done
    reason        TEXT,
    keyframes     JSONB NOT NULL DEFAULT '[]'::jsonb, -- [{"frame": n, "key": "..."}]
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (video_id, idx)
);

CREATE TABLE IF NOT EXISTS subjects (
    id               TEXT PRIMARY KEY,           -- <clip_id>-s<idx>
    clip_id          TEXT NOT NULL REFERENCES clips(id) ON DELETE CASCADE,
    idx              INTEGER NOT NULL,
    category         TEXT NOT NULL,
    category_source  TEXT NOT NULL,              -- backend that named it ("none" => generic label)
    consensus        DOUBLE PRECISION,           -- share of keyframes agreeing on the category
    boxes            JSONB NOT NULL,             -- {"<frame>": [x0, y0, x1, y1], ...}
    backends         JSONB NOT NULL DEFAULT '{}'::jsonb,
    state            TEXT NOT NULL DEFAULT 'kept',
    reason           TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (clip_id, idx)
);

CREATE TABLE IF NOT EXISTS pairs (
    id          TEXT PRIMARY KEY,                -- <subject_id>-p<ref>-<tgt>
    subject_id  TEXT NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
    ref_frame   INTEGER NOT NULL,
    tgt_frame   INTEGER NOT NULL,
    ref_box     JSONB NOT NULL,
    tgt_box     JSONB NOT NULL,
    scores      JSONB NOT NULL DEFAULT '{}'::jsonb, -- identity, diversity and its parts
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (subject_id, ref_frame, tgt_frame)
);

-- One sample per pair: both the generation input (outpainted subject) and the
-- manipulation input (target with the subject's box inpainted). It cycles through
-- synthesize -> verify until verified or rejected at max_attempts.
CREATE TABLE IF NOT EXISTS samples (
    id            TEXT PRIMARY KEY,              -- <pair_id>
    pair_id       TEXT NOT NULL UNIQUE REFERENCES pairs(id) ON DELETE CASCADE,
    build_id      TEXT REFERENCES builds(id) ON DELETE SET NULL,
    state         TEXT NOT NULL DEFAULT 'pending', -- pending | synthesized | verified | rejected | failed
    attempt       INTEGER NOT NULL DEFAULT 1,
    seed          BIGINT NOT NULL,
    keys          JSONB NOT NULL DEFAULT '{}'::jsonb, -- reference, mask, generation_input, manipulation_input, target
    augment       JSONB,                         -- recorded geometry transform and erosion parameters
    backends      JSONB NOT NULL DEFAULT '{}'::jsonb,
    verdict       JSONB,                         -- last verdict: passed, scores, reasons
    history       JSONB NOT NULL DEFAULT '[]'::jsonb, -- one entry per attempt: seed, verdict, reasons
    caption_short TEXT,
    caption_long  TEXT,
    caption_source TEXT,
    reason        TEXT,
    queued_at     TIMESTAMPTZ,                   -- last time work was enqueued (lost-message sweep)
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS samples_state_idx ON samples (state);

CREATE TABLE IF NOT EXISTS stage_attempts (
    id           BIGSERIAL PRIMARY KEY,
    build_id     TEXT,
    entity_type  TEXT NOT NULL,                  -- video | clip | sample | build
    entity_id    TEXT NOT NULL,
    stage        TEXT NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 1,
    worker       TEXT,
    status       TEXT NOT NULL,                  -- running | ok | rejected | failed | timeout | retry
    error        TEXT,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at  TIMESTAMPTZ,
    duration_s   DOUBLE PRECISION,
    details      JSONB
);
CREATE INDEX IF NOT EXISTS stage_attempts_entity_idx ON stage_attempts (entity_type, entity_id, stage);

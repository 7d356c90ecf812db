-- One run per entity at a time, without holding a connection: a lease row per entity in
-- work (video:<id>, build:<id>, ...), taken by an atomic upsert, renewed while its stage
-- runs, deleted when it ends, and taken over once expired (its holder died or froze).
-- Works behind PgBouncer's transaction pooling, where session-level advisory locks do not.
CREATE TABLE IF NOT EXISTS entity_leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,                    -- host:pid:token of the run holding it
    taken_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL
);

-- The read model counts a build's videos by state (dashboard, status, chunk reports) and
-- lists its failed videos: an index-only GROUP BY over the build's own entries.
CREATE INDEX IF NOT EXISTS videos_build_state_idx ON videos (build_id, state);

-- Re-runs never destroy finished work.
--
-- Deleting a parent row no longer cascades to what was made from it: clips -> subjects ->
-- pairs -> samples now refuse (RESTRICT). Replacing a video's clips therefore cannot
-- silently take its verified samples along; the only path that removes derived rows is an
-- explicit recompute, which deletes bottom-up and records each row and object it removes.

ALTER TABLE clips DROP CONSTRAINT IF EXISTS clips_video_id_fkey;
ALTER TABLE clips ADD CONSTRAINT clips_video_id_fkey
    FOREIGN KEY (video_id) REFERENCES videos(id) ON DELETE RESTRICT;
ALTER TABLE subjects DROP CONSTRAINT IF EXISTS subjects_clip_id_fkey;
ALTER TABLE subjects ADD CONSTRAINT subjects_clip_id_fkey
    FOREIGN KEY (clip_id) REFERENCES clips(id) ON DELETE RESTRICT;
ALTER TABLE pairs DROP CONSTRAINT IF EXISTS pairs_subject_id_fkey;
ALTER TABLE pairs ADD CONSTRAINT pairs_subject_id_fkey
    FOREIGN KEY (subject_id) REFERENCES subjects(id) ON DELETE RESTRICT;
ALTER TABLE samples DROP CONSTRAINT IF EXISTS samples_pair_id_fkey;
ALTER TABLE samples ADD CONSTRAINT samples_pair_id_fkey
    FOREIGN KEY (pair_id) REFERENCES pairs(id) ON DELETE RESTRICT;

-- What an explicit recompute removed: one row per invalidated row, with the objects it
-- pointed to, why, and who asked.
CREATE TABLE IF NOT EXISTS invalidations (
    id           BIGSERIAL PRIMARY KEY,
    at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor        TEXT NOT NULL,                   -- user@host, or the Airflow run that asked
    reason       TEXT NOT NULL,                   -- e.g. "rerun curate --recompute: new thresholds"
    stage        TEXT NOT NULL,                   -- the stage recomputed
    video_id     TEXT NOT NULL,
    entity_type  TEXT NOT NULL,                   -- clip | subject | pair | sample | object
    entity_id    TEXT NOT NULL,
    state        TEXT,                            -- the row's state when it was removed
    objects      JSONB NOT NULL DEFAULT '[]'::jsonb  -- store keys removed with it
);
CREATE INDEX IF NOT EXISTS invalidations_video_idx ON invalidations (video_id);

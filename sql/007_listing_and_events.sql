-- New objects reach the project from bucket notifications; the scheduled listing is a
-- safety net whose cost is O(new).

-- The listing remembers what it has seen: a source's keys are cut into segments of about
-- a thousand keys (a segment holds the keys from its lower_key up to the next segment's).
-- A segment whose digest of (key, etag, size) is unchanged since a pass registered it
-- needs no database work.
CREATE TABLE IF NOT EXISTS listing_segments (
    source     TEXT NOT NULL,                     -- store://<prefix>
    lower_key  TEXT NOT NULL,                     -- '' for the first segment
    objects    INTEGER NOT NULL,
    digest     TEXT NOT NULL,
    PRIMARY KEY (source, lower_key)
);

-- Where a listing pass of a source stands: a pass stopped by its time limit (or killed)
-- continues after resume_after; watermark is the greatest key seen of a source whose new
-- keys always sort after the old ones (date-partitioned).
CREATE TABLE IF NOT EXISTS listing_progress (
    source        TEXT PRIMARY KEY,
    resume_after  TEXT,
    watermark     TEXT,
    passes        INTEGER NOT NULL DEFAULT 0,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- MinIO's PostgreSQL notification target (format "access") appends one row per bucket
-- event: INSERT INTO store_events (event_time, event_data). The id orders them for the
-- consumer, which deletes the rows it has registered.
CREATE TABLE IF NOT EXISTS store_events (
    id          BIGSERIAL PRIMARY KEY,
    event_time  TIMESTAMPTZ NOT NULL,
    event_data  JSONB
);
-- MinIO creates the table itself (without the id) when it starts first.
ALTER TABLE store_events ADD COLUMN IF NOT EXISTS id BIGSERIAL PRIMARY KEY;
-- MinIO logs in as its own role (deploy/postgres/00-roles.sh), allowed to append events only
-- (it checks the table with SELECT 1 at start).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'opensubject_events') THEN
        GRANT SELECT, INSERT ON store_events TO opensubject_events;
        GRANT USAGE ON SEQUENCE store_events_id_seq TO opensubject_events;
    END IF;
END $$;

-- Every query on a hot path reaches its own rows through an index, whatever the database
-- already holds (opensubject_tasks/db/hot_queries.py lists them; tests/test_hot_queries.py
-- fails on a sequential scan of a big table).
--
-- On a database that already holds a large history, building these takes minutes and
-- blocks writes to the table meanwhile: create them first with CREATE INDEX CONCURRENTLY
-- under the same names, and this file then changes nothing.

-- A build's attempts (its export's statistics, the dashboard's per-build view).
CREATE INDEX IF NOT EXISTS stage_attempts_build_idx ON stage_attempts (build_id);
-- Attempts marked running: few at any time (bounded by the worker slots), asked for by
-- entity (a chunk's or the reconciler's "is anything of this running?").
CREATE INDEX IF NOT EXISTS stage_attempts_running_idx ON stage_attempts (entity_type, entity_id)
    WHERE status = 'running';
-- Unfinished videos by hand-off time: the reconciler's candidates, a page at a time.
CREATE INDEX IF NOT EXISTS videos_in_flight_idx ON videos (queued_at, id)
    WHERE state NOT IN ('done', 'rejected', 'failed');
-- Registered videos no build holds, oldest first: what a claim takes.
CREATE INDEX IF NOT EXISTS videos_unclaimed_idx ON videos (created_at, id)
    WHERE build_id IS NULL AND state = 'registered';
-- An object overwritten at a known key (ingest retires the old version's row).
CREATE INDEX IF NOT EXISTS videos_source_uri_idx ON videos (source_uri);

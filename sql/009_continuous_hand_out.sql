-- A build hands its videos out continuously instead of in waves: a chunk registers its
-- videos as waiting, and each video that leaves the queues pulls the next waiting one, so
-- at most celery.max_videos_in_flight videos are queued or running at any time.
-- flow: 'waiting' (registered by its chunk, not handed out yet), 'queued' (handed out and
-- counted against the bound), NULL (neither).
ALTER TABLE videos ADD COLUMN IF NOT EXISTS flow TEXT;

-- The next waiting video (in id order, from any chunk) and the count of those in flight: each partial
-- index holds only the rows of its kind, so both stay small whatever the corpus holds.
CREATE INDEX IF NOT EXISTS videos_waiting_idx ON videos (id) WHERE flow = 'waiting';
CREATE INDEX IF NOT EXISTS videos_flow_queued_idx ON videos (id) WHERE flow = 'queued';

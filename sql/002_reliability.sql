-- Work handed to the queues, recorded next to the row it is for. PostgreSQL is the source
-- of truth for work; a queued message is only derived from it. A broker that loses its
-- messages (a restart without persistence, a flush) loses no work: the reconciler
-- (opensubject_tasks/services/reconcile.py) sends again every unit still outstanding
-- long after it was queued, under the same Celery task id, so whoever waits on that id
-- sees it finish. Samples already carry samples.queued_at.

ALTER TABLE videos ADD COLUMN IF NOT EXISTS queued_stage TEXT;     -- curate | mine: last stage handed to a queue
ALTER TABLE videos ADD COLUMN IF NOT EXISTS queued_task_id TEXT;   -- its Celery task id
ALTER TABLE videos ADD COLUMN IF NOT EXISTS queued_at TIMESTAMPTZ; -- when it was handed over

ALTER TABLE builds ADD COLUMN IF NOT EXISTS queued_stage TEXT;     -- export
ALTER TABLE builds ADD COLUMN IF NOT EXISTS queued_task_id TEXT;
ALTER TABLE builds ADD COLUMN IF NOT EXISTS queued_at TIMESTAMPTZ;

-- A build's counts kept as its rows change, so that the dashboard, `status` and the build
-- report read a handful of rows per build, whatever the build holds (10^6 videos, 10^7
-- attempts). Kinds (key in brackets):
--   videos [state], curated [''] (videos with a finished stage), clips [state],
--   subjects [state], pairs [''], duplicates [''], samples [state], resynthesized ['']
--   (samples past their first attempt), sample_reason:<state> [reason] (rejected or failed
--   samples), attempts:<stage> [status], retries:<stage> [status] (attempts past the first).
-- Clips, subjects, pairs and duplicates count in their video's build; samples and attempts
-- in their own build_id. '' stands for no build (registered videos not yet claimed).
--
-- Triggers append a delta row per change instead of updating a shared counter: every
-- worker of a build would otherwise queue on the same few counter rows until its
-- transaction commits (and two transactions moving counts in opposite directions could
-- deadlock). A reader folds a build's deltas into build_counts (DELETE ... RETURNING, so
-- two readers never fold the same delta) and reads the sum.
CREATE TABLE IF NOT EXISTS build_counts (
    build_id  TEXT NOT NULL,
    kind      TEXT NOT NULL,
    key       TEXT NOT NULL,
    n         BIGINT NOT NULL,
    PRIMARY KEY (build_id, kind, key)
);

CREATE TABLE IF NOT EXISTS build_count_deltas (
    id        BIGSERIAL PRIMARY KEY,
    build_id  TEXT NOT NULL,
    kind      TEXT NOT NULL,
    key       TEXT NOT NULL,
    d         BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS build_count_deltas_build_idx ON build_count_deltas (build_id);

-- The dashboard's most recent samples of a build: the newest entries of the build's index,
-- read backwards, not a sort of all its samples.
CREATE INDEX IF NOT EXISTS samples_build_updated_idx ON samples (build_id, updated_at, id);

-- One row's change: -1 for each of its old keys in its old build, +1 for each new key in
-- its new build; keys are 'kind<US>key' (US = chr(31)), a NULL build adds nothing.
CREATE OR REPLACE FUNCTION build_count_move(ob TEXT, old_keys TEXT[], nb TEXT, new_keys TEXT[])
RETURNS void LANGUAGE sql AS $$
    INSERT INTO build_count_deltas (build_id, kind, key, d)
    SELECT b, left(x, strpos(x, chr(31)) - 1), substr(x, strpos(x, chr(31)) + 1), sum(d)
    FROM (SELECT ob AS b, unnest(old_keys) AS x, -1 AS d
          UNION ALL SELECT nb, unnest(new_keys), 1) t
    WHERE b IS NOT NULL
    GROUP BY b, x HAVING sum(d) <> 0
$$;

CREATE OR REPLACE FUNCTION build_counts_videos() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ob TEXT; nb TEXT; ok TEXT[] := '{}'; nk TEXT[] := '{}';
BEGIN
    IF TG_OP <> 'INSERT' THEN
        ob := coalesce(OLD.build_id, '');
        ok := ARRAY['videos' || chr(31) || OLD.state];
        IF OLD.stage_done IS NOT NULL THEN ok := ok || ('curated' || chr(31)); END IF;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        nb := coalesce(NEW.build_id, '');
        nk := ARRAY['videos' || chr(31) || NEW.state];
        IF NEW.stage_done IS NOT NULL THEN nk := nk || ('curated' || chr(31)); END IF;
    END IF;
    PERFORM build_count_move(ob, ok, nb, nk);
    -- a video that changes build takes its clips, subjects, pairs and duplicates along
    IF TG_OP = 'UPDATE' AND ob IS DISTINCT FROM nb THEN
        INSERT INTO build_count_deltas (build_id, kind, key, d)
        SELECT side.b, c.k, c.ky, side.s * c.n
        FROM (SELECT 'clips' AS k, c.state AS ky, count(*) AS n FROM clips c
              WHERE c.video_id = NEW.id GROUP BY c.state
              UNION ALL
              SELECT 'subjects', s.state, count(*) FROM subjects s JOIN clips c ON s.clip_id = c.id
              WHERE c.video_id = NEW.id GROUP BY s.state
              UNION ALL
              SELECT 'pairs', '', count(*) FROM pairs p JOIN subjects s ON p.subject_id = s.id
              JOIN clips c ON s.clip_id = c.id WHERE c.video_id = NEW.id HAVING count(*) > 0
              UNION ALL
              SELECT 'duplicates', '', count(*) FROM duplicates d WHERE d.video_id = NEW.id
              HAVING count(*) > 0) c
        CROSS JOIN (VALUES (ob, -1), (nb, 1)) AS side(b, s);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION build_counts_clips() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ob TEXT; nb TEXT; ok TEXT[] := '{}'; nk TEXT[] := '{}';
BEGIN
    IF TG_OP <> 'INSERT' THEN
        SELECT coalesce(v.build_id, '') INTO ob FROM videos v WHERE v.id = OLD.video_id;
        ok := ARRAY['clips' || chr(31) || OLD.state];
    END IF;
    IF TG_OP <> 'DELETE' THEN
        SELECT coalesce(v.build_id, '') INTO nb FROM videos v WHERE v.id = NEW.video_id;
        nk := ARRAY['clips' || chr(31) || NEW.state];
    END IF;
    PERFORM build_count_move(ob, ok, nb, nk);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION build_counts_subjects() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ob TEXT; nb TEXT; ok TEXT[] := '{}'; nk TEXT[] := '{}';
BEGIN
    IF TG_OP <> 'INSERT' THEN
        SELECT coalesce(v.build_id, '') INTO ob FROM clips c JOIN videos v ON v.id = c.video_id
        WHERE c.id = OLD.clip_id;
        ok := ARRAY['subjects' || chr(31) || OLD.state];
    END IF;
    IF TG_OP <> 'DELETE' THEN
        SELECT coalesce(v.build_id, '') INTO nb FROM clips c JOIN videos v ON v.id = c.video_id
        WHERE c.id = NEW.clip_id;
        nk := ARRAY['subjects' || chr(31) || NEW.state];
    END IF;
    PERFORM build_count_move(ob, ok, nb, nk);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION build_counts_pairs() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ob TEXT; nb TEXT; ok TEXT[] := '{}'; nk TEXT[] := '{}';
BEGIN
    IF TG_OP <> 'INSERT' THEN
        SELECT coalesce(v.build_id, '') INTO ob FROM subjects s JOIN clips c ON c.id = s.clip_id
        JOIN videos v ON v.id = c.video_id WHERE s.id = OLD.subject_id;
        ok := ARRAY['pairs' || chr(31)];
    END IF;
    IF TG_OP <> 'DELETE' THEN
        SELECT coalesce(v.build_id, '') INTO nb FROM subjects s JOIN clips c ON c.id = s.clip_id
        JOIN videos v ON v.id = c.video_id WHERE s.id = NEW.subject_id;
        nk := ARRAY['pairs' || chr(31)];
    END IF;
    PERFORM build_count_move(ob, ok, nb, nk);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION build_counts_duplicates() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ob TEXT; nb TEXT; ok TEXT[] := '{}'; nk TEXT[] := '{}';
BEGIN
    IF TG_OP <> 'INSERT' THEN
        SELECT coalesce(v.build_id, '') INTO ob FROM videos v WHERE v.id = OLD.video_id;
        ok := ARRAY['duplicates' || chr(31)];
    END IF;
    IF TG_OP <> 'DELETE' THEN
        SELECT coalesce(v.build_id, '') INTO nb FROM videos v WHERE v.id = NEW.video_id;
        nk := ARRAY['duplicates' || chr(31)];
    END IF;
    PERFORM build_count_move(ob, ok, nb, nk);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION build_counts_samples() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ob TEXT; nb TEXT; ok TEXT[] := '{}'; nk TEXT[] := '{}';
BEGIN
    IF TG_OP <> 'INSERT' THEN
        ob := coalesce(OLD.build_id, '');
        ok := ARRAY['samples' || chr(31) || OLD.state];
        IF OLD.attempt > 1 THEN ok := ok || ('resynthesized' || chr(31)); END IF;
        IF OLD.state IN ('rejected', 'failed') THEN
            ok := ok || ('sample_reason:' || OLD.state || chr(31) || coalesce(OLD.reason, ''));
        END IF;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        nb := coalesce(NEW.build_id, '');
        nk := ARRAY['samples' || chr(31) || NEW.state];
        IF NEW.attempt > 1 THEN nk := nk || ('resynthesized' || chr(31)); END IF;
        IF NEW.state IN ('rejected', 'failed') THEN
            nk := nk || ('sample_reason:' || NEW.state || chr(31) || coalesce(NEW.reason, ''));
        END IF;
    END IF;
    PERFORM build_count_move(ob, ok, nb, nk);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION build_counts_attempts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ob TEXT; nb TEXT; ok TEXT[] := '{}'; nk TEXT[] := '{}';
BEGIN
    IF TG_OP <> 'INSERT' THEN
        ob := coalesce(OLD.build_id, '');
        ok := ARRAY['attempts:' || OLD.stage || chr(31) || OLD.status];
        IF OLD.attempt > 1 THEN ok := ok || ('retries:' || OLD.stage || chr(31) || OLD.status); END IF;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        nb := coalesce(NEW.build_id, '');
        nk := ARRAY['attempts:' || NEW.stage || chr(31) || NEW.status];
        IF NEW.attempt > 1 THEN nk := nk || ('retries:' || NEW.stage || chr(31) || NEW.status); END IF;
    END IF;
    PERFORM build_count_move(ob, ok, nb, nk);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS build_counts_videos ON videos;
CREATE TRIGGER build_counts_videos AFTER INSERT OR DELETE OR UPDATE OF build_id, state, stage_done
    ON videos FOR EACH ROW EXECUTE FUNCTION build_counts_videos();
DROP TRIGGER IF EXISTS build_counts_clips ON clips;
CREATE TRIGGER build_counts_clips AFTER INSERT OR DELETE OR UPDATE OF video_id, state
    ON clips FOR EACH ROW EXECUTE FUNCTION build_counts_clips();
DROP TRIGGER IF EXISTS build_counts_subjects ON subjects;
CREATE TRIGGER build_counts_subjects AFTER INSERT OR DELETE OR UPDATE OF clip_id, state
    ON subjects FOR EACH ROW EXECUTE FUNCTION build_counts_subjects();
DROP TRIGGER IF EXISTS build_counts_pairs ON pairs;
CREATE TRIGGER build_counts_pairs AFTER INSERT OR DELETE OR UPDATE OF subject_id
    ON pairs FOR EACH ROW EXECUTE FUNCTION build_counts_pairs();
DROP TRIGGER IF EXISTS build_counts_duplicates ON duplicates;
CREATE TRIGGER build_counts_duplicates AFTER INSERT OR DELETE OR UPDATE OF video_id
    ON duplicates FOR EACH ROW EXECUTE FUNCTION build_counts_duplicates();
DROP TRIGGER IF EXISTS build_counts_samples ON samples;
CREATE TRIGGER build_counts_samples AFTER INSERT OR DELETE OR UPDATE OF build_id, state, attempt, reason
    ON samples FOR EACH ROW EXECUTE FUNCTION build_counts_samples();
DROP TRIGGER IF EXISTS build_counts_attempts ON stage_attempts;
CREATE TRIGGER build_counts_attempts AFTER INSERT OR DELETE OR UPDATE OF build_id, stage, status, attempt
    ON stage_attempts FOR EACH ROW EXECUTE FUNCTION build_counts_attempts();

-- Every build's counts from the rows themselves: what the database already holds when
-- this file is applied (with the workers stopped), or after a bulk load that bypassed the
-- triggers (session_replication_role = replica).
CREATE OR REPLACE FUNCTION build_counts_recount() RETURNS void LANGUAGE sql AS $$
    DELETE FROM build_count_deltas;
    DELETE FROM build_counts;
    INSERT INTO build_counts (build_id, kind, key, n)
    SELECT b, k, ky, sum(n) FROM (
        SELECT coalesce(build_id, '') AS b, 'videos' AS k, state AS ky, count(*) AS n FROM videos GROUP BY 1, 3
        UNION ALL SELECT coalesce(build_id, ''), 'curated', '', count(*) FROM videos
            WHERE stage_done IS NOT NULL GROUP BY 1
        UNION ALL SELECT coalesce(v.build_id, ''), 'clips', c.state, count(*) FROM clips c
            JOIN videos v ON v.id = c.video_id GROUP BY 1, 3
        UNION ALL SELECT coalesce(v.build_id, ''), 'subjects', s.state, count(*) FROM subjects s
            JOIN clips c ON c.id = s.clip_id JOIN videos v ON v.id = c.video_id GROUP BY 1, 3
        UNION ALL SELECT coalesce(v.build_id, ''), 'pairs', '', count(*) FROM pairs p
            JOIN subjects s ON s.id = p.subject_id JOIN clips c ON c.id = s.clip_id
            JOIN videos v ON v.id = c.video_id GROUP BY 1
        UNION ALL SELECT coalesce(v.build_id, ''), 'duplicates', '', count(*) FROM duplicates d
            JOIN videos v ON v.id = d.video_id GROUP BY 1
        UNION ALL SELECT coalesce(build_id, ''), 'samples', state, count(*) FROM samples GROUP BY 1, 3
        UNION ALL SELECT coalesce(build_id, ''), 'resynthesized', '', count(*) FROM samples
            WHERE attempt > 1 GROUP BY 1
        UNION ALL SELECT coalesce(build_id, ''), 'sample_reason:' || state, coalesce(reason, ''), count(*)
            FROM samples WHERE state IN ('rejected', 'failed') GROUP BY 1, 2, 3
        UNION ALL SELECT coalesce(build_id, ''), 'attempts:' || stage, status, count(*) FROM stage_attempts
            GROUP BY 1, 2, 3
        UNION ALL SELECT coalesce(build_id, ''), 'retries:' || stage, status, count(*) FROM stage_attempts
            WHERE attempt > 1 GROUP BY 1, 2, 3
    ) t GROUP BY b, k, ky;
$$;

SELECT build_counts_recount();

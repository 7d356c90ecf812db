"""A synthetic corpus history in PostgreSQL, made by SQL ``generate_series``: what earlier
builds leave behind (videos, clips, subjects, pairs, samples, stage attempts, spread over
several finished builds), so that a query's cost can be checked against a database that
already holds 10^5-10^6 videos.

    from corpus_history import History, fill
    fill(engine_or_url, History(videos=10**6, samples=5 * 10**6, attempts=4 * 10**6))

Ids and keys have the shapes the pipeline writes (32-hex video ids, ``<video>-c<n>``,
``<clip>-s<n>``, ``<subject>-p<ref>-<tgt>``, sample = pair id, store keys under
``videos/<video>/samples/<sample>/a<attempt>/``); no object is written to a store.
Everything is derived from the row number, so a fill is the same every time, and two
fills with different ``prefix`` values never share an id.

Used by the tests (tests/test_hot_queries.py) and the benchmarks (perf/bench_corpus.py);
imports nothing heavy and no pytest.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from sqlalchemy import Engine, create_engine, text

from opensubject_tasks.catalogue import SAMPLE_IMAGES

CATEGORIES = ("person", "dog", "car", "cat", "bicycle", "horse", "bird", "chair")


@dataclass(frozen=True)
class History:
    """How much history to make. Each clip belongs to video ``j % videos`` (so ``clips >=
    videos`` gives every video one), each subject to clip ``k % clips``, each pair (and its
    sample) to subject ``m % subjects``. Attempts: curate, mine and samples on every video
    first (``3 * videos``), the rest synthesize/verify on samples in turn."""

    videos: int
    samples: int
    attempts: int
    clips: int = 0          # 0: one per video
    subjects: int = 0       # 0: one per clip
    builds: int = 5         # finished builds the videos are spread over, in id order
    chunk_size: int = 1000  # videos per chunk of a build
    prefix: str = "history"

    def __post_init__(self) -> None:
        if min(self.videos, self.samples, self.builds, self.chunk_size) <= 0 or self.attempts < 0:
            raise ValueError(f"a history needs videos, samples, builds and a chunk size above 0: {self}")

    @property
    def n_clips(self) -> int:
        return self.clips or self.videos

    @property
    def n_subjects(self) -> int:
        return self.subjects or self.n_clips

    def build_ids(self) -> list[str]:
        return [f"{self.prefix}-{b:03d}" for b in range(self.builds)]

    def counts(self) -> dict[str, int]:
        return {"builds": self.builds, "videos": self.videos, "clips": self.n_clips,
                "subjects": self.n_subjects, "pairs": self.samples, "samples": self.samples,
                "stage_attempts": self.attempts}


# Row number -> id, as SQL expressions over the bind parameters (:p prefix, :nv videos,
# :nc clips, :ns subjects, :nb builds). ``i`` a video, ``j`` a clip, ``k`` a subject.
def _video_id(i: str) -> str:
    return f"md5(:p || ':v:' || ({i})::text)"


def _clip_id(j: str) -> str:
    return f"({_video_id(f'({j}) % :nv')} || '-c' || (({j}) / :nv)::text)"


def _subject_id(k: str) -> str:
    return f"({_clip_id(f'({k}) % :nc')} || '-s' || (({k}) / :nc)::text)"


def _pair_id(m: str) -> str:
    return f"({_subject_id(f'({m}) % :ns')} || '-p0-' || (10 + ({m}) / :ns)::text)"


def _build_id(i: str) -> str:
    return f"(:p || '-' || lpad(((({i})::bigint * :nb) / :nv)::text, 3, '0'))"


def _video_of_sample(m: str) -> str:
    return f"((({m}) % :ns) % :nc) % :nv"


_BUILDS = """
INSERT INTO builds (id, params, profile, state, created_at, updated_at)
SELECT :p || '-' || lpad(b::text, 3, '0'),
       jsonb_build_object('until', 'verify', 'source', 'store://raw/' || :p || '/' || b),
       'cpu', 'done', now() - interval '30 days' + b * interval '1 hour', now() - interval '29 days'
FROM generate_series(0, :nb - 1) AS b
"""

_VIDEOS = f"""
INSERT INTO videos (id, content_hash, source_uri, name, size_bytes, build_id, state, stage_done, reason,
                    probe, created_at, updated_at, queued_stage, queued_task_id, queued_at, chunk,
                    error_stage, resends)
SELECT v.id, md5(v.id) || ':' || (100000 + i % 9000)::text, 'store://raw/' || :p || '/' || i || '.mp4',
       i || '.mp4', 100000 + i % 9000, {_build_id('i')},
       CASE WHEN i % 20 = 7 THEN 'rejected' WHEN i % 50 = 11 THEN 'failed' ELSE 'done' END,
       CASE WHEN i % 20 = 7 THEN 'curate' WHEN i % 50 = 11 THEN NULL ELSE 'mine' END,
       CASE WHEN i % 20 = 7 THEN 'no clip passed the filters'
            WHEN i % 50 = 11 THEN 'not a video: no video stream' END,
       '{{"width": 160, "height": 90, "fps": 24.0, "frames": 36, "codec": "h264"}}'::jsonb,
       v.at, v.at + interval '5 minutes', 'samples', md5(v.id || '/task'), v.at, (i / :chunk)::int,
       NULL, 0
FROM generate_series(0, :nv - 1) AS i,
     LATERAL (SELECT {_video_id('i')} AS id,
                     now() - interval '30 days' + (i::float8 / :nv) * interval '29 days' AS at) AS v
ORDER BY 1
"""

_CLIPS = f"""
INSERT INTO clips (id, video_id, idx, start_frame, end_frame, start_s, end_s, score, quality, state,
                   keyframes, created_at)
SELECT {_clip_id('j')}, {_video_id('j % :nv')}, j / :nv, 0, 36, 0.0, 1.5, 0.5 + (j % 50) / 100.0,
       '{{"scorer": "classical"}}'::jsonb, 'mined',
       jsonb_build_array(jsonb_build_object('frame', 0, 'key', 'videos/' || {_video_id('j % :nv')}
                                            || '/clips/' || {_clip_id('j')} || '/f0.jpg')),
       now() - interval '29 days'
FROM generate_series(0, :nc - 1) AS j
ORDER BY 1
"""

_SUBJECTS = f"""
INSERT INTO subjects (id, clip_id, idx, category, category_source, consensus, boxes, state, created_at)
SELECT {_subject_id('k')}, {_clip_id('k % :nc')}, k / :nc, (:categories)[1 + k % :ncat], 'classical', 1.0,
       '{{"0": [10, 10, 60, 60], "10": [12, 11, 62, 61]}}'::jsonb, 'kept', now() - interval '29 days'
FROM generate_series(0, :ns - 1) AS k
ORDER BY 1
"""

_PAIRS = f"""
INSERT INTO pairs (id, subject_id, ref_frame, tgt_frame, ref_box, tgt_box, scores, created_at)
SELECT {_pair_id('m')}, {_subject_id('m % :ns')}, 0, 10 + m / :ns, '[10, 10, 60, 60]'::jsonb,
       '[12, 11, 62, 61]'::jsonb, '{{"identity": 0.9, "diversity": 0.4}}'::jsonb, now() - interval '29 days'
FROM generate_series(0, :nsm - 1) AS m
ORDER BY 1
"""

# A sample's keys: where synthesis stores its images (services/synthesize.py).
_KEYS = ", ".join(f"'{n}', k.prefix || '{n}.png'" for n in SAMPLE_IMAGES)
_SAMPLES = f"""
INSERT INTO samples (id, pair_id, build_id, state, attempt, seed, keys, verdict, caption_short, caption_long,
                     caption_source, reason, queued_at, created_at, updated_at)
SELECT x.id, x.id, {_build_id(_video_of_sample('m'))},
       CASE WHEN m % 5 = 3 THEN 'rejected' ELSE 'verified' END, 1 + (m % 7 = 2)::int, m,
       CASE WHEN :keys THEN jsonb_build_object({_KEYS}) ELSE '{{}}'::jsonb END,
       jsonb_build_object('passed', m % 5 <> 3, 'scores', jsonb_build_object('identity', 0.8)),
       CASE WHEN m % 5 <> 3 THEN 'a ' || (:categories)[1 + (m % :ns) % :ncat] END,
       CASE WHEN m % 5 <> 3 THEN 'a ' || (:categories)[1 + (m % :ns) % :ncat] || ' in a synthetic scene' END,
       CASE WHEN m % 5 <> 3 THEN 'template' END,
       CASE WHEN m % 5 = 3 THEN 'verification failed at max_attempts' END,
       now() - interval '29 days', now() - interval '29 days', now() - interval '28 days'
FROM generate_series(0, :nsm - 1) AS m,
     LATERAL (SELECT {_pair_id('m')} AS id, {_video_id(_video_of_sample('m'))} AS vid) AS x,
     LATERAL (SELECT 'videos/' || x.vid || '/samples/' || x.id || '/a' || (1 + (m % 7 = 2)::int) || '/'
                     AS prefix) AS k
ORDER BY 1
"""

# Attempt t: t < 3*videos (:nv3) -> video (t % videos), stage curate | mine | samples; then
# synthesize / verify on sample ((t - 3*videos) / 2 % samples), attempt numbers rising.
_ATTEMPTS = f"""
INSERT INTO stage_attempts (build_id, entity_type, entity_id, stage, attempt, worker, status, error,
                            started_at, finished_at, duration_s)
SELECT a.build_id, a.entity_type, a.entity_id, a.stage, a.attempt, 'history@worker',
       CASE WHEN t % 97 = 5 THEN 'error' WHEN t % 389 = 17 THEN 'lost' ELSE 'ok' END,
       CASE WHEN t % 97 = 5 THEN 'TransientError: store unavailable' WHEN t % 389 = 17 THEN 'lost' END,
       a.at, a.at + interval '2 seconds', 2.0
FROM generate_series(0, :na - 1) AS t,
     LATERAL (SELECT now() - interval '30 days' + (t::float8 / GREATEST(:na, 1)) * interval '29 days' AS at,
                     CASE WHEN t < :nv3 THEN 'video' ELSE 'sample' END AS entity_type,
                     CASE WHEN t < :nv3 THEN {_video_id('t % :nv')}
                          ELSE {_pair_id('((t - :nv3) / 2) % :nsm')} END AS entity_id,
                     CASE WHEN t < :nv3 THEN (ARRAY['curate', 'mine', 'samples'])[1 + t / :nv]
                          WHEN (t - :nv3) % 2 = 0 THEN 'synthesize' ELSE 'verify' END AS stage,
                     CASE WHEN t < :nv3 THEN 1
                          ELSE 1 + ((t - :nv3) / 2 / :nsm)::int END AS attempt,
                     CASE WHEN t < :nv3 THEN {_build_id('t % :nv')}
                          ELSE {_build_id(_video_of_sample('((t - :nv3) / 2) % :nsm'))} END
                          AS build_id) AS a
"""

def fill(db: Engine | str, history: History, *, keys: bool = True, analyze: bool = True,
         log=None) -> dict[str, float]:  # noqa: ANN001 - print-like
    """Insert ``history`` into the database (its schema applied already); returns seconds
    per table. ``keys``: give each sample the store keys of its images (no object is
    written). ``analyze``: refresh the planner's statistics afterwards, as autovacuum
    would, so that ``EXPLAIN`` sees the tables as they are."""
    engine = create_engine(db) if isinstance(db, str) else db
    params = {"p": history.prefix, "nv": history.videos, "nc": history.n_clips, "ns": history.n_subjects,
              "nsm": history.samples, "na": history.attempts, "nb": history.builds,
              "chunk": history.chunk_size, "nv3": 3 * history.videos, "categories": list(CATEGORIES), "ncat": len(CATEGORIES),
              "keys": keys}
    seconds: dict[str, float] = {}
    try:
        for table, sql in (("builds", _BUILDS), ("videos", _VIDEOS), ("clips", _CLIPS), ("subjects", _SUBJECTS),
                           ("pairs", _PAIRS), ("samples", _SAMPLES), ("stage_attempts", _ATTEMPTS)):
            t0 = time.perf_counter()
            with engine.begin() as c:
                _bulk_insert(c, table, sql, params)
            seconds[table] = time.perf_counter() - t0
            if log:
                log(f"history: {table} filled in {seconds[table]:.1f} s")
        with engine.begin() as c:
            # a superuser's bulk load bypassed the triggers that keep each build's counts
            t0 = time.perf_counter()
            c.execute(text("SELECT build_counts_recount()"))
            seconds["build_counts"] = time.perf_counter() - t0
        if analyze:
            t0 = time.perf_counter()
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.execute(text("ANALYZE"))
            seconds["analyze"] = time.perf_counter() - t0
    finally:
        if isinstance(db, str):
            engine.dispose()
    return seconds


def _bulk_insert(c, table: str, sql: str, params: dict) -> None:  # noqa: ANN001 - a connection
    """One INSERT ... SELECT the way a bulk load goes fast: the table's plain indexes (not
    those of its keys and unique constraints) dropped and built again afterwards, rows in
    key order, and, for a superuser, no per-row foreign-key check (the rows are consistent
    by construction). The schema is the same afterwards."""
    c.execute(text("SET LOCAL work_mem = '256MB'"))
    c.execute(text("SET LOCAL maintenance_work_mem = '512MB'"))
    if c.scalar(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")):
        c.execute(text("SET LOCAL session_replication_role = replica"))
    plain = c.execute(text(
        "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = current_schema() "
        "AND i.tablename = :t AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conname = i.indexname)"),
        {"t": table}).all()
    for name, _ in plain:
        c.execute(text(f'DROP INDEX "{name}"'))
    c.execute(text(sql), params)
    for _, definition in plain:
        c.execute(text(definition))


def describe(history: History) -> str:
    """One line naming the history, for benchmark output and docs."""
    return ", ".join(f"{k}={v}" for k, v in asdict(history).items())

"""Every hot-path query (opensubject_tasks/db/hot_queries.py) is served by an index on a
database that already holds a large history: PostgreSQL's plan of each, with parameters
taken from that database, reads none of the big tables whole.

The database holds >= 10^5 rows in every big table (tests/corpus_history.py, SQL
``generate_series``), with the statistics a running database would have (ANALYZE).
"""
from __future__ import annotations

import time

import pytest
from corpus_history import History, fill
from local_services import pg_database
from sqlalchemy import create_engine, func, select, text

from opensubject_tasks.db.hot_queries import BIG_TABLES, all_hot_queries, explain, facts, seq_scans

HISTORY = History(videos=100_000, samples=100_000, attempts=300_000, builds=4)
QUERIES = all_hot_queries()


@pytest.fixture(scope="module")
def history_url(pg_url):  # noqa: ANN001 - pg_url: the server is up (and the test marked `services`)
    with pg_database("opensubject_hot", schema=True) as url:
        t0 = time.perf_counter()
        fill(url, HISTORY, keys=False)
        print(f"history filled in {time.perf_counter() - t0:.1f} s: {HISTORY.counts()}")
        yield url


@pytest.fixture(scope="module")
def history(history_url):  # noqa: ANN001
    engine = create_engine(history_url)
    with engine.connect() as conn:
        yield conn, facts(conn)
    engine.dispose()


def test_the_history_holds_what_was_asked(history, pg_url):
    from opensubject_tasks.db.models import Build, Clip, Pair, Sample, StageAttempt, Subject, Video

    conn, f = history
    # the fill drops and rebuilds plain indexes: the schema is the one applied
    indexes = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
    schema_only = create_engine(pg_url)
    with schema_only.connect() as c:
        assert conn.execute(text(indexes)).all() == c.execute(text(indexes)).all()
    schema_only.dispose()
    counted = {m.__tablename__: conn.scalar(select(func.count()).select_from(m))
               for m in (Build, Video, Clip, Subject, Pair, Sample, StageAttempt)}
    assert counted == HISTORY.counts()
    assert min(counted[t] for t in BIG_TABLES) >= 100_000
    assert f.build in HISTORY.build_ids() and len(f.video_ids) == 100 and len(f.sample_ids) == 100


def test_every_hot_path_has_queries():
    """The registry covers each unit of work (a hot query added elsewhere joins it with its
    builder's decorator)."""
    pers = {q.per for q in QUERIES.values()}
    for unit in ("stage run", "sample batch", "chunk poll", "chunk start", "ingest batch", "reconcile pass",
                 "claim", "hand-out"):
        assert any(unit in p for p in pers), f"no hot query registered for a {unit}"


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_hot_query_uses_an_index(history, name):
    conn, f = history
    query = QUERIES[name]
    plan = explain(conn, query.statement(f), query.binds(f) if query.binds else None)
    assert not seq_scans(plan), (f"{name} (once per {query.per}) reads {seq_scans(plan)} whole:\n"
                                 + _plan_lines(plan))


def test_a_scan_is_caught(history):
    """The check itself: a query without a usable index is reported."""
    from opensubject_tasks.db.models import StageAttempt

    conn, f = history
    # the predicate shape of old: the stage and entity without the entity type
    stmt = select(StageAttempt.status).where(StageAttempt.stage == "curate", StageAttempt.entity_id == f.video)
    assert seq_scans(explain(conn, stmt)) == ["stage_attempts"]


def _plan_lines(plan, depth=0):  # noqa: ANN001, ANN202
    line = "  " * depth + f"{plan['Node Type']} {plan.get('Relation Name', '')} {plan.get('Index Name', '')}\n"
    return line + "".join(_plan_lines(p, depth + 1) for p in plan.get("Plans", ()))

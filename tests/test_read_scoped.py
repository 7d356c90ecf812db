"""The dashboard and `status` read a build's own rows: a small build beside a large history
of earlier builds (tests/corpus_history.py) shows the same documents as in an empty
database, and every statement they send reads only that build's rows through an index
(``EXPLAIN ANALYZE``: rows read by each scan of a corpus table)."""
from __future__ import annotations

import json

from sqlalchemy import event

from corpus_history import History, fill

# Tables that grow with the corpus; builds and schema bookkeeping stay small.
CORPUS_TABLES = {"videos", "clips", "subjects", "pairs", "samples", "stage_attempts", "duplicates"}


def _comparable(doc: dict) -> dict:
    keep = ("build", "funnel", "duplicates", "samples_by_state", "failures", "sample_rejections", "attempts",
            "resynthesized_samples")
    return {k: doc[k] for k in keep} | {"recent": [r["id"] for r in doc["recent_samples"]],
                                         "b1": [b for b in doc["builds"] if b["id"] == "b1"]}


def _statements(engine, fn) -> list[tuple[str, object]]:  # noqa: ANN001
    """Every statement ``fn`` sends, with its parameters."""
    sent: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ARG001
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        fn()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return sent


def _scans(plan: dict):  # noqa: ANN202
    if "Relation Name" in plan:
        yield plan
    for child in plan.get("Plans", []):
        yield from _scans(child)


def _rows_read(engine, statements) -> list[tuple[str, str, int]]:  # noqa: ANN001
    """(table, scan type, rows read) of every scan of a corpus table in the statements' plans."""
    out = []
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for sql, params in statements:
            cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
            doc = cur.fetchone()[0]
            plan = (json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]
            for node in _scans(plan):
                if node["Relation Name"] in CORPUS_TABLES:
                    read = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
                            + node.get("Rows Removed by Index Recheck", 0)) * max(node.get("Actual Loops", 1), 1)
                    out.append((node["Relation Name"], node["Node Type"], int(read)))
        raw.rollback()
    finally:
        raw.close()
    return out


def test_a_small_build_beside_a_large_history_reads_only_its_own_rows(pg_db, tmp_path):
    from airflow_fixtures import seed_dashboard_data

    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.dashboard.data import summary
    from opensubject_tasks.runner import funnel

    ctx = Context.from_settings(load_settings(database_url=pg_db,
                                              store={"kind": "local", "local_root": str(tmp_path / "store")}))
    seed_dashboard_data(ctx)      # build b1: a done, a failed and a waiting video, two samples
    alone = {"dashboard": _comparable(summary(ctx, "b1")), "latest": _comparable(summary(ctx)),
             "status": funnel(ctx, "b1")}
    assert alone["dashboard"]["funnel"][2] == {"stage": "videos", "label": "videos registered", "count": 3}

    history = History(videos=20_000, samples=60_000, attempts=80_000)   # five finished builds, 30 days old
    fill(pg_db, history)
    beside = {"dashboard": _comparable(summary(ctx, "b1")), "latest": _comparable(summary(ctx)),
              "status": funnel(ctx, "b1")}
    assert beside == alone        # the same documents, the most recent build shown by default

    # ... and the statements behind them read b1's rows only, through indexes
    sent = _statements(ctx.engine, lambda: (summary(ctx, "b1"), summary(ctx), funnel(ctx, "b1")))
    assert len(sent) >= 10
    scans = _rows_read(ctx.engine, sent)
    # (the history holds no duplicate: that empty table may be scanned whole)
    assert scans and not [s for s in scans if s[1] == "Seq Scan" and s[0] != "duplicates"], scans
    assert sum(n for _, _, n in scans) < 300, scans   # b1 holds a dozen rows; the history 280,000
    # A finished history build named explicitly is counted in full: the same index paths.
    first = summary(ctx, history.build_ids()[0])
    videos = {f["stage"]: f["count"] for f in first["funnel"]}["videos"]
    assert videos == history.videos // history.builds
    ctx.engine.dispose()

"""The PostgreSQL schema in sql/ and the SQLAlchemy models must describe the same
database (no drift); upgrades are idempotent; SQLite gets the same tables."""
from __future__ import annotations

import json
import re
import threading
from datetime import datetime

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from opensubject_tasks.db.engine import make_engine, make_session_factory, session_scope, sql_files, upgrade
from opensubject_tasks.db.models import Base, Clip, StageAttempt, Video

PG = postgresql.dialect()
# Spellings of one PostgreSQL type: SQLAlchemy's Float is PostgreSQL's float8.
SAME_TYPE = {"FLOAT": "DOUBLE PRECISION", "TIMESTAMP WITH TIME ZONE": "TIMESTAMPTZ"}


def norm_type(t) -> str:
    s = t.compile(dialect=PG).upper()
    return SAME_TYPE.get(s, s)


def sql_default(reflected: str | None):
    """A reflected PostgreSQL default as a Python value, or a marker for functions."""
    if reflected is None:
        return None
    if reflected.startswith("nextval("):
        return "<serial>"
    if reflected == "now()":
        return "<now>"
    m = re.fullmatch(r"'(.*)'::(\w+)", reflected, re.S)
    if m:
        value, typ = m.group(1).replace("''", "'"), m.group(2)
        return json.loads(value) if typ in ("jsonb", "json") else value
    return json.loads(reflected)  # numbers


def model_default(col):
    if col.autoincrement is True and col.primary_key:
        return "<serial>"
    d = col.default
    if d is None:
        return None
    value = d.arg(None) if d.is_callable else d.arg
    return "<now>" if isinstance(value, datetime) else value


def model_schema() -> dict:
    out = {}
    for name, t in Base.metadata.tables.items():
        uniques = {tuple(c.name for c in con.columns) for con in t.constraints
                   if type(con).__name__ == "UniqueConstraint"}
        uniques |= {(c.name,) for c in t.columns if c.unique}
        out[name] = {
            "columns": {c.name: (norm_type(c.type), c.nullable) for c in t.columns},
            "defaults": {c.name: model_default(c) for c in t.columns},
            "pk": tuple(c.name for c in t.primary_key.columns),
            "uniques": uniques,
            "indexes": {(i.name, tuple(c.name for c in i.columns), bool(i.unique)) for i in t.indexes},
            "fks": {(tuple(fk.parent.name for fk in con.elements), con.referred_table.name,
                     tuple(fk.column.name for fk in con.elements), (con.ondelete or "").upper() or None)
                    for con in t.foreign_key_constraints},
        }
    return out


def db_schema(engine) -> dict:
    insp = inspect(engine)
    out = {}
    for name in insp.get_table_names():
        cols = insp.get_columns(name)
        out[name] = {
            "columns": {c["name"]: (norm_type(c["type"]), c["nullable"]) for c in cols},
            "defaults": {c["name"]: sql_default(c.get("default")) for c in cols},
            "pk": tuple(insp.get_pk_constraint(name)["constrained_columns"]),
            "uniques": {tuple(u["column_names"]) for u in insp.get_unique_constraints(name)},
            "indexes": {(i["name"], tuple(i["column_names"]), bool(i["unique"]))
                        for i in insp.get_indexes(name) if "duplicates_constraint" not in i},
            "fks": {(tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]),
                     (f["options"].get("ondelete") or "").upper() or None)
                    for f in insp.get_foreign_keys(name)},
        }
    return out


@pytest.fixture()
def pg_engine(pg_fresh_db):
    """A database of the test's own: these tests alter and drop the schema."""
    engine = create_engine(pg_fresh_db)
    yield engine
    engine.dispose()


def test_sql_schema_matches_the_models(pg_engine):
    db, models = db_schema(pg_engine), model_schema()
    assert set(db) == set(models) >= {"builds", "videos", "clips", "subjects", "pairs", "samples",
                                      "stage_attempts", "schema_migrations"}
    for table in sorted(models):
        for aspect in ("columns", "pk", "uniques", "indexes", "fks", "defaults"):
            assert db[table][aspect] == models[table][aspect], f"{table}.{aspect} drifted"


def test_drift_is_detected(pg_engine):
    """The comparison above can fail: a column added only in SQL shows up."""
    with pg_engine.begin() as c:
        c.execute(text("ALTER TABLE clips ADD COLUMN extra TEXT"))
        c.execute(text("ALTER TABLE videos ALTER COLUMN name DROP NOT NULL"))
    db, models = db_schema(pg_engine), model_schema()
    assert db["clips"]["columns"] != models["clips"]["columns"]
    assert db["videos"]["columns"]["name"] != models["videos"]["columns"]["name"]


def test_upgrade_is_idempotent(pg_engine):
    before = db_schema(pg_engine)
    assert upgrade(pg_engine) == []  # the fixture applied everything already
    assert upgrade(pg_engine) == []
    # The files themselves can run again (docker-compose init, a manual psql -f).
    with pg_engine.begin() as c:
        for path in sql_files():
            c.exec_driver_sql(path.read_text())
    assert db_schema(pg_engine) == before
    with pg_engine.connect() as c:
        applied = [r[0] for r in c.execute(text("SELECT filename FROM schema_migrations ORDER BY 1"))]
    assert applied == [p.name for p in sql_files()]


def test_concurrent_upgrades_apply_each_file_once(pg_engine):
    with pg_engine.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    results, errors = [], []
    barrier = threading.Barrier(3)

    def run():
        barrier.wait()
        try:
            results.append(upgrade(pg_engine))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(f for r in results for f in r) == [p.name for p in sql_files()]
    assert set(db_schema(pg_engine)) == set(model_schema())


def test_sqlite_create_all(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'embedded.db'}")
    upgrade(engine)
    upgrade(engine)  # again: no error
    insp = inspect(engine)
    assert set(insp.get_table_names()) == set(Base.metadata.tables)
    for name, t in Base.metadata.tables.items():
        got = {c["name"]: c["nullable"] for c in insp.get_columns(name)}
        assert got == {c.name: c.nullable for c in t.columns}, name
    sessions = make_session_factory(engine)
    with session_scope(sessions) as s:
        s.add(Video(id="v1", content_hash="h1", source_uri="file:///x.mp4", name="x.mp4"))
        s.add_all([StageAttempt(entity_type="video", entity_id="v1", stage="curate", status="ok")
                   for _ in range(2)])
    with session_scope(sessions) as s:
        assert sorted(a.id for a in s.query(StageAttempt)) == [1, 2]  # autoincrement works
        assert s.get(Video, "v1").state == "registered" and s.get(Video, "v1").size_bytes == 0
    with pytest.raises(IntegrityError):  # unique content_hash
        with session_scope(sessions) as s:
            s.add(Video(id="v2", content_hash="h1", source_uri="file:///y.mp4", name="y.mp4"))
    with pytest.raises(IntegrityError):  # foreign keys are enforced
        with session_scope(sessions) as s:
            s.add(Clip(id="c", video_id="missing", idx=0, start_frame=0, end_frame=1,
                       start_s=0, end_s=0.1))
    engine.dispose()

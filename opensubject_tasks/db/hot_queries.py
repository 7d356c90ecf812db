"""Every query on a hot path, in one registry.

A hot path runs once per unit of work: a stage run, a sample batch, a chunk poll, an
ingest batch, a reconcile pass, a claim or hand-out, a dashboard or status load, an
event batch, an export part, a lease taken or renewed. Its
queries must reach their own rows through an index whatever the database already holds
(10^6 videos and 10^7 attempts of earlier builds), or the cost per video grows with the
corpus.

The code builds each such statement with a function registered here (``@hot_query``), and
tests/test_hot_queries.py runs ``EXPLAIN`` on every registered statement against a large
synthetic history, failing on a sequential scan of a big table: the statement explained
is the one that runs. A new hot query joins by decorating its builder::

    @hot_query("chunk poll", lambda f: {"build_id": f.build, "chunk": f.chunk})
    def chunk_counts(build_id: str, chunk: int) -> Select: ...

``example`` maps the facts of a filled database (``Facts``: ids that exist there) to the
builder's keyword arguments.
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.sql import Executable

# The tables whose size grows with the corpus: a hot query never scans them whole.
BIG_TABLES = ("videos", "clips", "subjects", "pairs", "samples", "stage_attempts")

# Modules whose builders register themselves when imported.
MODULES = (
    "opensubject_tasks.services.common",
    "opensubject_tasks.services.entity",
    "opensubject_tasks.services.samples",
    "opensubject_tasks.services.ingest",
    "opensubject_tasks.services.handoff",
    "opensubject_tasks.services.reconcile",
    "opensubject_tasks.services.mine",
    "opensubject_tasks.orchestrate",
    "opensubject_tasks.readmodel",
    "opensubject_tasks.dashboard.data",
    "opensubject_tasks.runner",
    "opensubject_tasks.db.locks",
    "opensubject_tasks.services.events",
    "opensubject_tasks.export.query",
)


@dataclass(frozen=True)
class Facts:
    """Ids that exist in the database being checked, for realistic parameters."""
    video: str
    sample: str
    build: str
    chunk: int
    video_ids: list[str] = field(default_factory=list)    # a chunk's worth of videos
    sample_ids: list[str] = field(default_factory=list)   # a batch's worth of samples
    content_hashes: list[str] = field(default_factory=list)
    source_uris: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HotQuery:
    name: str
    per: str                                   # the unit of work it runs once per
    build: Callable[..., Executable]           # the builder the code calls
    example: Callable[[Facts], dict[str, Any]]
    binds: Callable[[Facts], dict[str, Any]] | None = None  # values of the statement's own bind parameters

    def statement(self, f: Facts) -> Executable:
        return self.build(**self.example(f))


HOT_QUERIES: dict[str, HotQuery] = {}


def hot_query(per: str, example: Callable[[Facts], dict[str, Any]],
              binds: Callable[[Facts], dict[str, Any]] | None = None) -> Callable:
    """Register a statement builder that runs once per ``per``; ``example``: its keyword
    arguments from a database's facts; ``binds``: values for the bind parameters the
    statement leaves to its caller (an executemany's rows)."""
    def deco(fn: Callable[..., Executable]) -> Callable[..., Executable]:
        name = f"{fn.__module__.removeprefix('opensubject_tasks.')}.{fn.__name__}"
        HOT_QUERIES[name] = HotQuery(name, per, fn, example, binds)
        return fn
    return deco


def all_hot_queries() -> dict[str, HotQuery]:
    for mod in MODULES:
        importlib.import_module(mod)
    return dict(sorted(HOT_QUERIES.items()))


def facts(conn: Connection, batch: int = 100) -> Facts:
    """Facts from the middle of what the database holds (not its first rows, which an
    index-less plan could find by luck)."""
    from opensubject_tasks.db.lineage import lineage
    from opensubject_tasks.db.models import Clip, Sample, Video

    # ids are hex digests: "8" is the middle of the key space
    rows = conn.execute(select(Video.id, Video.content_hash, Video.source_uri, Video.build_id, Video.chunk)
                        .where(Video.id > "8").order_by(Video.id).limit(batch)).all()
    if not rows:
        raise ValueError("the database holds no video to take facts from")
    video = rows[0]
    samples = list(conn.scalars(
        lineage(select(Sample.id), Sample, Clip).where(Clip.video_id.in_([r.id for r in rows]))
        .order_by(Sample.id).limit(batch)))
    return Facts(video=video.id, sample=samples[0] if samples else "", build=video.build_id or "",
                 chunk=video.chunk or 0, video_ids=[r.id for r in rows], sample_ids=samples,
                 content_hashes=[r.content_hash for r in rows], source_uris=[r.source_uri for r in rows])


def _compiled(conn: Connection, stmt: Executable, binds: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    return str(compiled), compiled.construct_params(binds or None)


def explain(conn: Connection, stmt: Executable, binds: dict[str, Any] | None = None) -> dict[str, Any]:
    """PostgreSQL's plan of ``stmt`` (not run), as its JSON tree."""
    sql, params = _compiled(conn, stmt, binds)
    plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, params).scalar()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    return plan[0]["Plan"]


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


def seq_scans(plan: dict[str, Any], tables: tuple[str, ...] = BIG_TABLES) -> list[str]:
    """The big tables a plan reads whole."""
    return sorted({n["Relation Name"] for n in nodes(plan)
                   if n.get("Node Type") == "Seq Scan" and n.get("Relation Name") in tables})


def plan_text(conn: Connection, stmt: Executable, binds: dict[str, Any] | None = None,
              analyze: bool = False) -> str:
    """The plan as PostgreSQL prints it; ``analyze``: run it too (in a transaction the
    caller rolls back), with times."""
    sql, params = _compiled(conn, stmt, binds)
    head = "EXPLAIN (ANALYZE, BUFFERS) " if analyze else "EXPLAIN "
    return "\n".join(r[0] for r in conn.exec_driver_sql(head + sql, params))

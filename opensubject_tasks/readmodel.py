"""The one read model of a build's progress: the stage funnel, states, rejection reasons and
duplicate inputs. `opensubject status`, stats.json and the HTML report, the dashboard and
the Airflow report task all read these, so they cannot disagree.

Counts come from ``counts()``: on PostgreSQL the per-build counters its triggers keep
(sql/008_build_counts.sql), a few dozen rows per build whatever the build or the database
holds; on SQLite (one embedded build) by counting the build's rows. The lists (reasons,
duplicates) reach the build's rows through an index on the build. ``build_id`` None means
every video in the database.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import Select, func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.lineage import lineage
from opensubject_tasks.db.models import Build, BuildCount, Clip, Duplicate, Pair, Sample, StageAttempt, Subject, Video

# Funnel steps in order, each with what it counts: a label says what it counts.
FUNNEL = {
    "inputs": "input files seen (videos and byte-identical copies)",
    "duplicates": "byte-identical copies of a registered video",
    "videos": "videos registered",
    "curated": "videos curated",
    "clips": "clips kept",
    "subjects": "subjects kept",
    "pairs": "pairs mined",
    "samples": "samples made",
    "verified": "samples verified",
    "rejected": "samples rejected or failed",
}


Counts = dict[tuple[str, str], int]


def _in_build(build_id: str | None) -> list[Any]:
    return [Video.build_id == build_id] if build_id else []


def _samples_in_build(build_id: str | None) -> list[Any]:
    """A sample carries its video's build (mining sets it and moves it with the video)."""
    return [Sample.build_id == build_id] if build_id else []


def counted_from_rows(s: Session, build_id: str | None = None) -> Counts:
    """The build's counts (kinds as in sql/008_build_counts.sql) by counting its rows:
    O(the build's rows). SQLite's embedded builds are read this way (one small build on one
    machine: keeping a second copy of PostgreSQL's triggers in SQLite's dialect would cost
    more than it saves); on PostgreSQL it is the truth the maintained counts are checked
    against."""
    vb, sb = _in_build(build_id), _samples_in_build(build_id)
    ab = [StageAttempt.build_id == build_id] if build_id else []
    out: Counts = {}

    def add(kind: str, rows: Any) -> None:
        for key, n in rows:
            if n:
                out[(kind, str(key or ""))] = out.get((kind, str(key or "")), 0) + int(n)

    add("videos", s.execute(select(Video.state, func.count()).where(*vb).group_by(Video.state)))
    add("curated", [("", s.scalar(select(func.count()).select_from(Video)
                                  .where(Video.stage_done.is_not(None), *vb)))])
    add("clips", s.execute(lineage(select(Clip.state, func.count()), Clip).where(*vb).group_by(Clip.state)))
    add("subjects", s.execute(lineage(select(Subject.state, func.count()), Subject)
                              .where(*vb).group_by(Subject.state)))
    add("pairs", [("", s.scalar(lineage(select(func.count(Pair.id)), Pair).where(*vb)))])
    add("duplicates", [("", s.scalar(select(func.count(Duplicate.id)).join(Video, Duplicate.video_id == Video.id)
                                     .where(*vb)))])
    add("samples", s.execute(select(Sample.state, func.count()).where(*sb).group_by(Sample.state)))
    add("resynthesized", [("", s.scalar(select(func.count()).select_from(Sample).where(Sample.attempt > 1, *sb)))])
    for st, reason, n in s.execute(select(Sample.state, Sample.reason, func.count())
                                   .where(Sample.state.in_(("rejected", "failed")), *sb)
                                   .group_by(Sample.state, Sample.reason)):
        add(f"sample_reason:{st}", [(reason, n)])
    for stage, status, n, retries in s.execute(
            select(StageAttempt.stage, StageAttempt.status, func.count(),
                   func.count().filter(StageAttempt.attempt > 1)).where(*ab)
            .group_by(StageAttempt.stage, StageAttempt.status)):
        add(f"attempts:{stage}", [(status, n)])
        add(f"retries:{stage}", [(status, retries)])
    return out


# Moves change rows into build_counts; {where}: one build's rows or every build's.
_FOLD = ("WITH moved AS (DELETE FROM build_count_deltas {where}RETURNING build_id, kind, key, d) "
         "INSERT INTO build_counts (build_id, kind, key, n) "
         "SELECT build_id, kind, key, sum(d) FROM moved GROUP BY build_id, kind, key "
         "ON CONFLICT (build_id, kind, key) DO UPDATE SET n = build_counts.n + EXCLUDED.n")
_FOLD_BUILD = text(_FOLD.format(where="WHERE build_id = :build_id "))
_FOLD_ALL = text(_FOLD.format(where=""))


@hot_query("dashboard or status load", lambda f: {"build_id": f.build})
def fold_count_deltas(build_id: str | None) -> Executable:
    """Fold the changes the triggers recorded since the last read into build_counts (one
    build's, or every build's): O(changes since then)."""
    return _FOLD_BUILD.bindparams(build_id=build_id) if build_id is not None else _FOLD_ALL


@hot_query("dashboard or status load", lambda f: {"build_id": f.build})
def maintained_counts(build_id: str | None) -> Select:
    """One build's kept counts (or every build's, summed)."""
    where = [BuildCount.build_id == build_id] if build_id is not None else []
    return (select(BuildCount.kind, BuildCount.key, func.sum(BuildCount.n)).where(*where)
            .group_by(BuildCount.kind, BuildCount.key).having(func.sum(BuildCount.n) != 0))


def counts(s: Session, build_id: str | None = None) -> Counts:
    """One build's counts (every build's when None): on PostgreSQL the counts its triggers
    keep (a few dozen rows per build, whatever the build holds), elsewhere counted from the
    rows."""
    if s.get_bind().dialect.name != "postgresql":
        return counted_from_rows(s, build_id)
    b = build_id or None
    s.execute(fold_count_deltas(b))
    return {(k, key): int(n) for k, key, n in s.execute(maintained_counts(b))}


def recent_builds(limit: int) -> Select:
    """The most recent builds, newest first (the one shown when none is named)."""
    return select(Build).order_by(Build.created_at.desc(), Build.id.desc()).limit(limit)


def by_key(c: Counts, kind: str) -> dict[str, int]:
    """One kind's counts by key, in key order."""
    return dict(sorted((key, n) for (k, key), n in c.items() if k == kind))


def funnel(s: Session, build_id: str | None = None, c: Counts | None = None) -> dict[str, int]:
    """Entities that passed each step (FUNNEL); samples == verified + rejected once all ended."""
    c = counts(s, build_id) if c is None else c
    videos, clips, subjects, samples = (by_key(c, k) for k in ("videos", "clips", "subjects", "samples"))
    duplicates = c.get(("duplicates", ""), 0)
    return {
        "inputs": sum(videos.values()) + duplicates,
        "duplicates": duplicates,
        "videos": sum(videos.values()),
        "curated": c.get(("curated", ""), 0),
        "clips": sum(n for st, n in clips.items() if st != "rejected"),
        "subjects": sum(n for st, n in subjects.items() if st != "rejected"),
        "pairs": c.get(("pairs", ""), 0),
        "samples": sum(samples.values()),
        "verified": samples.get("verified", 0),
        "rejected": samples.get("rejected", 0) + samples.get("failed", 0),
    }


def states(s: Session, build_id: str | None = None, c: Counts | None = None) -> dict[str, dict[str, int]]:
    """Videos, clips and samples by state."""
    c = counts(s, build_id) if c is None else c
    return {k: by_key(c, k) for k in ("videos", "clips", "samples")}


def rejection_reasons(s: Session, build_id: str | None = None) -> list[tuple[str, str]]:
    """(entity kind, reason) of everything that did not make it: videos, clips and subjects
    rejected or failed, and samples (a rejected sample's last verdict reasons)."""
    where = _in_build(build_id)
    out: list[tuple[str, str]] = [("video", r) for (r,) in s.execute(
        select(Video.reason).where(Video.state.in_(("rejected", "failed")), *where).order_by(Video.id))]
    out += [("clip", r) for (r,) in s.execute(
        lineage(select(Clip.reason), Clip).where(Clip.state == "rejected", *where).order_by(Clip.id))]
    out += [("subject", r) for (r,) in s.execute(
        lineage(select(Subject.reason), Subject).where(Subject.state == "rejected", *where).order_by(Subject.id))]
    for st, verdict, reason in s.execute(lineage(select(Sample.state, Sample.verdict, Sample.reason))
                                         .where(Sample.state.in_(("rejected", "failed")), *where)
                                         .order_by(Sample.id)):
        last = (verdict or {}).get("reasons") if st == "rejected" else None
        out += [("sample", r) for r in (last or ([reason] if reason else []))]
    return out


def duplicates(s: Session, build_id: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Input files recorded as byte-identical copies, with the video each copies."""
    q = (select(Duplicate.name, Duplicate.source_uri, Duplicate.video_id, Video.name)
         .join(Video, Duplicate.video_id == Video.id).where(*_in_build(build_id)).order_by(Duplicate.id))
    if limit is not None:
        q = q.limit(limit)
    return [{"name": n, "source_uri": u, "video_id": vid, "copy_of": vname} for n, u, vid, vname in s.execute(q)]

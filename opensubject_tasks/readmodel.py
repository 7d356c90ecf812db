"""The one read model of a build's progress: the stage funnel, states, rejection reasons and
duplicate inputs. `opensubject status`, stats.json and the HTML report, the dashboard and
the Airflow report task all read these, so they cannot disagree.

Count queries only, each reaching the build's rows through an index on the build (videos
and samples carry their build: ``videos (build_id, state)``, ``samples (build_id, state)``)
or through a video's own keys (clips, subjects, pairs), so a build's counts cost what the
build holds, whatever the database holds. ``build_id`` None means every video in the
database.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from opensubject_tasks.db.lineage import lineage
from opensubject_tasks.db.models import Clip, Duplicate, Pair, Sample, Subject, Video

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


def _in_build(build_id: str | None) -> list[Any]:
    return [Video.build_id == build_id] if build_id else []


def _samples_in_build(build_id: str | None) -> list[Any]:
    """A sample carries its video's build (mining sets it and moves it with the video)."""
    return [Sample.build_id == build_id] if build_id else []


def funnel(s: Session, build_id: str | None = None) -> dict[str, int]:
    """Entities that passed each step (FUNNEL); samples == verified + rejected once all ended."""
    where = _in_build(build_id)

    def count(stmt: Any) -> int:
        return int(s.scalar(stmt) or 0)

    videos = count(select(func.count(Video.id)).where(*where))
    duplicates = count(select(func.count(Duplicate.id)).join(Video, Duplicate.video_id == Video.id).where(*where))
    samples = select(func.count(Sample.id)).where(*_samples_in_build(build_id))
    return {
        "inputs": videos + duplicates,
        "duplicates": duplicates,
        "videos": videos,
        "curated": count(select(func.count(Video.id)).where(Video.stage_done.is_not(None), *where)),
        "clips": count(lineage(select(func.count(Clip.id)), Clip).where(Clip.state != "rejected", *where)),
        "subjects": count(lineage(select(func.count(Subject.id)), Subject)
                          .where(Subject.state != "rejected", *where)),
        "pairs": count(lineage(select(func.count(Pair.id)), Pair).where(*where)),
        "samples": count(samples),
        "verified": count(samples.where(Sample.state == "verified")),
        "rejected": count(samples.where(Sample.state.in_(("rejected", "failed")))),
    }


def states(s: Session, build_id: str | None = None) -> dict[str, dict[str, int]]:
    """Videos, clips and samples by state."""
    where = _in_build(build_id)

    def by(stmt: Any) -> dict[str, int]:
        return {str(k): int(n) for k, n in s.execute(stmt).all()}

    return {
        "videos": by(select(Video.state, func.count()).where(*where).group_by(Video.state).order_by(Video.state)),
        "clips": by(lineage(select(Clip.state, func.count()), Clip).where(*where)
                    .group_by(Clip.state).order_by(Clip.state)),
        "samples": by(select(Sample.state, func.count()).where(*_samples_in_build(build_id))
                      .group_by(Sample.state).order_by(Sample.state)),
    }


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

"""Where a row comes from: Sample → Pair → Subject → Clip → Video, the one place that
spells this join.

Every read that reaches from a sample (or a pair, subject or clip) up to its clip or video
goes through ``lineage``, so the keys it joins on are named once. Inner joins: a row
without its whole lineage up to ``to`` is not read.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import Select, select

from opensubject_tasks.db.models import Clip, Pair, Sample, Subject, Video

# Each entity with the column that names its parent, child first.
LINEAGE: tuple[tuple[Any, Any], ...] = (
    (Sample, Sample.pair_id), (Pair, Pair.subject_id), (Subject, Subject.clip_id), (Clip, Clip.video_id), (Video, None))
_ENTITIES = [e for e, _ in LINEAGE]


def _steps(start: Any, to: Any) -> list[tuple[Any, Any, Any]]:
    """(child, parent key, parent) of each link from ``start`` up to ``to``."""
    i, j = _ENTITIES.index(start), _ENTITIES.index(to)
    if j <= i:
        raise ValueError(f"{to.__name__} is not above {start.__name__} in the lineage")
    return [(LINEAGE[k][0], LINEAGE[k][1], LINEAGE[k + 1][0]) for k in range(i, j)]


def lineage(stmt: Select, start: Any = Sample, to: Any = Video) -> Select:
    """``stmt`` read from ``start`` joined up its lineage to ``to`` (inclusive)."""
    stmt = stmt.select_from(start)
    for _child, key, parent in _steps(start, to):
        stmt = stmt.join(parent, key == parent.id)
    return stmt


def lineage_sql(aliases: dict[Any, str], start: Any = Sample, to: Any = Video) -> str:
    """The same join as SQL text (``FROM samples s JOIN pairs p ON s.pair_id = p.id ...``),
    for statements written as text; ``aliases``: each entity's alias."""
    out = f"FROM {start.__tablename__} {aliases[start]}"
    for child, key, parent in _steps(start, to):
        out += (f" JOIN {parent.__tablename__} {aliases[parent]}"
                f" ON {aliases[child]}.{key.key} = {aliases[parent]}.id")
    return out


def video_of_sample_query(sample_id: str) -> Select:
    return lineage(select(Clip.video_id), Sample, Clip).where(Sample.id == sample_id)


def video_of_sample(s: Any, sample_id: str) -> str | None:
    """The id of the video a sample was mined from (None when it or its lineage is gone);
    ``s``: an open session."""
    return s.scalar(video_of_sample_query(sample_id))

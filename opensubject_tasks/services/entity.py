"""What a stage run knows and says about its entity: the facts its bookkeeping reads
(``entity_facts``), the result a stage function returns (``StageResult``), and the video's
terminal state once its work is settled (``settle_video``). The shell that runs a stage
(services/common.py) and the chain that follows it (services/chain.py) both build on this.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from opensubject_tasks.catalogue import SAMPLE_IN_FLIGHT, UNTIL, stage_reached
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.lineage import lineage
from opensubject_tasks.db.models import Build, Clip, Sample, Video

# Follow-up work: (stage, entity_id) pairs an orchestrator should run next.
Next = list[tuple[str, str]]


@dataclass
class StageResult:
    status: str = "ok"                 # ok | rejected | failed
    reason: str | None = None
    next: Next = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason,
                "next": [list(n) for n in self.next], "details": self.details}


@dataclass(frozen=True)
class EntityFacts:
    """What the bookkeeping of a stage run needs to know about its entity, read in one query."""
    build_id: str | None = None
    video_id: str | None = None        # the video a video or sample belongs to
    until: str = "verify"              # the last stage its build runs (builds.params.until)
    profile: str | None = None         # the profile its build was started with


@hot_query("stage run", lambda f: {"entity_type": "sample", "entity_id": f.sample})
def entity_facts_query(entity_type: str, entity_id: str) -> Select:
    """(build id, video id, build params, build profile) of a video, sample, build or export part."""
    cols = (Build.params, Build.profile)
    if entity_type == "video":
        return (select(Video.build_id, Video.id, *cols).outerjoin(Build, Build.id == Video.build_id)
                .where(Video.id == entity_id))
    if entity_type == "sample":
        return (lineage(select(Sample.build_id, Clip.video_id, *cols), Sample, Clip)
                .outerjoin(Build, Build.id == Sample.build_id).where(Sample.id == entity_id))
    build_id = entity_id if entity_type == "build" else entity_id.rpartition("#")[0]
    return select(Build.id, None, *cols).where(Build.id == build_id)


def entity_facts(s: Session, entity_type: str, entity_id: str) -> EntityFacts:
    """The build, video, ``until`` and profile of a video, sample, build or export part."""
    if entity_type not in ("video", "sample", "build", "export_part"):
        return EntityFacts()
    row = s.execute(entity_facts_query(entity_type, entity_id)).first()
    if row is None:
        if entity_type in ("build", "export_part"):   # a build row not (yet) written
            return EntityFacts(entity_id if entity_type == "build" else entity_id.rpartition("#")[0])
        return EntityFacts()
    build_id, video_id, params, profile = row
    until = (params or {}).get("until") or "verify"
    return EntityFacts(build_id, video_id, until if until in UNTIL else "verify", profile)


@hot_query("video settled", lambda f: {"video_id": f.video})
def sample_states_of_video(video_id: str) -> Select:
    return lineage(select(Sample.state), Sample, Clip).where(Clip.video_id == video_id)


def settle_video(s: Session, video_id: str) -> str:
    """Give a video its terminal state, in the caller's transaction, once mining has
    completed and none of its samples is in flight (``common.finalize_video`` runs it in
    its own)."""
    video = s.get(Video, video_id, with_for_update=True)
    if video is None or video.state in ("failed", "rejected") or not stage_reached(video.stage_done, "mine"):
        return video.state if video else "missing"
    states = list(s.scalars(sample_states_of_video(video_id)))
    if any(st in SAMPLE_IN_FLIGHT for st in states):
        return video.state
    if any(st == "verified" for st in states):
        video.state, video.reason = "done", None
    else:
        video.state = "rejected"
        video.reason = video.reason or ("no sample passed verification" if states
                                        else "no subject pair found")
    return video.state

"""What happens after a stage ran on a worker: each video walks its own chain.

A build hands every video of a chunk to the first stage once; from there the workers carry
it on along the catalogue's stage graph (curate -> mine -> samples, which synthesizes and
verifies the video's samples in batches, re-synthesis included) as far as its build goes
(``builds.params.until``), and the last piece of work of a video gives it its terminal
state (``finalize_video``). An orchestrator only waits until the database says the
videos are settled: no message per stage passes through Airflow.

``run_stage`` calls ``hand_on`` inside the transaction that records the stage's result and
sends the messages it returns once that has committed: nothing here knows Celery.
"""
from __future__ import annotations

from sqlalchemy.orm import Session

from opensubject_tasks.catalogue import SAMPLE_STAGES, SAMPLE_UNIT, STAGES, runs
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.lineage import video_of_sample
from opensubject_tasks.services.entity import EntityFacts, StageResult, entity_facts, settle_video
from opensubject_tasks.services.handoff import leave_flight, record_hand_out


def build_until(ctx: Context, build_id: str | None) -> str:
    """The last stage a build runs (its ``until`` parameter; the whole pipeline by default)."""
    if build_id is None:
        return "verify"
    with session_scope(ctx.sessions) as s:
        return entity_facts(s, "build", build_id).until


def hand_on(s: Session, stage: str, entity_id: str, result: StageResult,
            facts: EntityFacts) -> list[tuple[str, str, str]]:
    """In the transaction that records a stage's result: record the hand-off of the video
    to the next stage its build runs, and settle the video once nothing of it is left in
    flight, which gives its place in flight to the next waiting video. Returns (stage,
    video, task id) of each message to send once committed."""
    entity = STAGES[stage].entity
    video_id = facts.video_id if entity in ("video", "sample") else None
    if video_id is None:
        return []
    until = facts.until
    if entity == "sample":
        # a sample step run on its own (a rerun): the video's samples unit takes it on
        wanted = [(SAMPLE_UNIT, video_id)] if result.next and runs(SAMPLE_UNIT, until) else []
    else:
        wanted = [(st, e) for st, e in result.next if runs(st, until)]
    sends = [(st, e, record_hand_out(s, st, [e])[0]) for st, e in wanted]
    # mine with no sample in flight (a re-run), or a sample step run alone that ended its
    # sample; the samples unit settles its video itself
    if not wanted and until == "verify" and result.status == "ok" and stage in ("mine", *SAMPLE_STAGES):
        settle_video(s, video_id)
    return sends + leave_flight(s, video_id, until)


def settle_video_of_sample(ctx: Context, sample_id: str) -> None:
    with session_scope(ctx.sessions) as s:
        video_id = video_of_sample(s, sample_id)
        if video_id is not None:
            settle_video(s, video_id)

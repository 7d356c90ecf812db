"""What happens after a stage ran on a worker: each video walks its own chain.

A build hands every video of a chunk to ``curate`` once; from there the workers carry it
on (curate -> mine -> each sample's synthesize <-> verify) as far as its build goes
(``builds.params.until``), and the last piece of work of a video gives it its terminal
state (``finalize_video``). An orchestrator only waits until the database says the
videos are settled: no message per stage passes through Airflow.

The caller passes ``send``: nothing here knows Celery.
"""
from __future__ import annotations

from sqlalchemy import select

from opensubject_tasks.catalogue import SAMPLE_STAGES, STAGE_ORDER, STAGES, UNTIL, VIDEO_STAGES
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Build, Clip, Pair, Sample, Subject
from opensubject_tasks.services.common import StageResult, build_of, finalize_video
from opensubject_tasks.services.handoff import Send, hand_out_sample_stage, hand_out_samples, hand_out_videos


def build_until(ctx: Context, build_id: str | None) -> str:
    """The last stage a build runs (its ``until`` parameter; the whole pipeline by default)."""
    if build_id is None:
        return "verify"
    with session_scope(ctx.sessions) as s:
        params = s.scalar(select(Build.params).where(Build.id == build_id)) or {}
    until = params.get("until") or "verify"
    return until if until in UNTIL else "verify"


def runs(stage: str, until: str) -> bool:
    """Whether a build that goes up to ``until`` runs ``stage``."""
    return STAGE_ORDER.index(stage) <= STAGE_ORDER.index(until)


def video_of_sample(ctx: Context, sample_id: str) -> str | None:
    with session_scope(ctx.sessions) as s:
        return s.scalar(select(Clip.video_id).join(Subject, Subject.clip_id == Clip.id)
                        .join(Pair, Pair.subject_id == Subject.id).join(Sample, Sample.pair_id == Pair.id)
                        .where(Sample.id == sample_id))


def continue_work(ctx: Context, stage: str, entity_id: str, result: StageResult, send: Send) -> None:
    """Hand the entity (or its samples) to the next stages its build runs, and settle the
    video once nothing of it is left in flight."""
    spec = STAGES[stage]
    until = build_until(ctx, build_of(ctx, spec.entity, entity_id))
    wanted = [(st, e) for st, e in result.next if runs(st, until)]
    for st, e in wanted:
        if st in VIDEO_STAGES:
            hand_out_videos(ctx, st, [e], send)
    if stage == "mine":
        samples = [e for st, e in wanted if st in SAMPLE_STAGES]
        sent = hand_out_samples(ctx, samples, send)
        if not sent and until == "verify" and result.status == "ok":
            finalize_video(ctx, entity_id)   # every sample had ended already (a re-run)
    elif stage in SAMPLE_STAGES:
        for st, e in wanted:
            hand_out_sample_stage(ctx, st, e, send)
        if not wanted:  # this sample has ended: the video may have too
            settle_video_of_sample(ctx, entity_id)


def settle_video_of_sample(ctx: Context, sample_id: str) -> None:
    video_id = video_of_sample(ctx, sample_id)
    if video_id is not None:
        finalize_video(ctx, video_id)

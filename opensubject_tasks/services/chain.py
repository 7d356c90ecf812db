"""What happens after a stage ran on a worker: each video walks its own chain.

A build hands every video of a chunk to ``curate`` once; from there the workers carry it
on (curate -> mine -> samples, which synthesizes and verifies the video's samples in
batches, re-synthesis included) as far as its build goes
(``builds.params.until``), and the last piece of work of a video gives it its terminal
state (``finalize_video``). An orchestrator only waits until the database says the
videos are settled: no message per stage passes through Airflow.

The caller passes ``send``: nothing here knows Celery.
"""
from __future__ import annotations

from sqlalchemy import select

from opensubject_tasks.catalogue import SAMPLE_STAGES, STAGES, UNTIL, runs
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Build
from opensubject_tasks.services.common import StageResult, build_of, finalize_video, video_of_sample
from opensubject_tasks.services.handoff import Send, hand_out_videos


def build_until(ctx: Context, build_id: str | None) -> str:
    """The last stage a build runs (its ``until`` parameter; the whole pipeline by default)."""
    if build_id is None:
        return "verify"
    with session_scope(ctx.sessions) as s:
        params = s.scalar(select(Build.params).where(Build.id == build_id)) or {}
    until = params.get("until") or "verify"
    return until if until in UNTIL else "verify"


def continue_work(ctx: Context, stage: str, entity_id: str, result: StageResult, send: Send) -> None:
    """Hand the video to the next stage its build runs, and settle it once nothing of it
    is left in flight."""
    entity = STAGES[stage].entity
    video_id = entity_id if entity == "video" else video_of_sample(ctx, entity_id) if entity == "sample" else None
    if video_id is None:
        return
    until = build_until(ctx, build_of(ctx, entity, entity_id))
    if entity == "sample":
        # a sample step run on its own (a rerun): the video's samples unit takes it on
        wanted = [("samples", video_id)] if result.next and runs("samples", until) else []
    else:
        wanted = [(st, e) for st, e in result.next if runs(st, until)]
    for st, e in wanted:
        hand_out_videos(ctx, st, [e], send)
    # mine with no sample in flight (a re-run), or a sample step run alone that ended its
    # sample; the samples unit settles its video itself
    if not wanted and until == "verify" and result.status == "ok" and stage in ("mine", *SAMPLE_STAGES):
        finalize_video(ctx, video_id)


def settle_video_of_sample(ctx: Context, sample_id: str) -> None:
    video_id = video_of_sample(ctx, sample_id)
    if video_id is not None:
        finalize_video(ctx, video_id)

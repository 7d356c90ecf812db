"""The samples unit of a video: synthesize and verify all of its samples, in batches.

One unit per video on the GPU queue instead of one task per sample and step: every model
(segmenter, inpainter, verifier's embedder and VLM, captioner) gets up to
``synth.batch_samples`` samples per call. Each sample still records its own ``synthesize``
and ``verify`` attempts, state and reasons exactly once (``run_steps``), so a unit that
is killed half way loses nothing and redoes nothing that was recorded: its next run (a
redelivery, the reconciler, a retried chunk) takes up what is still in flight.

A rejected verification sends the sample back to ``pending`` with a new seed; the unit
goes round again until every sample has ended, then gives the video its terminal state;
or it hands itself out again when it has used its time budget (``synth.task_budget_s``),
well inside its time limit.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

from sqlalchemy import Select, select

from opensubject_tasks.catalogue import SAMPLE_IN_FLIGHT, SAMPLE_UNIT
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.lineage import lineage
from opensubject_tasks.db.models import Clip, Sample
from opensubject_tasks.services.common import StageResult, finalize_video, run_steps, stage
from opensubject_tasks.services.synthesize import synthesize_samples
from opensubject_tasks.services.verify import verify_samples


@hot_query("sample batch", lambda f: {"video_id": f.video})
def in_flight_query(video_id: str) -> Select:
    return (lineage(select(Sample.id, Sample.state), Sample, Clip)
            .where(Clip.video_id == video_id, Sample.state.in_(SAMPLE_IN_FLIGHT)).order_by(Sample.id))


def in_flight(ctx: Context, video_id: str) -> dict[str, list[str]]:
    """The video's unfinished samples by state (pending, synthesized), in id order."""
    with session_scope(ctx.sessions) as s:
        rows = s.execute(in_flight_query(video_id)).all()
    out: dict[str, list[str]] = {st: [] for st in SAMPLE_IN_FLIGHT}
    for sid, st in rows:
        out[st].append(sid)
    return out


def batches(ids: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


@stage(SAMPLE_UNIT)
def process_samples(ctx: Context, video_id: str) -> StageResult:
    size = ctx.settings.synth.batch_samples
    deadline = time.monotonic() + ctx.settings.synth.task_budget_s
    # Every round ends each sample's attempt (verified, rejected, or pending with the next
    # attempt), so verify.max_attempts rounds finish a video; a few more cover samples
    # that a concurrent run moved on.
    rounds = ctx.settings.verify.max_attempts + 2
    counts = {"synthesized": 0, "verified": 0, "batches": 0}
    for _ in range(rounds):
        work = in_flight(ctx, video_id)
        if not work["pending"] and not work["synthesized"]:
            # every sample has ended: the video is done (a verified sample) or rejected
            return StageResult(details={**counts, "batch_size": size, "video": finalize_video(ctx, video_id)})
        for batch in batches(work["pending"], size):
            if time.monotonic() > deadline:
                return _again(video_id, counts, "time budget used")
            run_steps(ctx, "synthesize", batch, synthesize_samples)
            counts["synthesized"] += len(batch)
            counts["batches"] += 1
        for batch in batches(in_flight(ctx, video_id)["synthesized"], size):
            if time.monotonic() > deadline:
                return _again(video_id, counts, "time budget used")
            run_steps(ctx, "verify", batch, verify_samples)
            counts["verified"] += len(batch)
            counts["batches"] += 1
    return _again(video_id, counts, f"samples still in flight after {rounds} rounds")


def _again(video_id: str, counts: dict[str, int], why: str) -> StageResult:
    """Hand the unit out again (a new task, a fresh time limit) for what is left."""
    return StageResult(next=[(SAMPLE_UNIT, video_id)], details={**counts, "continued": why})

"""The embedded runner: every stage in-process, stage by stage, over one build.

It drives the same stage services as the Celery tasks (``services.common.run_stage``)
and keeps all progress in the database, so a run that is killed and started again
continues where it stopped. ``jobs > 1`` runs entities of a stage in parallel worker
processes; outputs depend only on ids and seeds, so they equal a ``jobs=1`` run.
"""
from __future__ import annotations

import logging
import multiprocessing
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from opensubject_tasks.config import Settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.models import Clip, Sample, Video
from opensubject_tasks.services.common import (STAGE_ORDER, finalize_video, load_stages,
                                               mark_terminal, run_stage)

log = logging.getLogger(__name__)

UNTIL_CHOICES = ("ingest",) + STAGE_ORDER
TERMINAL_VIDEO = ("done", "rejected", "failed")

# A callable(stage, total) -> advance(n) used for progress display; the CLI passes rich bars.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass
class StageTiming:
    stage: str
    entities: int = 0
    seconds: float = 0.0


@dataclass
class BuildSummary:
    build_id: str
    videos: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    timings: list[StageTiming] = field(default_factory=list)
    export_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"build_id": self.build_id, "videos": self.videos, "samples": self.samples,
                "timings": [t.__dict__ for t in self.timings], "export_dir": self.export_dir}


def _no_progress(stage: str, total: int) -> Callable[[int], None]:
    return lambda n: None


# --- worker processes -------------------------------------------------------------
_WORKER_CTX: Context | None = None


def _init_worker(settings_json: str) -> None:
    global _WORKER_CTX
    _WORKER_CTX = Context.from_settings(Settings.model_validate_json(settings_json))


def _run_in_worker(stage: str, entity_id: str) -> tuple[str, str, str | None]:
    assert _WORKER_CTX is not None
    return _run_one(_WORKER_CTX, stage, entity_id)


def _run_one(ctx: Context, stage: str, entity_id: str) -> tuple[str, str, str | None]:
    """Run one unit; an unexpected error fails that entity alone, never the build."""
    try:
        result = run_stage(ctx, stage, entity_id)
        return entity_id, result.status, result.reason
    except Exception as exc:  # noqa: BLE001 - recorded on the entity, the build goes on
        reason = f"internal error in {stage}: {type(exc).__name__}: {exc}"
        log.error("%s\n%s", reason, traceback.format_exc())
        mark_terminal(ctx, load_stages()[stage].entity_type, entity_id, "failed", reason)
        return entity_id, "failed", reason


class Runner:
    def __init__(self, ctx: Context, jobs: int = 1, progress: ProgressFactory | None = None) -> None:
        self.ctx = ctx
        self.jobs = max(1, jobs)
        self.progress = progress or _no_progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Runner:
        if self.jobs > 1:
            self.ctx.engine.dispose()  # no connection may cross a fork
            self._pool = ProcessPoolExecutor(
                max_workers=self.jobs, mp_context=multiprocessing.get_context("fork"),
                initializer=_init_worker, initargs=(self.ctx.settings.model_dump_json(),),
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def map(self, stage: str, ids: list[str]) -> list[tuple[str, str, str | None]]:
        """Run ``stage`` over ids (in parallel when jobs > 1), with a progress bar."""
        advance = self.progress(stage, len(ids))
        results = []
        if self._pool is None or len(ids) <= 1:
            for entity_id in ids:
                results.append(_run_one(self.ctx, stage, entity_id))
                advance(1)
        else:
            futures = [self._pool.submit(_run_in_worker, stage, i) for i in ids]
            for fut in as_completed(futures):
                results.append(fut.result())
                advance(1)
        return sorted(results)


def _video_ids(ctx: Context, build_id: str, stage_done: Iterable[str | None]) -> list[str]:
    wanted = list(stage_done)
    with session_scope(ctx.sessions) as s:
        q = select(Video.id, Video.stage_done).where(
            Video.build_id == build_id, Video.state.not_in(TERMINAL_VIDEO)).order_by(Video.id)
        return [vid for vid, done in s.execute(q) if done in wanted]


def _sample_ids(ctx: Context, build_id: str, state: str) -> list[str]:
    with session_scope(ctx.sessions) as s:
        return list(s.scalars(select(Sample.id).where(
            Sample.build_id == build_id, Sample.state == state).order_by(Sample.id)))


def run_build(ctx: Context, sources: list[str], build_id: str, *, until: str | None = None,
              jobs: int = 1, progress: ProgressFactory | None = None,
              export_dir: str | None = None, params: dict[str, Any] | None = None) -> BuildSummary:
    """Run (or resume) a build over the given sources, up to and including ``until``."""
    from opensubject_tasks.services.ingest import claim_videos, ensure_build, register_source

    if until is not None and until not in UNTIL_CHOICES:
        raise ValueError(f"--until must be one of {', '.join(UNTIL_CHOICES)}")
    upgrade(ctx.engine)
    ensure_build(ctx, build_id, params or {"sources": sources}, ctx.settings.profile)
    summary = BuildSummary(build_id)

    def timed(stage: str, fn: Callable[[], int]) -> None:
        t0 = time.perf_counter()
        n = fn()
        summary.timings.append(StageTiming(stage, n, time.perf_counter() - t0))

    def ingest() -> int:
        n = 0
        for source in sources:
            n += len(register_source(ctx, source, build_id=build_id).new_ids)
        claim_videos(ctx, build_id, None)
        return n

    timed("ingest", ingest)
    with Runner(ctx, jobs, progress) as runner:
        if until != "ingest":
            timed("curate", lambda: len(runner.map("curate", _video_ids(ctx, build_id, [None]))))
        if until not in ("ingest", "curate"):
            timed("mine", lambda: len(runner.map("mine", _video_ids(ctx, build_id, ["curate"]))))
        if until not in ("ingest", "curate", "mine"):
            timed("synthesize+verify", lambda: _synth_verify_loop(ctx, runner, build_id, until))
        if until in (None, "verify", "export"):
            for vid in _video_ids(ctx, build_id, ["mine"]):
                finalize_video(ctx, vid)
    if until in (None, "export") and export_dir:
        from opensubject_tasks.services.export import export_build_to

        def export() -> int:
            export_build_to(ctx, build_id, export_dir)
            summary.export_dir = str(export_dir)
            return 1
        timed("export", export)
    summary.videos, summary.samples = _counts(ctx, build_id)
    return summary


def _synth_verify_loop(ctx: Context, runner: Runner, build_id: str, until: str | None) -> int:
    """Synthesize pending samples, verify them; failed verifications come back as
    pending with attempt+1 and go round again until verified or rejected."""
    done = 0
    for _round in range(ctx.settings.verify.max_attempts + 1):
        pending = _sample_ids(ctx, build_id, "pending")
        if pending:
            runner.map("synthesize", pending)
            done += len(pending)
        if until == "synthesize":
            break
        synthesized = _sample_ids(ctx, build_id, "synthesized")
        if synthesized:
            runner.map("verify", synthesized)
        if not _sample_ids(ctx, build_id, "pending"):
            break
    return done


def _counts(ctx: Context, build_id: str) -> tuple[dict[str, int], dict[str, int]]:
    from sqlalchemy import func

    with session_scope(ctx.sessions) as s:
        videos = dict(s.execute(select(Video.state, func.count()).where(
            Video.build_id == build_id).group_by(Video.state)).all())
        samples = dict(s.execute(select(Sample.state, func.count()).where(
            Sample.build_id == build_id).group_by(Sample.state)).all())
    return videos, samples


def funnel(ctx: Context, build_id: str | None = None) -> dict[str, Any]:
    """The status document: per-video state and clips, and the stage funnel so far
    (the same counts as the export's stats.json), for one build or all of them."""
    from opensubject_tasks.db.models import Build
    from opensubject_tasks.services.export import funnel_counts

    with session_scope(ctx.sessions) as s:
        builds = [build_id] if build_id else list(s.scalars(select(Build.id).order_by(Build.id)))
        vq = select(Video).where(Video.build_id.in_(builds)).order_by(Video.name, Video.id)
        videos = list(s.scalars(vq))
        clips: dict[str, list[list[int]]] = {v.id: [] for v in videos}
        for vid, a, b in s.execute(select(Clip.video_id, Clip.start_frame, Clip.end_frame)
                                   .where(Clip.video_id.in_(list(clips))).order_by(Clip.video_id, Clip.idx)):
            clips[vid].append([a, b])
        totals: dict[str, int] = {}
        for b in builds:
            for k, n in funnel_counts(s, b).items():
                totals[k] = totals.get(k, 0) + n
        keys = ("videos", "clips", "subjects", "pairs", "samples", "verified", "rejected")
        return {
            "videos": [{"name": v.name, "id": v.id, "state": v.state, "reason": v.reason,
                        "stage_done": v.stage_done, "clips": clips[v.id]} for v in videos],
            "funnel": {k: totals.get(k, 0) for k in keys},
        }

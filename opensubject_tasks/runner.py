"""The embedded runner: every stage in-process, over one build.

It drives the same stage services as the Celery tasks (``services.common.run_stage``)
and keeps all progress in the database, so a run that is killed and started again
continues where it stopped. Work is a set of units (stage, entity); a unit starts as
soon as the unit before it has finished (a video's mine after its curate, its samples
after its mine), following the ``next`` units each stage names, so no
worker waits for a whole stage to end. ``jobs > 1`` runs units in parallel worker
processes; outputs depend only on ids and seeds, so they equal a ``jobs=1`` run.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, select

from opensubject_tasks.config import Settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.lineage import lineage
from opensubject_tasks.db.models import Clip, Sample, Video
from opensubject_tasks.catalogue import FIRST_STAGE, SAMPLE_IN_FLIGHT, SAMPLE_UNIT, STAGE_ORDER, VIDEO_TERMINAL, follow
from opensubject_tasks.services.common import finalize_video, load_stages, mark_terminal, run_stage, stage_spec

log = logging.getLogger(__name__)

UNTIL_CHOICES = ("ingest",) + STAGE_ORDER

# A callable(stage) -> update(advance, total) used for progress display; the CLI passes
# rich bars. The total grows while the build runs: follow-up units (a video's samples, a
# re-synthesis) appear as earlier units finish.
ProgressFactory = Callable[[str], Callable[[int, int], None]]
# What one unit gives back: entity id, status, reason, follow-up (stage, entity) units.
UnitResult = tuple[str, str, "str | None", list[tuple[str, str]]]


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


def _no_progress(stage: str) -> Callable[[int, int], None]:
    return lambda advance, total: None


# --- worker processes -------------------------------------------------------------
_WORKER_CTX: Context | None = None


def threads_per_worker(jobs: int) -> int:
    """Each worker's share of the cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, jobs))


@contextlib.contextmanager
def threads_for_workers(threads: int) -> Iterator[None]:
    """Size the libraries' own thread pools to one worker's share of the cores while
    the workers are forked (they inherit it), then restore this process's. Each library
    would otherwise use one thread per core in every worker (OpenCV's pool, torch's
    intra-op threads), and on a full machine those threads only wait on each other.
    Resizing must happen here: in a forked child OpenCV's resize waits forever for the
    parent's pool threads, which do not exist there."""
    import cv2

    torch = sys.modules.get("torch")  # not imported for this: it takes a second
    cv_before = cv2.getNumThreads()
    torch_before = torch.get_num_threads() if torch is not None else 0
    cv2.setNumThreads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        cv2.setNumThreads(cv_before)
        if torch is not None:
            torch.set_num_threads(torch_before)


def _init_worker(settings_json: str, threads: int) -> None:
    global _WORKER_CTX
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # OpenMP libraries loaded later
    settings = Settings.model_validate_json(settings_json)
    if settings.curate.decode_threads == 0:  # 0 lets FFmpeg start one thread per core
        settings.curate.decode_threads = threads
    _WORKER_CTX = Context.from_settings(settings)


def _run_in_worker(stage: str, entity_id: str) -> UnitResult:
    assert _WORKER_CTX is not None
    return _run_one(_WORKER_CTX, stage, entity_id)


def _run_one(ctx: Context, stage: str, entity_id: str) -> UnitResult:
    """Run one unit; an unexpected error fails that entity alone, never the build."""
    try:
        result = run_stage(ctx, stage, entity_id)
        return entity_id, result.status, result.reason, [tuple(n) for n in result.next]
    except Exception as exc:  # noqa: BLE001 - recorded on the entity, the build goes on
        reason = f"internal error in {stage}: {type(exc).__name__}: {exc}"
        log.error("%s\n%s", reason, traceback.format_exc())
        mark_terminal(ctx, stage_spec(stage).entity_type, entity_id, "failed", reason, error_stage=stage)
        return entity_id, "failed", reason, []


class Runner:
    def __init__(self, ctx: Context, jobs: int = 1, progress: ProgressFactory | None = None) -> None:
        self.ctx = ctx
        self.jobs = max(1, jobs)
        self.progress = progress or _no_progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Runner:
        if self.jobs > 1:
            load_stages()  # imported once here and shared by the forked workers (~1 s each)
            self.ctx.engine.dispose()  # no connection may cross a fork
            threads = threads_per_worker(self.jobs)
            with threads_for_workers(threads):
                self._pool = ProcessPoolExecutor(
                    max_workers=self.jobs, mp_context=multiprocessing.get_context("fork"),
                    initializer=_init_worker,
                    initargs=(self.ctx.settings.model_dump_json(), threads),
                )
                self._pool.submit(int).result()  # a fork pool starts all its workers now
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def flow(self, units: Iterable[tuple[str, str]], stages: Iterable[str]) -> list[StageTiming]:
        """Run ``units`` and, as each finishes, the follow-up units it names that belong
        to ``stages``; returns per stage the units run and the seconds from its first
        start to its last end (stages overlap). Units of earlier stages go first: they
        are the long ones (a video's curate or mine), so the short ones (a sample's
        synthesis or verification) fill the workers at the end."""
        allowed = set(stages)
        rank = {name: i for i, name in enumerate(STAGE_ORDER)}
        order = itertools.count()
        ready: list[tuple[int, int, str, str]] = []    # heap: stage rank, arrival, unit
        pending: set[tuple[str, str]] = set()          # ready or running: not added twice
        span: dict[str, list[float]] = {}               # stage -> [first start, last end]
        counts: dict[str, int] = {}
        queued: dict[str, int] = {}                     # stage -> units added so far
        bars: dict[str, Callable[[int, int], None]] = {}

        def bar(stage: str, advance: int) -> None:
            if stage not in bars:
                bars[stage] = self.progress(stage)
            bars[stage](advance, queued[stage])

        def add(stage: str, entity_id: str) -> None:
            if stage in allowed and (stage, entity_id) not in pending:
                pending.add((stage, entity_id))
                heapq.heappush(ready, (rank[stage], next(order), stage, entity_id))
                queued[stage] = queued.get(stage, 0) + 1
                bar(stage, 0)

        def start() -> tuple[str, str]:
            _, _, stage, entity_id = heapq.heappop(ready)
            span.setdefault(stage, [time.perf_counter(), 0.0])
            return stage, entity_id

        def done(stage: str, entity_id: str, result: UnitResult) -> None:
            pending.discard((stage, entity_id))
            span[stage][1] = time.perf_counter()
            counts[stage] = counts.get(stage, 0) + 1
            bar(stage, 1)
            for unit in result[3]:
                add(*unit)

        for unit in units:
            add(*unit)
        if self._pool is None:
            while ready:
                stage, entity_id = start()
                done(stage, entity_id, _run_one(self.ctx, stage, entity_id))
        else:
            # as many units in flight as workers: a unit that becomes ready can still
            # overtake queued ones of later stages
            running: dict[Future[UnitResult], tuple[str, str]] = {}
            while ready or running:
                while ready and len(running) < self.jobs:
                    stage, entity_id = start()
                    running[self._pool.submit(_run_in_worker, stage, entity_id)] = (stage, entity_id)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(*running.pop(fut), fut.result())
        return [StageTiming(stage, counts[stage], span[stage][1] - span[stage][0])
                for stage in STAGE_ORDER if stage in counts]


def _video_ids(ctx: Context, build_id: str, stage_done: Iterable[str | None]) -> list[str]:
    wanted = list(stage_done)
    with session_scope(ctx.sessions) as s:
        q = select(Video.id, Video.stage_done).where(
            Video.build_id == build_id, Video.state.not_in(VIDEO_TERMINAL)).order_by(Video.id)
        return [vid for vid, done in s.execute(q) if done in wanted]


def _videos_with_samples_in_flight(ctx: Context, build_id: str) -> list[str]:
    with session_scope(ctx.sessions) as s:
        return list(s.scalars(
            lineage(select(Clip.video_id), Sample, Clip)
            .where(Sample.build_id == build_id, Sample.state.in_(SAMPLE_IN_FLIGHT)).distinct().order_by(Clip.video_id)))


def run_build(ctx: Context, sources: list[str], build_id: str, *, until: str | None = None,
              jobs: int = 1, progress: ProgressFactory | None = None,
              export_dir: str | None = None, params: dict[str, Any] | None = None) -> BuildSummary:
    """Run (or resume) a build over the given sources, up to and including ``until``."""
    from opensubject_tasks.services.ingest import claim_count, ensure_build, register_source

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
        claim_count(ctx, build_id, None)
        return n

    timed("ingest", ingest)
    stages: tuple[str, ...] = ()
    if until != "ingest":
        last = "verify" if until in (None, "export") else until
        stages = STAGE_ORDER[:STAGE_ORDER.index(last) + 1]
    with Runner(ctx, jobs, progress) as runner:
        summary.timings += runner.flow(_open_units(ctx, build_id), stages)
        if until in (None, "verify", "export"):
            for vid in _video_ids(ctx, build_id, ["mine"]):
                finalize_video(ctx, vid)
    if until in (None, "export") and export_dir:
        from opensubject_tasks.export.service import export_build_to

        def export() -> int:
            export_build_to(ctx, build_id, export_dir)
            summary.export_dir = str(export_dir)
            return 1
        timed("export", export)
    summary.videos, summary.samples = _counts(ctx, build_id)
    return summary


def _open_units(ctx: Context, build_id: str) -> list[tuple[str, str]]:
    """Where each unfinished entity of the build stands: the unit it needs next (a run
    that was stopped resumes from here)."""
    units = [(FIRST_STAGE, vid) for vid in _video_ids(ctx, build_id, [None])]
    units += [u for vid in _video_ids(ctx, build_id, [FIRST_STAGE]) for u in follow(FIRST_STAGE, vid)]
    units += [(SAMPLE_UNIT, vid) for vid in _videos_with_samples_in_flight(ctx, build_id)]
    return units


def _counts(ctx: Context, build_id: str) -> tuple[dict[str, int], dict[str, int]]:
    from opensubject_tasks import readmodel

    with session_scope(ctx.sessions) as s:
        st = readmodel.states(s, build_id)
    return st["videos"], st["samples"]


@hot_query("status load", lambda f: {"build_id": f.build})
def videos_of_build(build_id: str | None) -> Select:
    """The per-video list of `status`: one build's videos (O(the build's videos))."""
    return select(Video).where(Video.build_id == build_id).order_by(Video.name, Video.id)


@hot_query("status load", lambda f: {"video_ids": f.video_ids})
def clip_frames_of(video_ids: list[str]) -> Select:
    """The clips of some videos (the caller passes at most ID_BATCH ids per statement)."""
    return (select(Clip.video_id, Clip.start_frame, Clip.end_frame)
            .where(Clip.video_id.in_(video_ids)).order_by(Clip.video_id, Clip.idx))


def funnel(ctx: Context, build_id: str | None = None) -> dict[str, Any]:
    """The status document of one build (the most recent when none is named): the stage
    funnel (the read model every surface shares), per-video state and clips, and the inputs
    recorded as duplicates. The per-video list is the build's, never the whole database's."""
    from opensubject_tasks import readmodel
    from opensubject_tasks.orchestrate import ID_BATCH, batched

    with session_scope(ctx.sessions) as s:
        if build_id is None:
            latest = s.scalars(readmodel.recent_builds(1)).first()
            build_id = latest.id if latest else None
        videos = list(s.scalars(videos_of_build(build_id)))
        clips: dict[str, list[list[int]]] = {v.id: [] for v in videos}
        for part in batched(list(clips), ID_BATCH):
            for vid, a, b in s.execute(clip_frames_of(part)):
                clips[vid].append([a, b])
        return {
            "build": build_id,
            "videos": [{"name": v.name, "id": v.id, "state": v.state, "reason": v.reason,
                        "stage_done": v.stage_done, "clips": clips[v.id]} for v in videos],
            "funnel": readmodel.funnel(s, build_id) if build_id else dict.fromkeys(readmodel.FUNNEL, 0),
            "duplicates": readmodel.duplicates(s, build_id) if build_id else [],
        }

"""What an orchestrator (Airflow) asks of the package: start a build, split its videos into
chunks, hand a chunk to the workers, and read progress and outcomes. No Airflow import.

Airflow maps one task over the *chunks* of a build, not over videos: a chunk task registers
its videos as waiting (``start_chunk``; the next waiting video of any chunk is handed out as
soon as one leaves the queues, and the workers chain the stages) and waits in the triggerer until the database says every video is settled (``chunk_progress``).
Task instances grow with chunks; a 10^6-video build stays under ``[core] max_map_length``.

Airflow tasks call these in short-lived processes; Airflow triggers call the read-only
ones from a long-lived event loop (in a thread), so contexts (one pooled engine each) are
cached per process and settings.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any

from collections.abc import Iterator

from sqlalchemy import Select, bindparam, func, select, update

from opensubject_tasks.catalogue import FIRST_STAGE, UNTIL, VIDEO_TERMINAL, settled, stage_reached
from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.lineage import lineage
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.models import Build, Clip, Sample, StageAttempt, TaskOutcome, Video
from opensubject_tasks.storage.base import slug

log = logging.getLogger(__name__)

# A chunk holds at least this many videos and is made larger when a build would need more
# chunks than Airflow maps (10^6 videos: 1,000 chunks). Chunks do not bound the work's
# parallelism (videos in flight do), but each costs an Airflow task process (about 1 s of
# CPU) and a trigger: a 2,000-video build in chunks of 50 spent 82 s of CPU in Airflow, in
# chunks of 200 37 s (docs/distributed.md). A chunk is also what turns red in the UI when one
# of its videos failed on an error; its log lists which.
MIN_CHUNK = 1000

_contexts: dict[str, Context] = {}


def context() -> Context:
    """A Context for the current settings (environment), built once per process."""
    settings = load_settings()
    key = hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
    if key not in _contexts:
        _contexts[key] = Context.from_settings(settings)
    return _contexts[key]


def _send(stage: str, *args: Any, **options: Any) -> str:
    from opensubject_tasks.tasks import send

    return send(stage, *args, **options)


# --- builds ---------------------------------------------------------------------------------
def build_id_for(params: dict[str, Any], run_id: str) -> str:
    """The build name from the run's parameters, or one made from the run id."""
    return slug(params.get("build_name") or run_id, 64)


def start_build(params: dict[str, Any], run_id: str) -> str:
    """Create (or re-open) the build row; returns the build id. A source the workers may
    not read is refused here, before any work (``SourceNotAllowed``)."""
    from opensubject_tasks.errors import BadInput
    from opensubject_tasks.services.ingest import check_source_allowed, ensure_build

    ctx = context()
    if (params.get("source") or "").strip():
        check_source_allowed(ctx, params["source"].strip())
    until = params.get("until") or "verify"
    if until not in UNTIL:
        raise BadInput(f"until must be one of {', '.join(UNTIL)} (got {until!r})")
    build_id = build_id_for(params, run_id)
    ensure_build(ctx, build_id, dict(params), params.get("profile") or "cpu")
    return build_id


def chunk_size_for(videos: int, max_chunks: int, wanted: int = 0) -> int:
    """Videos per chunk: ``wanted`` when it keeps the chunks within ``max_chunks``, else the
    smallest size that does (and never below MIN_CHUNK when chosen automatically)."""
    needed = max(1, math.ceil(videos / max(1, max_chunks)))
    if wanted > 0:
        return max(wanted, needed)
    return max(MIN_CHUNK, needed)


def claim_build_videos(build_id: str, limit: int | None = None, video_ids: list[str] | None = None, *,
                       max_chunks: int = 1024, chunk_size: int = 0) -> list[int]:
    """Claim the build's videos and split the ones with work left into chunks; returns the
    chunk numbers (what the chunk task maps over).

    With ``video_ids``: exactly those (taking any that no build holds); otherwise up to
    ``limit`` registered videos that no build holds (``FOR UPDATE SKIP LOCKED``), plus the
    build's own videos that are not finished (a re-run resumes; errored videos are retried).
    """
    from opensubject_tasks.services.ingest import claim_count

    ctx = context()
    for part in batched(video_ids or [], ID_BATCH):
        with session_scope(ctx.sessions) as s:
            s.execute(update(Video).where(Video.id.in_(part), Video.build_id.is_(None))
                      .values(build_id=build_id).execution_options(synchronize_session=False))
    if not video_ids:
        claim_count(ctx, build_id, limit or None)
    with session_scope(ctx.sessions) as s:
        todo = _needs_work(select(Video.id).where(Video.build_id == build_id))
        if video_ids:
            # the ones asked for (a list as long as the build's parameter), a batch at a time
            ids = sorted({v for part in batched(sorted(set(video_ids)), ID_BATCH)
                          for v in s.scalars(todo.where(Video.id.in_(part)))})
            count = len(ids)
            size = chunk_size_for(count, max_chunks, chunk_size)
            table = Video.__table__
            s.connection().execute(update(table).where(table.c.id == bindparam("vid")).values(chunk=bindparam("c")),
                                   [{"vid": v, "c": n // size} for n, v in enumerate(ids)])
        else:
            count = int(s.scalar(select(func.count()).select_from(todo.subquery())) or 0)
            size = chunk_size_for(count, max_chunks, chunk_size)
            # One statement numbers them all: chunk = position in id order // size.
            ranked = todo.add_columns((func.row_number().over(order_by=Video.id) - 1).label("rn")).subquery()
            s.execute(update(Video).where(Video.id == ranked.c.id)
                      .values(chunk=ranked.c.rn // size).execution_options(synchronize_session=False))
    chunks = math.ceil(count / size) if count else 0
    log.info("build %s: %d video(s) with work left in %d chunk(s) of %d", build_id, count, chunks, size)
    return list(range(chunks))


# Ids per statement where a statement takes a list of ids: psycopg 3 refuses more than
# 65,535 bind parameters, and psycopg2 takes minutes over a 10^6-id list.
ID_BATCH = 1000


def batched(ids: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def _needs_work(q: Any) -> Any:
    """Videos not finished: not done or rejected, and not failed on their input (a video
    failed by an error is retried)."""
    return q.where(Video.state.not_in(("done", "rejected")),
                   (Video.state != "failed") | Video.error_stage.is_not(None))


def unclaimed_videos() -> int:
    """Registered videos that no build holds (what a scheduled ingest builds next)."""
    with session_scope(context().sessions) as s:
        return int(s.scalar(unclaimed_count()) or 0)


def waiting_build_conf(name: str, profile: str) -> dict[str, Any] | None:
    """The trigger conf of a build of every registered video no build holds (named ``name``),
    or None when none waits: what the scheduled ingest and the bucket-event runs start."""
    waiting = unclaimed_videos()
    log.info("%d registered video(s) wait for a build", waiting)
    if not waiting:
        return None
    return {"build_name": slug(name, 64), "video_ids": [], "profile": profile, "source": "", "limit": 0}


@hot_query("scheduled ingest", lambda f: {})
def unclaimed_count() -> Select:
    return select(func.count(Video.id)).where(Video.build_id.is_(None), Video.state == "registered")


# --- chunks ---------------------------------------------------------------------------------
def start_chunk(build_id: str, chunk: int) -> dict[str, int]:
    """Register the chunk's videos that need work as waiting for ``curate`` (the chain skips
    what is done and goes on from there; services/handoff.py hands them out as places in
    flight free up, from any chunk): videos never handed out and videos an error failed
    (their errored samples go back to pending); send again at once videos handed out before
    whose work is nowhere (not on the broker, not running: a lost message, or a build resumed
    with a later ``until``). Work that is queued or running is left alone, so a retried or
    cleared chunk sends nothing twice. Returns counts."""
    from opensubject_tasks.services.chain import build_until
    from opensubject_tasks.services.handoff import hand_out_videos, top_up, wait_for_hand_out

    ctx = context()
    until = build_until(ctx, build_id)
    with session_scope(ctx.sessions) as s:
        rows = s.execute(chunk_videos(build_id, chunk)).all()
        errored = sorted({r.id for r in rows if r.state == "failed" and r.error_stage}
                         | set(s.scalars(chunk_videos_with_errored_samples(build_id, chunk))))
        for part in batched(errored, ID_BATCH):
            _reset_errors(s, part)
        open_ = [r for r in rows if r.id not in errored and not settled(r.state, r.stage_done, until)]
        fresh = [r.id for r in open_ if r.queued_at is None]
        handed = [r.id for r in open_ if r.queued_at is not None]
        idle = _idle(s, build_id, chunk, handed) if handed else []
        wait_for_hand_out(s, fresh)
        wait_for_hand_out(s, errored, again=True)
    # lost messages keep the place in flight their video holds
    again = hand_out_videos(ctx, FIRST_STAGE, idle, _send, again=True)
    pulled = top_up(ctx, _send)
    return {"videos": len(rows), "waiting": len(fresh), "retried": len(errored), "resent": len(idle),
            "in_flight": len(handed) - len(idle), "handed_out": len(pulled) + len(again)}


_CHUNK = lambda f: {"build_id": f.build, "chunk": f.chunk}  # noqa: E731 - the example of a chunk's queries


def _of_chunk(build_id: str, chunk: int) -> Any:
    return select(Video.id).where(Video.build_id == build_id, Video.chunk == chunk)


@hot_query("chunk start", _CHUNK)
def chunk_videos(build_id: str, chunk: int) -> Select:
    return (select(Video.id, Video.state, Video.stage_done, Video.error_stage, Video.queued_at)
            .where(Video.build_id == build_id, Video.chunk == chunk).order_by(Video.id))


@hot_query("chunk start", _CHUNK)
def chunk_videos_with_errored_samples(build_id: str, chunk: int) -> Select:
    return (lineage(select(Clip.video_id), Sample, Clip)
            .where(Clip.video_id.in_(_of_chunk(build_id, chunk)), Sample.state == "failed",
                   Sample.error_stage.is_not(None)).distinct())


@hot_query("chunk start", _CHUNK)
def chunk_samples(build_id: str, chunk: int) -> Select:
    """(sample id, video id) of the chunk's samples."""
    return (lineage(select(Sample.id, Clip.video_id), Sample, Clip)
            .where(Clip.video_id.in_(_of_chunk(build_id, chunk))))


@hot_query("chunk start", _CHUNK)
def chunk_running(build_id: str, chunk: int) -> Select:
    """Entity ids of the attempts running now on the chunk's videos and their samples (the
    running attempts are few: a partial index holds just them)."""
    samples = chunk_samples(build_id, chunk).with_only_columns(Sample.id)
    return select(StageAttempt.entity_id).where(
        StageAttempt.status == "running",
        ((StageAttempt.entity_type == "video") & StageAttempt.entity_id.in_(_of_chunk(build_id, chunk)))
        | ((StageAttempt.entity_type == "sample") & StageAttempt.entity_id.in_(samples)))


def _idle(s: Any, build_id: str, chunk: int, video_ids: list[str]) -> list[str]:
    """Of the chunk's videos handed out before, those with nothing of theirs on the broker
    or running."""
    from opensubject_tasks.tasks import waiting_in_broker

    held = waiting_in_broker()
    if held is None:  # cannot tell: leave them to the reconciler's age rule
        return []
    mine = set(video_ids)
    sample_video = dict(s.execute(chunk_samples(build_id, chunk)).all())
    busy = {e if e in mine else sample_video.get(e) for (_, e) in held} - {None}
    busy |= {sample_video.get(e, e) for e in s.scalars(chunk_running(build_id, chunk))}
    return sorted(mine - busy)


def _samples_of_videos(ids: list[str]) -> Any:
    return lineage(select(Sample.id), Sample, Clip).where(Clip.video_id.in_(ids))


def _reset_errors(s: Any, video_ids: list[str]) -> None:
    """Videos and samples an error failed go back into work (attempts and seeds kept)."""
    s.execute(update(Sample).where(Sample.id.in_(_samples_of_videos(video_ids).scalar_subquery()),
                                   Sample.state == "failed", Sample.error_stage.is_not(None))
              .values(state="pending", error_stage=None, reason=None).execution_options(synchronize_session=False))
    s.execute(update(Video).where(Video.id.in_(video_ids))
              .values(state="running", error_stage=None, reason=None).execution_options(synchronize_session=False))


@hot_query("chunk poll", lambda f: {"build_id": f.build, "chunk": f.chunk, "until": "verify"})
def chunk_counts(build_id: str, chunk: int, until: str) -> Select:
    """(videos, videos settled for a build that runs up to ``until``) of a chunk."""
    done_until = Video.stage_done.in_([st for st in ("curate", "mine") if stage_reached(st, until)]) \
        if until != "verify" else None
    cond = Video.state.in_(VIDEO_TERMINAL) if done_until is None else (Video.state.in_(VIDEO_TERMINAL) | done_until)
    return select(func.count(), func.count().filter(cond)).where(Video.build_id == build_id, Video.chunk == chunk)


def chunk_progress(build_id: str, chunk: int) -> dict[str, int] | None:
    """None while any video of the chunk still has work in this build; else the counts.
    One indexed query (the chunk triggers' poll)."""
    from opensubject_tasks.services.chain import build_until

    ctx = context()
    until = build_until(ctx, build_id)
    with session_scope(ctx.sessions) as s:
        total, done = s.execute(chunk_counts(build_id, chunk, until)).one()
    if done < total:
        return None
    return {"videos": int(total), "settled": int(done)}


@hot_query("chunk end", _CHUNK)
def chunk_sample_errors(build_id: str, chunk: int) -> Select:
    return (lineage(select(Clip.video_id, Sample.id, Sample.error_stage, Sample.reason), Sample, Clip)
            .where(Clip.video_id.in_(_of_chunk(build_id, chunk)), Sample.state == "failed",
                   Sample.error_stage.is_not(None))
            .order_by(Sample.id))


def chunk_report(build_id: str, chunk: int) -> dict[str, Any]:
    """What a finished chunk tells its operator: states, bad inputs by reason, and every
    video an error failed (or whose samples an error failed), with the stage and error."""
    ctx = context()
    with session_scope(ctx.sessions) as s:
        videos = s.execute(select(Video.id, Video.name, Video.state, Video.reason, Video.error_stage)
                           .where(Video.build_id == build_id, Video.chunk == chunk).order_by(Video.id)).all()
        sample_errors = s.execute(chunk_sample_errors(build_id, chunk)).all()
    states: dict[str, int] = {}
    bad_input: dict[str, int] = {}
    errors = []
    names = {v.id: v.name for v in videos}
    for v in videos:
        states[v.state] = states.get(v.state, 0) + 1
        if v.state == "failed" and v.error_stage:
            errors.append({"video": v.id, "name": v.name, "sample": None, "stage": v.error_stage,
                           "error": v.reason or ""})
        elif v.state in ("rejected", "failed") and v.reason:
            key = v.reason.split(":", 1)[0][:120]
            bad_input[key] = bad_input.get(key, 0) + 1
    for vid, sid, stage, reason in sample_errors:
        errors.append({"video": vid, "name": names.get(vid, ""), "sample": sid, "stage": stage, "error": reason or ""})
    return {"build": build_id, "chunk": chunk, "videos": len(videos), "states": states,
            "bad_input": bad_input, "errors": errors}


# --- tasks an orchestrator waits for ----------------------------------------------------------
def send_task(stage: str, args: list[Any]) -> str:
    """Put one task (ingest, export, reconcile) on its queue; returns its Celery task id,
    whose outcome ``task_outcome`` reads."""
    return _send(stage, *args)


def task_outcome(task_id: str) -> dict[str, Any] | None:
    """None while the task has no outcome yet; else ``{"status": "success", "result": ...}``
    or ``{"status": "failure", "error": ...}`` (the project's table, pooled connection)."""
    with session_scope(context().sessions) as s:
        row = s.get(TaskOutcome, task_id)
        if row is None:
            return None
        return {"status": row.status, "result": row.result, "error": row.error}


def build_report(build_id: str) -> dict[str, Any]:
    """The build's funnel and states (the shared read model); marks the build done."""
    from opensubject_tasks import readmodel

    ctx = context()
    with session_scope(ctx.sessions) as s:
        counted = readmodel.counts(s, build_id)
        doc = {"build_id": build_id, "funnel": readmodel.funnel(s, build_id, counted)}
        st = readmodel.states(s, build_id, counted)
        doc["videos_by_state"], doc["samples_by_state"] = st["videos"], st["samples"]
        build = s.get(Build, build_id)
        if build is not None and build.state == "running":
            build.state = "done"
    return doc


# --- an operator's re-run -------------------------------------------------------------------------
def rerun_on_workers(stage: str, video_id: str, timeout_s: float, poll_s: float = 1.0) -> dict[str, Any]:
    """Hand one video stage to the workers, as a chunk does, and wait for its outcome in the
    attempt rows (retries included); TimeoutError when it has not ended in time. The
    workers carry the video on from there as far as its build goes."""
    from opensubject_tasks.catalogue import ATTEMPT_ERRORS
    from opensubject_tasks.services.handoff import hand_out_videos

    ctx = context()
    with session_scope(ctx.sessions) as s:
        before = s.scalar(select(func.max(StageAttempt.id))) or 0
    hand_out_videos(ctx, stage, [video_id], _send)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope(ctx.sessions) as s:
            last = s.execute(select(StageAttempt.status, StageAttempt.error, StageAttempt.details)
                             .where(StageAttempt.entity_type == "video", StageAttempt.entity_id == video_id,
                                    StageAttempt.stage == stage, StageAttempt.id > before)
                             .order_by(StageAttempt.id.desc()).limit(1)).first()
            video_state = s.scalar(select(Video.state).where(Video.id == video_id))
        if last is not None and last.status in ("ok", "rejected", "failed"):
            return {"status": last.status, "reason": last.error, "details": last.details or {}, "next": []}
        if last is not None and last.status in ATTEMPT_ERRORS and video_state == "failed":
            return {"status": "failed", "reason": last.error, "details": last.details or {}, "next": []}
        time.sleep(poll_s)
    raise TimeoutError(f"{stage} of video {video_id} has not ended after {timeout_s:.0f} s; "
                       "`opensubject status` shows where it stands")



# --- bucket notifications ---------------------------------------------------------------------------
def consume_store_events(build_name: str | None = None) -> dict[str, Any]:
    """Register the objects of the pending bucket events under the raw-videos prefix; with a
    build name, they join that build and are handed to the queues at once. Returns counts."""
    from opensubject_tasks.services.events import consume

    ctx = context()
    build_id = slug(build_name, 64) if build_name else None
    return consume(ctx, ctx.settings.store.raw_prefix, build_id, _send if build_id else None).to_dict()


def store_events_pending() -> int:
    """The id of the newest bucket event waiting (0: none): what the event trigger watches."""
    from opensubject_tasks.services.events import pending

    return pending(context())

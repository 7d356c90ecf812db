"""Stage 1 service: probe, decode once, detect shots, write keyframes and clips.

Idempotent: clip ids are ``<video_id>-c<idx>`` and keyframe keys are
``Keys.keyframe(video, clip, frame)``; keyframes are written first, then the clip rows
and ``stage_done`` in one transaction, then keyframe objects that no row points to (left
by an interrupted run) are deleted. A re-run of a video that completed curation changes
nothing: it returns what the first run produced, so the clips that later stages built on
(and their verified samples) stay. Redoing it is an explicit recompute (services/rerun.py).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import cv2
from sqlalchemy import func, select

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Clip, Video
from opensubject_tasks.errors import BadInput, Rejected
from opensubject_tasks.media.decode import DecodeStats, iter_frames
from opensubject_tasks.media.probe import open_video
from opensubject_tasks.catalogue import follow, stage_reached
from opensubject_tasks.services.common import StageResult, already_done, stage
from opensubject_tasks.steps.clips import ClipResult, check_video, curate_frames
from opensubject_tasks.storage import Keys
from opensubject_tasks.storage.base import safe_key
from opensubject_tasks.storage.sources import local_copy, parse_source


_KEYFRAME_WRITERS = 4   # keyframes encoded and stored at once


def clip_id(video_id: str, idx: int) -> str:
    return f"{video_id}-c{idx}"


def _encode_jpeg(rgb: Any, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


@stage("curate")
def curate_video(ctx: Context, video_id: str) -> StageResult:
    s = ctx.settings.curate
    with session_scope(ctx.sessions) as db:
        video = db.get(Video, video_id)
        if video is None:
            raise BadInput(f"video {video_id} does not exist")
        source, registered = video.source_uri, (video.content_hash, video.size_bytes)
        if stage_reached(video.stage_done, "curate"):
            kept = db.scalar(select(func.count(Clip.id)).where(Clip.video_id == video_id,
                                                               Clip.state != "rejected"))
            if kept:
                return already_done("curate", f"{kept} clip(s) kept", next=follow("curate", video_id))
            return already_done("curate", "no clip kept", status="rejected",
                                reason=video.reason or "no clip kept")

    timings: dict[str, float] = {}
    written: dict[int, list[dict[str, Any]]] = {}
    # Keyframes are encoded and stored on writer threads, so that the analysis goes on
    # while they are written; a store's write mostly waits (the local store's fsync, an
    # S3 round trip), so a few run at once.
    writer = ThreadPoolExecutor(max_workers=_KEYFRAME_WRITERS, thread_name_prefix="keyframes")
    writes: list[Future[None]] = []

    writer_cpu: list[float] = []

    def put_jpeg(key: str, image: Any) -> None:
        cpu = time.thread_time()
        ctx.store.put_bytes(key, _encode_jpeg(image, s.keyframe_quality), "image/jpeg")
        writer_cpu.append(time.thread_time() - cpu)

    def writes_done() -> None:
        """Wait for every keyframe write; the first that failed raises here."""
        for f in writes:
            f.result()

    def write_keyframes(clip: ClipResult) -> None:
        """Objects first: the rows written later point only at complete objects."""
        for f in [f for f in writes if f.done()]:
            f.result()  # a failed write stops the pass now
            writes.remove(f)  # checked once: a long video's clips do not go over every write again
        cid = clip_id(video_id, clip.idx)
        entries = []
        for kf in clip.keyframes:
            assert kf.image is not None
            key = Keys.keyframe(video_id, cid, kf.frame)
            writes.append(writer.submit(put_jpeg, key, kf.image))
            h, w = kf.image.shape[:2]
            entry = {"frame": kf.frame, "key": key, "width": w, "height": h}
            # where the frame lies in the stream: the pairs' frames are decoded again from
            # there at full resolution when they are synthesized (media/frames.py)
            # (pts None: a stream without timestamps, where the frame is found by its number)
            pts, seek_pts = getattr(kf.source, "pts", None), getattr(kf.source, "seek_pts", None)
            entry["pts"] = None if pts is None else int(pts)
            if seek_pts is not None:
                entry["seek_pts"] = int(seek_pts)
            entries.append(entry)
        written[clip.idx] = entries

    check_source_unchanged(ctx, source, *registered)
    t0 = time.perf_counter()
    with local_copy(ctx.store, source) as path:
        timings["fetch_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        # the decode pass continues with the probe's open file and decoder
        video = open_video(path, s)
        probe = video.probe
        timings["probe_s"] = time.perf_counter() - t1
        stats = DecodeStats()
        try:
            with video:
                with session_scope(ctx.sessions) as db:
                    row = db.get(Video, video_id)
                    row.probe = probe.to_dict()
                check_video(probe, s)
                scorer = ctx.backend("quality")
                cpu0 = time.thread_time()
                outcome = curate_frames(iter_frames(video, probe, s, stats), probe, s, scorer,
                                        on_clip=write_keyframes, total_frames=lambda: stats.frames)
                analysis_cpu = time.thread_time() - cpu0
                writes_done()
                # this thread (scaling, shot detection, clips, keyframes) and the writer's
                # (JPEG, store); the decode has its own threads
                timings["analysis_cpu_s"] = analysis_cpu + sum(writer_cpu)
        except BadInput:
            # keyframes of clips written before the input turned out bad
            writer.shutdown(wait=True)
            _delete_stale_keyframes(ctx, video_id, set())
            raise
        finally:
            writer.shutdown(wait=True, cancel_futures=True)

    rows = [Clip(id=clip_id(video_id, c.idx), video_id=video_id, idx=c.idx, start_frame=c.start_frame,
                 end_frame=c.end_frame, start_s=c.start_s, end_s=c.end_s, score=c.score, quality=c.quality,
                 state=c.state, reason=c.reason, keyframes=written.get(c.idx, []))
            for c in outcome.clips]
    kept = [c for c in outcome.clips if c.state == "kept"]
    with session_scope(ctx.sessions) as db:
        # A video that has not completed curation has no clip rows (they are written with
        # stage_done in this one transaction, or dropped by a recompute): plain inserts.
        db.add_all(rows)
        row = db.get(Video, video_id)
        row.stage_done = "curate"
        if kept:
            row.state, row.reason = "running", None
    _delete_stale_keyframes(ctx, video_id, {e["key"] for es in written.values() for e in es})

    details = {
        "frames": outcome.frames, "decoded_frames": stats.decoded, "cuts": outcome.cuts,
        "clips": len(outcome.clips), "kept": len(kept),
        "decode_fps": round(stats.fps, 1), "decode_s": round(stats.seconds, 3),
        "decode_errors": stats.errors[:5],
        **{k: round(v, 3) for k, v in timings.items()},
    }
    if not kept:
        reasons = "; ".join(f"clip {c.idx} [{c.start_frame}-{c.end_frame}): {c.reason}" for c in outcome.clips[:8])
        raise Rejected(f"no clip kept ({len(outcome.clips)} clip(s)): {reasons}" if outcome.clips
                       else "no clip kept: no shot found")
    return StageResult(status="ok", next=follow("curate", video_id), details=details)


def check_source_unchanged(ctx: Context, source: str, content_hash: str, size: int) -> None:
    """The bytes at the source must still be the ones registered: an object overwritten at
    the same key is registered as another video, not processed under this one's id."""
    src = parse_source(source)
    if src.kind == "store" and ":" in content_hash:  # registered by the store's etag:size
        try:
            info = ctx.store.stat(src.key)
        except FileNotFoundError:
            return  # local_copy says it is missing
        if f"{info.etag}:{info.size}" != content_hash:
            raise BadInput(f"the object at {source} changed since it was registered (now etag {info.etag}, "
                           f"{info.size} bytes): its new version is registered as another video")
    elif src.path is not None and src.path.is_file() and size and src.path.stat().st_size != size:
        raise BadInput(f"the file {src.path} changed since it was registered ({size} -> "
                       f"{src.path.stat().st_size} bytes): register it again")


def _delete_stale_keyframes(ctx: Context, video_id: str, live: set[str]) -> None:
    prefix = safe_key("videos", video_id, "clips") + "/"
    for info in list(ctx.store.list(prefix)):
        if "/frames/" in info.key and info.key not in live:
            ctx.store.delete(info.key)

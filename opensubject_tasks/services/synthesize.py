"""Stage 3 service: synthesize samples' images for their current attempts (one sample, or
a batch of one video's samples with each model called once).

Objects first, then the row pointing at them. Keys hold the attempt
(``videos/<video>/samples/<sample>/a<attempt>/<name>.png``) and the images depend only
on (seed, attempt), so a re-run rewrites the same bytes under the same keys and leaves
one row: nothing is duplicated.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from sqlalchemy import select

from opensubject_tasks.catalogue import SAMPLE_IMAGES, SAMPLE_MASKS, SAMPLE_TERMINAL, follow
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.lineage import lineage
from opensubject_tasks.db.models import Clip, Pair, Sample, Subject, Video
from opensubject_tasks.errors import BadInput
from opensubject_tasks.media.frames import FramePosition, decode_frames
from opensubject_tasks.services.common import StageResult, one_sample, stage
from opensubject_tasks.services.curate import check_source_unchanged
from opensubject_tasks.services.mine import decode_rgb
from opensubject_tasks.steps.pair_inputs import PairInput, SynthResult, synthesize_pairs
from opensubject_tasks.storage import Keys
from opensubject_tasks.storage.sources import local_copy


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB image or a bool mask (0/255). Same pixels, same bytes."""
    if image.dtype == bool:
        arr = image.astype(np.uint8) * 255
    else:
        arr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _keyframe(keyframes: list[dict], frame: int, clip_id: str) -> dict:
    for kf in keyframes:
        if int(kf["frame"]) == int(frame):
            return kf
    raise BadInput(f"clip {clip_id} has no keyframe {frame}")


def _from_video(ctx: Context, kf: dict) -> bool:
    """Whether a pair's frame is decoded again from the video (at full resolution): where
    curation recorded the frame's place in the stream (``pts``, None for a stream without
    timestamps). Otherwise it is read from the store: the lossless frame an earlier
    curation stored (``full_key``), or the small keyframe (``curate.frame_max_side`` 0,
    or rows of a curation that kept neither)."""
    return bool(ctx.settings.curate.frame_max_side) and not kf.get("full_key") and "pts" in kf


def load_frame(ctx: Context, keyframes: list[dict], frame: int, clip_id: str,
               decoded: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """A pair's frame for synthesis, with the scale from keyframe pixels (where mining's
    boxes are) to the returned image's pixels: the full-resolution picture decoded from
    the video (``decoded``, by frame number), else the stored frame or keyframe."""
    kf = _keyframe(keyframes, frame, clip_id)
    if _from_video(ctx, kf):
        if decoded is None or int(frame) not in decoded:
            raise BadInput(f"clip {clip_id}: frame {frame} was not decoded from the video")
        image, source = decoded[int(frame)], "video"
    else:
        key = kf.get("full_key") or kf["key"]
        image = decode_rgb(_get(ctx, key), f"frame {frame}")
        source = "full" if kf.get("full_key") else "keyframe"
    h, w = image.shape[:2]
    scale = [w / kf["width"], h / kf["height"]] if kf.get("width") and kf.get("height") else [1.0, 1.0]
    return image, {"source": source, "size": [w, h], "scale": [round(v, 6) for v in scale]}


def decode_pair_frames(ctx: Context, jobs: list[_Job]) -> dict[str, dict[int, np.ndarray] | BadInput]:
    """The full-resolution pictures of the jobs' frames that come from their videos, by
    video and frame number: each video opened once, only these frames decoded
    (media/frames.py). A video that cannot give them maps to the reason."""
    wanted: dict[str, set[FramePosition]] = {}
    sources: dict[str, tuple[str, str, int]] = {}
    for job in jobs:
        for frame in (job.ref_frame, job.tgt_frame):
            try:
                kf = _keyframe(job.keyframes, frame, job.clip_id)
            except BadInput:
                continue  # reported by load_frame for this job
            if _from_video(ctx, kf):
                wanted.setdefault(job.video_id, set()).add(FramePosition.of(kf))
                sources[job.video_id] = job.source
    out: dict[str, dict[int, np.ndarray] | BadInput] = {}
    for video_id, positions in wanted.items():
        uri, content_hash, size = sources[video_id]
        try:
            check_source_unchanged(ctx, uri, content_hash, size)
            with local_copy(ctx.store, uri) as path:
                out[video_id] = decode_frames(path, positions, ctx.settings.curate)
        except BadInput as exc:  # the video is gone, changed or does not decode
            out[video_id] = BadInput(f"the pair's frames cannot be decoded from the video: {exc}")
    return out


def _scaled(box: list[float], scale: list[float]) -> list[float]:
    return [box[0] * scale[0], box[1] * scale[1], box[2] * scale[0], box[3] * scale[1]]


@dataclass
class _Job:
    sample_id: str
    attempt: int
    seed: int
    video_id: str
    keyframes: list[dict]
    clip_id: str
    ref_frame: int
    tgt_frame: int
    ref_box: list[float]
    tgt_box: list[float]
    category: str
    wanted: dict[str, str]
    source: tuple[str, str, int]   # the video's source URI, content hash and size as registered


@stage("synthesize")
def synthesize_sample(ctx: Context, sample_id: str) -> StageResult:
    return one_sample(synthesize_samples, ctx, sample_id)


def synthesize_samples(ctx: Context, sample_ids: list[str]) -> dict[str, StageResult | BadInput]:
    """Synthesize the current attempt of each sample, the models called once for the batch
    (steps/pair_inputs.py ``synthesize_pairs``); each sample's outcome, bad input included."""
    outcomes: dict[str, StageResult | BadInput] = {}
    jobs: list[_Job] = []
    for sid in sample_ids:
        try:
            job = _job(ctx, sid)
        except BadInput as exc:
            outcomes[sid] = exc
            continue
        if isinstance(job, StageResult):
            outcomes[sid] = job
        else:
            jobs.append(job)
    frames: dict[tuple[str, int], tuple[np.ndarray, dict]] = {}   # a frame shared by pairs is read once
    decoded = decode_pair_frames(ctx, jobs)
    inputs, ready = [], []
    for job in jobs:
        try:
            from_video = decoded.get(job.video_id)
            if isinstance(from_video, BadInput):
                raise from_video
            ref, ref_info = _frame(ctx, frames, job, job.ref_frame, from_video)
            tgt, tgt_info = _frame(ctx, frames, job, job.tgt_frame, from_video)
        except BadInput as exc:
            outcomes[job.sample_id] = exc
            continue
        inputs.append(PairInput(ref, _scaled(job.ref_box, ref_info["scale"]), tgt, _scaled(job.tgt_box, tgt_info["scale"]),
                                job.seed, job.attempt, job.category))
        ready.append((job, ref_info, tgt_info))
    results = synthesize_pairs(inputs, segmenter=ctx.backend("segmenter"), inpainter=ctx.backend("inpainter"),
                               settings=ctx.settings.synth) if inputs else []
    for (job, ref_info, tgt_info), result in zip(ready, results, strict=True):
        if isinstance(result, BadInput):
            outcomes[job.sample_id] = result
            continue
        result.augment["frames"] = {"reference": ref_info, "target": tgt_info}
        outcomes[job.sample_id] = _store(ctx, job, result)
    return outcomes


def _job(ctx: Context, sample_id: str) -> _Job | StageResult:
    """What synthesizing a sample's current attempt needs, or the result of a sample with
    nothing to synthesize."""
    with session_scope(ctx.sessions) as s:
        row = s.get(Sample, sample_id)
        if row is None:
            raise BadInput(f"sample {sample_id} does not exist")
        found = s.execute(
            lineage(select(Pair, Subject, Clip, Video.source_uri, Video.content_hash, Video.size_bytes), Pair)
            .where(Pair.id == row.pair_id)).first()
        if found is None:
            raise BadInput(f"sample {sample_id}: its pair {row.pair_id} does not exist")
        pair, subject, clip, *source = found
        state, attempt, seed, keys = row.state, row.attempt, row.seed, dict(row.keys or {})
        job = _Job(sample_id, attempt, seed, clip.video_id, list(clip.keyframes or []), clip.id,
                   pair.ref_frame, pair.tgt_frame, list(pair.ref_box), list(pair.tgt_box), subject.category,
                   {n: Keys.sample_file(clip.video_id, sample_id, attempt, f"{n}.png") for n in SAMPLE_IMAGES},
                   (source[0], source[1], source[2] or 0))
    if state in SAMPLE_TERMINAL:
        return StageResult(details={"skipped": f"already {state}"})
    if state == "synthesized" and keys == job.wanted:
        return StageResult(next=follow("synthesize", sample_id), details={"skipped": f"attempt {attempt} done"})
    return job


def _frame(ctx: Context, cache: dict, job: _Job, frame: int,
           decoded: dict[int, np.ndarray] | None) -> tuple[np.ndarray, dict]:
    key = (job.clip_id, int(frame))
    if key not in cache:
        cache[key] = load_frame(ctx, job.keyframes, frame, job.clip_id, decoded)
    return cache[key]


def _store(ctx: Context, job: _Job, result: SynthResult) -> StageResult:
    """Objects first, then the row pointing at them."""
    for name in SAMPLE_IMAGES:
        image = result.images[name]
        if name in SAMPLE_MASKS:
            image = image.astype(bool)
        ctx.store.put_bytes(job.wanted[name], encode_png(image), "image/png")
    with session_scope(ctx.sessions) as s:
        row = s.get(Sample, job.sample_id, with_for_update=True)
        if row is None or row.attempt != job.attempt or row.state in SAMPLE_TERMINAL:
            # the sample moved on while this attempt was drawn: its objects are harmless
            return StageResult(details={"skipped": "sample changed during synthesis"})
        row.keys = job.wanted
        row.augment = result.augment
        row.backends = {**(row.backends or {}), **result.backends}
        row.state, row.reason = "synthesized", None
    return StageResult(next=follow("synthesize", job.sample_id),
                       details={"attempt": job.attempt, "seed": job.seed, "backends": result.backends})


def _get(ctx: Context, key: str) -> bytes:
    try:
        return ctx.store.get_bytes(key)
    except FileNotFoundError as exc:
        raise BadInput(f"frame {key} is missing from the store") from exc

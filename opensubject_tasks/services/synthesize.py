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

from opensubject_tasks.catalogue import SAMPLE_IMAGES, SAMPLE_MASKS, SAMPLE_TERMINAL
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Clip, Pair, Sample, Subject
from opensubject_tasks.errors import BadInput
from opensubject_tasks.services.common import StageResult, one_sample, stage
from opensubject_tasks.services.mine import decode_rgb
from opensubject_tasks.stages.synthesize import PairInput, SynthResult, synthesize_pairs
from opensubject_tasks.storage import Keys



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


def load_frame(ctx: Context, keyframes: list[dict], frame: int, clip_id: str) -> tuple[np.ndarray, dict]:
    """A pair's frame for synthesis: the lossless full-resolution frame where curate
    stored one, else the keyframe; with the scale from keyframe pixels (where mining's
    boxes are) to the returned image's pixels."""
    kf = _keyframe(keyframes, frame, clip_id)
    key = kf.get("full_key") or kf["key"]
    image = decode_rgb(_get(ctx, key), f"frame {frame}")
    h, w = image.shape[:2]
    scale = [w / kf["width"], h / kf["height"]] if kf.get("width") and kf.get("height") else [1.0, 1.0]
    return image, {"source": "full" if kf.get("full_key") else "keyframe", "size": [w, h],
                   "scale": [round(v, 6) for v in scale]}


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


@stage("synthesize")
def synthesize_sample(ctx: Context, sample_id: str) -> StageResult:
    return one_sample(synthesize_samples, ctx, sample_id)


def synthesize_samples(ctx: Context, sample_ids: list[str]) -> dict[str, StageResult | BadInput]:
    """Synthesize the current attempt of each sample, the models called once for the batch
    (stages/synthesize.py ``synthesize_pairs``); each sample's outcome, bad input included."""
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
    inputs, ready = [], []
    for job in jobs:
        try:
            ref, ref_info = _frame(ctx, frames, job, job.ref_frame)
            tgt, tgt_info = _frame(ctx, frames, job, job.tgt_frame)
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
            select(Pair, Subject, Clip).join(Subject, Pair.subject_id == Subject.id)
            .join(Clip, Subject.clip_id == Clip.id).where(Pair.id == row.pair_id)).first()
        if found is None:
            raise BadInput(f"sample {sample_id}: its pair {row.pair_id} does not exist")
        pair, subject, clip = found
        state, attempt, seed, keys = row.state, row.attempt, row.seed, dict(row.keys or {})
        job = _Job(sample_id, attempt, seed, clip.video_id, list(clip.keyframes or []), clip.id,
                   pair.ref_frame, pair.tgt_frame, list(pair.ref_box), list(pair.tgt_box), subject.category,
                   {n: Keys.sample_file(clip.video_id, sample_id, attempt, f"{n}.png") for n in SAMPLE_IMAGES})
    if state in SAMPLE_TERMINAL:
        return StageResult(details={"skipped": f"already {state}"})
    if state == "synthesized" and keys == job.wanted:
        return StageResult(next=[("verify", sample_id)], details={"skipped": f"attempt {attempt} done"})
    return job


def _frame(ctx: Context, cache: dict, job: _Job, frame: int) -> tuple[np.ndarray, dict]:
    key = (job.clip_id, int(frame))
    if key not in cache:
        cache[key] = load_frame(ctx, job.keyframes, frame, job.clip_id)
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
    return StageResult(next=[("verify", job.sample_id)],
                       details={"attempt": job.attempt, "seed": job.seed, "backends": result.backends})


def _get(ctx: Context, key: str) -> bytes:
    try:
        return ctx.store.get_bytes(key)
    except FileNotFoundError as exc:
        raise BadInput(f"frame {key} is missing from the store") from exc

"""Stage 3 service: synthesize one sample's images for its current attempt.

Objects first, then the row pointing at them. Keys hold the attempt
(``videos/<video>/samples/<sample>/a<attempt>/<name>.png``) and the images depend only
on (seed, attempt), so a re-run rewrites the same bytes under the same keys and leaves
one row: nothing is duplicated.
"""
from __future__ import annotations

import cv2
import numpy as np
from sqlalchemy import select

from opensubject_tasks.catalogue import SAMPLE_IMAGES, SAMPLE_MASKS, SAMPLE_TERMINAL
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Clip, Pair, Sample, Subject
from opensubject_tasks.errors import BadInput
from opensubject_tasks.services.common import StageResult, stage
from opensubject_tasks.services.mine import decode_rgb
from opensubject_tasks.stages.synthesize import synthesize_pair
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


@stage("synthesize")
def synthesize_sample(ctx: Context, sample_id: str) -> StageResult:
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
        video_id, clip_id, keyframes = clip.video_id, clip.id, list(clip.keyframes or [])
        ref_frame, tgt_frame = pair.ref_frame, pair.tgt_frame
        ref_box, tgt_box, category = list(pair.ref_box), list(pair.tgt_box), subject.category
    if state in SAMPLE_TERMINAL:
        return StageResult(details={"skipped": f"already {state}"})
    wanted = {n: Keys.sample_file(video_id, sample_id, attempt, f"{n}.png") for n in SAMPLE_IMAGES}
    if state == "synthesized" and keys == wanted:
        return StageResult(next=[("verify", sample_id)], details={"skipped": f"attempt {attempt} done"})

    ref, ref_info = load_frame(ctx, keyframes, ref_frame, clip_id)
    tgt, tgt_info = load_frame(ctx, keyframes, tgt_frame, clip_id)
    result = synthesize_pair(ref, _scaled(ref_box, ref_info["scale"]), tgt, _scaled(tgt_box, tgt_info["scale"]),
                             seed=seed, attempt=attempt,
                             segmenter=ctx.backend("segmenter"), inpainter=ctx.backend("inpainter"),
                             settings=ctx.settings.synth, category=category)
    result.augment["frames"] = {"reference": ref_info, "target": tgt_info}
    for name in SAMPLE_IMAGES:
        image = result.images[name]
        if name in SAMPLE_MASKS:
            image = image.astype(bool)
        ctx.store.put_bytes(wanted[name], encode_png(image), "image/png")

    with session_scope(ctx.sessions) as s:
        row = s.get(Sample, sample_id, with_for_update=True)
        if row is None or row.attempt != attempt or row.state in SAMPLE_TERMINAL:
            # the sample moved on while this attempt was drawn: its objects are harmless
            return StageResult(details={"skipped": "sample changed during synthesis"})
        row.keys = wanted
        row.augment = result.augment
        row.backends = {**(row.backends or {}), **result.backends}
        row.state, row.reason = "synthesized", None
    return StageResult(next=[("verify", sample_id)],
                       details={"attempt": attempt, "seed": seed, "backends": result.backends})


def _get(ctx: Context, key: str) -> bytes:
    try:
        return ctx.store.get_bytes(key)
    except FileNotFoundError as exc:
        raise BadInput(f"frame {key} is missing from the store") from exc

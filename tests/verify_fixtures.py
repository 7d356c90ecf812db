"""Constructed samples whose verdict is known, and db/store rows for them.

A sample is built the way stage 3 builds one, from real photographs (scikit-image):
a subject (an elliptical cut-out of a photo) in a reference frame and, elsewhere, in a
target frame over a scene photo; the generation input is the subject mirrored, its
mask eroded, on a fresh canvas outpainted with OpenCV; the manipulation input is the
target with the subject's box inpainted. Variants break one property on purpose.
"""
from __future__ import annotations

import functools
import hashlib
import io
from typing import Any

import cv2
import numpy as np
from PIL import Image
from skimage import data

from opensubject_tasks.backends.base import Verdict
from opensubject_tasks.backends.classical.verifier import ClassicalVerifier
from opensubject_tasks.backends.registry import register
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.models import Build, Clip, Pair, Sample, Subject, Video
from opensubject_tasks.steps.verdict import sample_seed
from opensubject_tasks.storage import Keys

SIZE = 256
SUBJECT_HW = (100, 110)
REF_AT = (20, 30)      # x, y of the subject in the reference frame
TGT_AT = (120, 110)    # x, y of the subject in the target frame
GEN_AT = (60, 70)


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def subject_photo(name: str) -> np.ndarray:
    h, w = SUBJECT_HW
    crops = {"cat": lambda: data.chelsea()[40:260, 100:360],
             "astronaut": lambda: data.astronaut()[20:220, 150:330],
             "coffee": lambda: data.coffee()[20:380, 100:500],
             "rocket": lambda: data.rocket()[50:400, 150:350]}
    return _resize(np.ascontiguousarray(crops[name]()), w, h)


def scene_photo(name: str) -> np.ndarray:
    grey = {"brick": data.brick, "grass": data.grass}
    if name in grey:
        return _resize(np.dstack([grey[name]()] * 3), SIZE, SIZE)
    return _resize({"coffee": data.coffee, "hubble": data.hubble_deep_field}[name](), SIZE, SIZE)


def ellipse_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (w // 2, h // 2), (int(w * 0.45), int(h * 0.45)), 0, 0, 360, 1, -1)
    return m.astype(bool)


def _paste(bg: np.ndarray, subj: np.ndarray, mask: np.ndarray, x: int, y: int) -> np.ndarray:
    out = bg.copy()
    h, w = mask.shape
    out[y:y + h, x:x + w][mask] = subj[mask]
    return out


# the subject's box in the target frame, as the pair row holds it
TGT_BOX = [float(TGT_AT[0]), float(TGT_AT[1]), float(TGT_AT[0] + SUBJECT_HW[1]), float(TGT_AT[1] + SUBJECT_HW[0])]


def make_images(subject: str = "cat", scene: str = "brick", generation_subject: str | None = None,
                keep_subject: bool = False, target_subject: str | None = None) -> dict[str, np.ndarray]:
    """The seven images of one sample (RGB uint8 / bool masks), fresh copies.

    ``generation_subject``: put a different subject into the generation input
    (identity must fail). ``keep_subject``: leave the target's box untouched in the
    manipulation input (residual must fail). ``target_subject``: the target frame shows
    another individual than the reference (a wrongly linked pair: same individual must fail).
    """
    made = _make_images(subject, scene, generation_subject, keep_subject, target_subject)
    return {k: v.copy() for k, v in made.items()}


def make_sample(category: str = "cat", **variant: Any) -> dict[str, Any]:
    """A sample as the verify service hands it over: the images plus its metadata."""
    return make_images(**variant) | {"tgt_box": list(TGT_BOX), "category": category}


@functools.lru_cache(maxsize=64)
def _make_images(subject: str, scene: str, generation_subject: str | None,
                 keep_subject: bool, target_subject: str | None = None) -> dict[str, np.ndarray]:
    subj, m = subject_photo(subject), ellipse_mask(*SUBJECT_HW)
    bg = scene_photo(scene)
    h, w = SUBJECT_HW
    rx, ry = REF_AT
    ref_frame = _paste(bg, subj, m, rx, ry)
    reference = ref_frame[ry:ry + h, rx:rx + w].copy()        # the subject crop, with its background
    target = _paste(bg, subject_photo(target_subject) if target_subject else subj, m, *TGT_AT)
    box = np.zeros((SIZE, SIZE), bool)
    box[TGT_AT[1]:TGT_AT[1] + h, TGT_AT[0]:TGT_AT[0] + w] = True
    manipulation = target.copy() if keep_subject else cv2.inpaint(target, box.astype(np.uint8), 5,
                                                                     cv2.INPAINT_TELEA)
    gsub = subject_photo(generation_subject or subject)[:, ::-1].copy()     # geometry: mirrored
    gm = cv2.erode(m[:, ::-1].astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)  # eroded edge
    canvas = np.zeros((SIZE, SIZE, 3), np.uint8)
    gmask = np.zeros((SIZE, SIZE), bool)
    gx, gy = GEN_AT
    canvas[gy:gy + h, gx:gx + w][gm] = gsub[gm]
    gmask[gy:gy + h, gx:gx + w] = gm
    generation = cv2.inpaint(canvas, (~gmask).astype(np.uint8), 5, cv2.INPAINT_TELEA)  # outpainted
    return {"reference": reference, "mask": m, "generation_input": generation, "generation_mask": gmask,
            "manipulation_input": manipulation, "manipulation_mask": box, "target": target}


def png(a: np.ndarray) -> bytes:
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# -- db + store ----------------------------------------------------------------------
def prepare_db(ctx: Context, build_id: str = "b1") -> None:
    upgrade(ctx.engine)
    with session_scope(ctx.sessions) as s:
        if s.get(Build, build_id) is None:
            s.add(Build(id=build_id, params={}, profile="cpu", state="running"))


def add_video(ctx: Context, name: str, build_id: str = "b1", clip_rejected: bool = False) -> tuple[str, str]:
    """A video with one kept clip (and optionally one rejected clip); returns (video_id, clip_id)."""
    vid = hashlib.sha256(name.encode()).hexdigest()[:32]
    clip_id = f"{vid}-c0"
    with session_scope(ctx.sessions) as s:
        s.add(Video(id=vid, content_hash=hashlib.sha256(name.encode()).hexdigest(),
                    source_uri=f"file:///videos/{name}", name=name, size_bytes=1000, build_id=build_id,
                    state="running", stage_done="mine"))
        s.flush()  # parents first: the models declare no relationships to order inserts by
        s.add(Clip(id=clip_id, video_id=vid, idx=0, start_frame=0, end_frame=50, start_s=0.0, end_s=2.0,
                   score=0.8, quality={"scorer": "classical"}, state="mined",
                   keyframes=[{"frame": 0, "key": "k0", "width": SIZE, "height": SIZE},
                              {"frame": 40, "key": "k40", "width": SIZE, "height": SIZE}]))
        if clip_rejected:
            s.add(Clip(id=f"{vid}-c1", video_id=vid, idx=1, start_frame=50, end_frame=60, start_s=2.0,
                       end_s=2.4, score=0.1, state="rejected", reason="clip shorter than 1.0 s (0.4 s)"))
    return vid, clip_id


def add_sample(ctx: Context, video_id: str, clip_id: str, idx: int, images: dict[str, np.ndarray],
               category: str = "cat", build_id: str = "b1", scale: float = 1.0) -> str:
    """Subject, pair and a synthesized sample (attempt 1) with its images in the store
    (``scale``: the images were resized by that factor; the boxes follow)."""
    subject_id = f"{clip_id}-s{idx}"
    pair_id = f"{subject_id}-p0-40"
    ref_box, tgt_box = [v * scale for v in (20.0, 30.0, 130.0, 130.0)], [v * scale for v in TGT_BOX]
    with session_scope(ctx.sessions) as s:
        s.add(Subject(id=subject_id, clip_id=clip_id, idx=idx, category=category, category_source="test",
                      consensus=1.0, boxes={"0": ref_box, "40": tgt_box},
                      backends={"detector": "classical"}))
        s.flush()
        s.add(Pair(id=pair_id, subject_id=subject_id, ref_frame=0, tgt_frame=40,
                   ref_box=ref_box, tgt_box=tgt_box,
                   scores={"identity": 0.9, "diversity": 0.5}))
        s.flush()
        s.add(Sample(id=pair_id, pair_id=pair_id, build_id=build_id, state="pending", attempt=1,
                     seed=sample_seed(pair_id, 1), keys={}, backends={"inpainter": "classical"}))
    store_attempt(ctx, pair_id, images)
    return pair_id


def store_attempt(ctx: Context, sample_id: str, images: dict[str, np.ndarray]) -> None:
    """What stage 3 does for the sample's current attempt: images first, then the row."""
    with session_scope(ctx.sessions) as s:
        row = s.get(Sample, sample_id)
        video_id = sample_id.split("-c", 1)[0]
        keys = {}
        for name, arr in images.items():
            key = Keys.sample_file(video_id, sample_id, row.attempt, f"{name}.png")
            ctx.store.put_bytes(key, png(arr), content_type="image/png")
            keys[name] = key
        row.keys, row.state = keys, "synthesized"


# -- a verifier that fails every first attempt ---------------------------------------
class FailFirstAttempt:
    """The classical verifier, except that attempt 1 always fails with a stated reason:
    forces one re-synthesis per sample in pipeline tests."""

    name = "fail-first-attempt"

    def __init__(self) -> None:
        self.inner = ClassicalVerifier()

    def verify(self, samples: list[dict[str, Any]], thresholds=None, embedder=None, vlm=None) -> list[Verdict]:  # noqa: ANN001
        out = self.inner.verify(samples, thresholds=thresholds, embedder=embedder)
        for s, v in zip(samples, out, strict=True):
            if s.get("attempt") == 1:
                v.passed = False
                v.reasons = [*v.reasons, "forced: the first attempt always fails"]
        return out


@register("verifier", "fail-first-attempt")
def make_fail_first_attempt(**_options: Any) -> FailFirstAttempt:
    return FailFirstAttempt()

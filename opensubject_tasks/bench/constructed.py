"""A small build written straight into the database and store, with known geometry.

It checks the benchmark's scorers without running the pipeline: every verified
sample holds real photo content (scikit-image's bundled photos and the sample-media
cut-outs), the subject's true box in the target, a box-inpainted manipulation input
(OpenCV inpainting) and a generation input that shows the subject on another
background, away from where the target has it. Every other video is a complex scene
(two subjects in the clip).
"""
from __future__ import annotations

import hashlib
import io

import cv2
import numpy as np
from PIL import Image

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.models import Build, Clip, Pair, Sample, Subject, Video
from opensubject_tasks.testmedia.samples import BACKGROUNDS, CUTOUTS, cutout, photo
from opensubject_tasks.storage import Keys

SUBJECTS = tuple(CUTOUTS)
REF_FRAME, TGT_FRAME = 10, 40


def _background(name: str, w: int, h: int, shift: float) -> np.ndarray:
    img = photo(name)
    scale = max(w / img.shape[1], h / img.shape[0]) * 1.25
    big = cv2.resize(img, (int(img.shape[1] * scale) + 1, int(img.shape[0] * scale) + 1),
                     interpolation=cv2.INTER_AREA)
    x = int((big.shape[1] - w) * shift)
    y = int((big.shape[0] - h) * (1 - shift))
    return np.ascontiguousarray(big[y:y + h, x:x + w])


def _fit_box(name: str, cx: float, cy: float, side: float, frame: tuple[int, int]) -> list[float]:
    """The cut-out's box scaled so its longer side is ``side``, centred at (cx, cy),
    moved inside the frame."""
    rgb, _ = cutout(name)
    ch, cw = rgb.shape[:2]
    s = side / max(ch, cw)
    w, h = round(cw * s), round(ch * s)
    x0 = int(np.clip(round(cx - w / 2), 0, frame[0] - w))
    y0 = int(np.clip(round(cy - h / 2), 0, frame[1] - h))
    return [x0, y0, x0 + w, y0 + h]


def _paste(frame: np.ndarray, name: str, box: list[float]) -> np.ndarray:
    rgb, alpha = cutout(name)
    x0, y0, x1, y1 = (int(v) for v in box)
    w, h = x1 - x0, y1 - y0
    fg = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    a = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_AREA)[..., None]
    out = frame.astype(np.float32).copy()
    out[y0:y1, x0:x1] = a * fg + (1 - a) * out[y0:y1, x0:x1]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _alpha_mask(name: str, box: list[float]) -> np.ndarray:
    _, alpha = cutout(name)
    w, h = int(box[2] - box[0]), int(box[3] - box[1])
    return cv2.resize(alpha, (w, h), interpolation=cv2.INTER_AREA) > 0.5


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8) * 255 if img.dtype == bool else img).save(buf, format="PNG")
    return buf.getvalue()


def make_constructed_build(ctx: Context, build_id: str, *, videos: int = 6,
                           size: tuple[int, int] = (256, 192), seed: int = 0) -> list[str]:
    """Write ``videos`` videos, one clip each, one verified sample per subject; returns
    the sample ids. Re-running it overwrites the same rows and objects."""
    upgrade(ctx.engine)
    w, h = size
    rng = np.random.default_rng(seed)
    sample_ids: list[str] = []
    with session_scope(ctx.sessions) as s:
        s.merge(Build(id=build_id, params={"constructed": True, "videos": videos}, state="done"))
    for i in range(videos):
        digest = hashlib.sha256(f"constructed:{build_id}:{seed}:{i}".encode()).hexdigest()
        vid, clip_id = digest[:32], f"{digest[:32]}-c0"
        names = [SUBJECTS[i % len(SUBJECTS)]]
        if i % 2 == 1:
            names.append(SUBJECTS[(i + 2) % len(SUBJECTS)])
        bg = BACKGROUNDS[(3 * i + 1) % len(BACKGROUNDS)]
        other_bg = BACKGROUNDS[(3 * i + 5) % len(BACKGROUNDS)]
        left = i % 4 < 2  # where the main subject stands in the target
        side_x = (0.2 * w, 0.8 * w) if left else (0.8 * w, 0.2 * w)
        ref_boxes = [_fit_box(names[0], 0.45 * w + rng.uniform(-8, 8), 0.5 * h, 0.55 * h, size)]
        tgt_boxes = [_fit_box(names[0], side_x[0], 0.5 * h + rng.uniform(-8, 8), 0.45 * h, size)]
        if len(names) == 2:
            ref_boxes.append(_fit_box(names[1], 0.85 * w, 0.55 * h, 0.35 * h, size))
            tgt_boxes.append(_fit_box(names[1], side_x[1], 0.5 * h, 0.4 * h, size))
        ref_frame = _background(bg, w, h, 0.3)
        tgt_frame = _background(bg, w, h, 0.6)
        for name, rb, tb in zip(names, ref_boxes, tgt_boxes, strict=True):
            ref_frame = _paste(ref_frame, name, rb)
            tgt_frame = _paste(tgt_frame, name, tb)
        kf_keys = {}
        for frame, img in ((REF_FRAME, ref_frame), (TGT_FRAME, tgt_frame)):
            kf_keys[frame] = Keys.keyframe(vid, clip_id, frame)
            ctx.store.put_bytes(kf_keys[frame], cv2.imencode(".jpg", img[..., ::-1])[1].tobytes(), "image/jpeg")
        with session_scope(ctx.sessions) as s:
            s.merge(Video(id=vid, content_hash=digest, source_uri=f"constructed://{build_id}/{i}",
                          name=f"constructed_{i}.mp4", build_id=build_id, state="done", stage_done="verify",
                          probe={"width": w, "height": h, "fps": 25, "frames": 50}))
            s.merge(Clip(id=clip_id, video_id=vid, idx=0, start_frame=0, end_frame=50, start_s=0.0, end_s=2.0,
                         score=0.9, state="mined",
                         keyframes=[{"frame": f, "key": k, "width": w, "height": h} for f, k in kf_keys.items()]))
        for j, name in enumerate(names):
            subject_id = f"{clip_id}-s{j}"
            pair_id = f"{subject_id}-p{REF_FRAME}-{TGT_FRAME}"
            rb, tb = ref_boxes[j], tgt_boxes[j]
            reference = ref_frame[int(rb[1]):int(rb[3]), int(rb[0]):int(rb[2])]
            ref_mask = _alpha_mask(name, rb)
            # generation input: the subject on another background, on the far side from the target
            gcx = side_x[1] if j == 0 else side_x[0]
            x0 = int(np.clip(round(gcx - reference.shape[1] / 2), 0, w - reference.shape[1]))
            y0 = int(rb[1])
            gen_input = _background(other_bg, w, h, 0.5)
            gen_mask = np.zeros((h, w), bool)
            region = gen_input[y0:y0 + reference.shape[0], x0:x0 + reference.shape[1]]
            region[ref_mask] = reference[ref_mask]
            gen_mask[y0:y0 + reference.shape[0], x0:x0 + reference.shape[1]] = ref_mask
            box_mask = np.zeros((h, w), np.uint8)
            box_mask[int(tb[1]):int(tb[3]), int(tb[0]):int(tb[2])] = 1
            # the region is the box plus a 2-pixel margin; everything outside it is the target's
            man_mask = cv2.dilate(box_mask, np.ones((5, 5), np.uint8)) > 0
            man_input = cv2.inpaint(tgt_frame, man_mask.astype(np.uint8), 5, cv2.INPAINT_TELEA)
            images = {"reference": reference, "mask": ref_mask, "generation_input": gen_input,
                      "generation_mask": gen_mask, "manipulation_input": man_input,
                      "manipulation_mask": man_mask, "target": tgt_frame}
            keys = {}
            for key_name, img in images.items():
                keys[key_name] = Keys.sample_file(vid, pair_id, 1, f"{key_name}.png")
                ctx.store.put_bytes(keys[key_name], _png(img), "image/png")
            where = "left" if tb[0] + tb[2] < w else "right"
            with session_scope(ctx.sessions) as s:
                s.merge(Subject(id=subject_id, clip_id=clip_id, idx=j, category=CUTOUTS[name][2],
                                category_source="constructed", consensus=1.0,
                                boxes={str(REF_FRAME): rb, str(TGT_FRAME): tb}))
                s.merge(Pair(id=pair_id, subject_id=subject_id, ref_frame=REF_FRAME, tgt_frame=TGT_FRAME,
                             ref_box=rb, tgt_box=tb, scores={}))
                s.merge(Sample(id=pair_id, pair_id=pair_id, build_id=build_id, state="verified", attempt=1,
                               seed=seed * 1000 + i, keys=keys,
                               caption_short=f"a {CUTOUTS[name][2]}",
                               caption_long=f"A {CUTOUTS[name][2]} on the {where} side of the image.",
                               caption_source="template"))
            sample_ids.append(pair_id)
    return sample_ids

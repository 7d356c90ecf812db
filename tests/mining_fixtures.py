"""Synthetic keyframes with exact subject boxes, for backend and stage tests that need
a controlled situation (a tiny subject, one on the border, a full-frame one...).

A clip: a real photograph as the scene, seen by a camera that pans and zooms, with
photographic subjects (elliptical cut-outs of real photos) that move, grow and turn
independently of the camera.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import cv2
import numpy as np
from skimage import data


def _sprite(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "cat":
        img = data.chelsea()[30:270, 100:330]
    elif name == "astronaut":
        img = data.astronaut()[10:230, 140:330]
    elif name == "rocket":
        img = data.rocket()[40:420, 260:400]
    else:
        raise ValueError(name)
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (w // 2 - 2, h // 2 - 2), 0, 0, 360, 1, -1)
    return np.ascontiguousarray(img), mask.astype(bool)


@dataclass
class SubjectPath:
    sprite: str
    start: tuple[float, float]      # centre at t=0, as a share of the frame (x, y)
    end: tuple[float, float]        # centre at t=1
    height: tuple[float, float]     # sprite height as a share of the frame height, t=0 and t=1
    turn_deg: float = 10.0          # rotation reached at t=1


@dataclass
class Clip:
    frames: list[np.ndarray]
    boxes: list[dict[int, list[float]]]       # per frame: {subject index: box}
    masks: list[dict[int, np.ndarray]] = field(default_factory=list)


def make_clip(subjects: list[SubjectPath], n: int = 6, size: tuple[int, int] = (384, 288),
              pan: tuple[float, float] = (0.25, 0.1), zoom: float = 1.25,
              scene: str = "coffee") -> Clip:
    w, h = size
    bg = {"coffee": data.coffee, "hubble": data.hubble_deep_field, "astronaut": data.astronaut}[scene]()
    bg = cv2.resize(bg, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC)
    bh, bw = bg.shape[:2]
    frames, boxes, masks = [], [], []
    for k in range(n):
        t = k / max(n - 1, 1)
        # camera: a window that slides (pan) and shrinks (zoom in) over the scene
        vw = bw * 0.6 / (1 + (zoom - 1) * t)
        vh = vw * h / w
        cx = bw * (0.5 - pan[0] / 2 + pan[0] * t)
        cy = bh * (0.5 - pan[1] / 2 + pan[1] * t)
        src = np.float32([[cx - vw / 2, cy - vh / 2], [cx + vw / 2, cy - vh / 2], [cx - vw / 2, cy + vh / 2]])
        dst = np.float32([[0, 0], [w, 0], [0, h]])
        frame = cv2.warpAffine(bg, cv2.getAffineTransform(src, dst), (w, h), flags=cv2.INTER_LINEAR)
        fb, fm = {}, {}
        for i, s in enumerate(subjects):
            img, m = _sprite(s.sprite)
            sh = (s.height[0] + (s.height[1] - s.height[0]) * t) * h
            scale = sh / img.shape[0]
            px = (s.start[0] + (s.end[0] - s.start[0]) * t) * w
            py = (s.start[1] + (s.end[1] - s.start[1]) * t) * h
            a = cv2.getRotationMatrix2D((img.shape[1] / 2, img.shape[0] / 2), s.turn_deg * t, scale)
            a[:, 2] += (px - img.shape[1] / 2, py - img.shape[0] / 2)
            warped = cv2.warpAffine(img, a, (w, h), flags=cv2.INTER_LINEAR)
            wm = cv2.warpAffine(m.astype(np.float32), a, (w, h), flags=cv2.INTER_LINEAR) > 0.5
            frame[wm] = warped[wm]
            for j in list(fm):  # later subjects occlude earlier ones
                fm[j] &= ~wm
            fm[i] = wm
        for i, wm in fm.items():
            ys, xs = np.nonzero(wm)
            if len(xs):
                fb[i] = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        frames.append(frame)
        boxes.append(fb)
        masks.append(fm)
    return Clip(frames, boxes, masks)


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# Situations the tests use
ONE_CAT = [SubjectPath("cat", (0.25, 0.45), (0.7, 0.55), (0.45, 0.6))]
TWO_SUBJECTS = [SubjectPath("cat", (0.2, 0.35), (0.55, 0.4), (0.4, 0.5)),
                SubjectPath("rocket", (0.9, 0.6), (0.8, 0.55), (0.5, 0.45), turn_deg=-8)]
TINY = [SubjectPath("cat", (0.3, 0.5), (0.7, 0.5), (0.08, 0.09))]
BORDER = [SubjectPath("cat", (0.1, 0.15), (0.9, 0.15), (0.5, 0.5), turn_deg=0)]
FULL_FRAME = [SubjectPath("astronaut", (0.48, 0.5), (0.52, 0.5), (1.25, 1.3), turn_deg=2)]


# --------------------------------------------------------------------------------------
# Clips of the generated sample videos, cut and keyframed the way the curate stage
# stores them (shots between transitions, evenly spaced keyframes, JPEG, longest side
# at most keyframe_max_side), with the ground-truth boxes scaled to keyframe pixels.

@dataclass
class GTClip:
    video: str
    idx: int
    start: int                                  # first frame (inclusive)
    end: int                                    # last frame (exclusive)
    frame_numbers: list[int]
    frames: list[np.ndarray]                    # RGB keyframes
    boxes: dict[int, dict[int, list[float]]]    # track -> {frame number: box in keyframe pixels}
    categories: dict[int, str]
    jpegs: list[bytes] = field(default_factory=list)  # the keyframes as stored


def shot_spans(video: dict) -> list[tuple[int, int]]:
    """[start, end) of each shot, dissolve frames left out."""
    bounds = [(c, c) for c in video["cuts"]] + [(a, b + 1) for a, b in video["gradual"]]
    spans, pos = [], 0
    for a, b in sorted(bounds):
        spans.append((pos, a))
        pos = b
    spans.append((pos, video["frames"]))
    return [s for s in spans if s[1] - s[0] > 0]


def decode(path, wanted: set[int]) -> dict[int, np.ndarray]:
    import av

    out = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if len(out) == len(wanted):
                break
    return out


def keyframe_numbers(start: int, end: int, n: int) -> list[int]:
    margin = min(2, max(0, (end - start - n) // 2))
    return sorted({int(round(v)) for v in np.linspace(start + margin, end - 1 - margin, n)})


def gt_clips(media_dir, keyframes: int = 6, max_side: int = 768, jpeg_quality: int = 90) -> list[GTClip]:
    """The clips of the sample videos in ``media_dir`` (decoded once per process; the
    frames are read-only, so no test can change what another one sees)."""
    from pathlib import Path

    return _gt_clips(str(Path(media_dir).resolve()), keyframes, max_side, jpeg_quality)


@functools.lru_cache(maxsize=4)
def _gt_clips(media_dir: str, keyframes: int, max_side: int, jpeg_quality: int) -> list[GTClip]:
    import json
    from pathlib import Path

    media_dir = Path(media_dir)
    gt = json.loads((media_dir / "ground_truth.json").read_text())
    clips = []
    for video in gt["videos"]:
        if video.get("bad"):
            continue
        spans = shot_spans(video)
        numbers = [keyframe_numbers(a, b, keyframes) for a, b in spans]
        frames = decode(media_dir / video["file"], {f for ns in numbers for f in ns})
        scale = min(1.0, max_side / max(video["width"], video["height"]))
        for idx, ((a, b), ns) in enumerate(zip(spans, numbers, strict=True)):
            imgs, jpegs = [], []
            for f in ns:
                img = frames[f]
                if scale < 1:
                    img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                img = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                img.flags.writeable = False
                imgs.append(img)
                jpegs.append(buf.tobytes())
            boxes, cats = {}, {}
            for s in video["subjects"]:
                got = {f: [v * scale for v in s["boxes"][str(f)]] for f in ns if str(f) in s["boxes"]}
                if got:
                    boxes[s["track"]] = got
                    cats[s["track"]] = s["category"]
            clips.append(GTClip(video["file"], idx, a, b, ns, imgs, boxes, cats, jpegs))
    return clips


def seed_video(ctx, clips: list[GTClip], build_id: str = "test-build") -> str:
    """Rows and stored keyframes as the curate stage leaves them for one video's clips:
    a build, the video, its clips (state kept) with keyframes in the store. Returns the
    video id."""
    import hashlib

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Build, Clip as ClipRow, Video
    from opensubject_tasks.storage import Keys

    name = clips[0].video
    video_id = hashlib.sha256(name.encode()).hexdigest()[:32]
    with session_scope(ctx.sessions) as s:
        if s.get(Build, build_id) is None:
            s.add(Build(id=build_id))
            s.flush()
        s.add(Video(id=video_id, content_hash=video_id, source_uri=f"file:///media/{name}", name=name,
                    build_id=build_id, state="running", stage_done="curate"))
        s.flush()
        for c in clips:
            clip_id = f"{video_id}-c{c.idx}"
            kfs = []
            for f, jpeg, img in zip(c.frame_numbers, c.jpegs, c.frames, strict=True):
                key = Keys.keyframe(video_id, clip_id, f)
                ctx.store.put_bytes(key, jpeg, "image/jpeg")
                kfs.append({"frame": f, "key": key, "width": img.shape[1], "height": img.shape[0]})
            s.add(ClipRow(id=clip_id, video_id=video_id, idx=c.idx, start_frame=c.start, end_frame=c.end,
                          start_s=c.start / 25, end_s=c.end / 25, score=0.8, state="kept", keyframes=kfs))
    return video_id

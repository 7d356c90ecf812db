"""Sample media with ground truth, made from the real photos scikit-image ships.

Each video is a list of shots. A shot is a camera path (pan/zoom) over a background
photo plus foreground subjects (soft-masked cut-outs of real photo objects) that
move, scale, rotate and turn (mirror). Shots are joined by hard cuts or dissolves.
Everything is drawn in numpy/OpenCV and encoded with libx264 through PyAV, so the
ground truth (cut frames, dissolve spans, per-frame subject boxes) is exact.

Parameters are drawn from a seeded generator: the same seed gives the same content.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable, Iterable

import av
import cv2
import numpy as np

FPS = 25
# 480p: the sample videos pass the default resolution filter (curate.min_short_side 480)
SAMPLE_SIZE = (854, 480)

# Cut-outs: (photo, crop box x0, y0, x1, y1 in the photo, category). The crop holds
# the object; an elliptical soft mask inside it makes the cut-out.
CUTOUTS: dict[str, tuple[str, tuple[int, int, int, int], str]] = {
    "cat": ("chelsea", (80, 5, 380, 300), "cat"),
    "person": ("astronaut", (40, 5, 290, 330), "person"),
    "cup": ("coffee", (150, 10, 480, 370), "cup"),
    "rocket": ("rocket", (285, 95, 360, 415), "rocket"),
    "motorcycle": ("motorcycle", (100, 120, 690, 470), "motorcycle"),
}

BACKGROUNDS = ("hubble", "brick", "moon", "astronaut", "gravel", "coins", "coffee", "grass",
               "camera", "rocket", "motorcycle", "chelsea", "retina", "clock")


@cache
def photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as RGB uint8."""
    from skimage import data

    loaders: dict[str, Callable[[], np.ndarray]] = {
        "hubble": data.hubble_deep_field,
        "motorcycle": lambda: data.stereo_motorcycle()[0],
    }
    img = loaders.get(name, getattr(data, name, None))
    if img is None:
        raise KeyError(f"unknown photo {name!r}")
    arr = np.asarray(img())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


@cache
def cutout(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB float32, alpha float32 in 0..1) of a subject cut-out with a soft edge."""
    src, (x0, y0, x1, y1), _ = CUTOUTS[name]
    rgb = photo(src)[y0:y1, x0:x1].astype(np.float32)
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = ((xx - (w - 1) / 2) / (w / 2)) ** 2 + ((yy - (h - 1) / 2) / (h / 2)) ** 2
    # 1 inside, 0 outside the ellipse, with a feathered ring (a soft matte, not a hard edge)
    alpha = np.clip((1.0 - r) / 0.18, 0.0, 1.0).astype(np.float32)
    return rgb, alpha


@dataclass
class SubjectPath:
    name: str
    track: int
    p0: tuple[float, float]          # centre at shot start, frame-relative (0..1)
    p1: tuple[float, float]          # centre at shot end
    s0: float                        # cut-out height as a share of frame height
    s1: float
    r0: float = 0.0                  # rotation in degrees
    r1: float = 0.0
    flip_at: float | None = None     # shot-relative time (0..1) at which it turns around
    bend: float = 0.0                # sideways bow of the path (share of frame)


@dataclass
class Shot:
    background: str
    frames: int
    cam0: tuple[float, float, float]  # camera centre x, y (0..1 of the photo), zoom
    cam1: tuple[float, float, float]
    subjects: list[SubjectPath] = field(default_factory=list)
    transition_in: str = "cut"        # how this shot starts: cut | dissolve
    dissolve: int = 0                 # frames of overlap with the previous shot
    noise: float = 0.0                # sensor noise sigma (grey levels)
    light: tuple[float, float] = (1.0, 1.0)  # exposure ramp over the shot
    shake: float = 0.0                # hand-held jitter (share of view)


@dataclass
class VideoSpec:
    name: str
    kind: str
    shots: list[Shot]


def _ease(t: float) -> float:
    return 0.5 - 0.5 * math.cos(math.pi * t)


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _render_background(bg: np.ndarray, size: tuple[int, int], cx: float, cy: float,
                       zoom: float) -> np.ndarray:
    """The camera's view: a window of the photo centred at (cx, cy), zoom >= 1."""
    w, h = size
    bh, bw = bg.shape[:2]
    base = max(w / bw, h / bh)            # photo covers the frame at zoom 1
    s = base * zoom
    view_w, view_h = w / s, h / s
    # keep the window inside the photo so no border is ever shown
    cxp = float(np.clip(cx * bw, view_w / 2, bw - view_w / 2))
    cyp = float(np.clip(cy * bh, view_h / 2, bh - view_h / 2))
    m = np.array([[1 / s, 0, cxp - (w / 2) / s], [0, 1 / s, cyp - (h / 2) / s]], np.float64)
    return cv2.warpAffine(bg, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT).astype(np.float32)


def _paste(frame: np.ndarray, sp: SubjectPath, t: float) -> list[float] | None:
    """Composite one subject at shot time t; returns its box (alpha > 0.5) or None."""
    h, w = frame.shape[:2]
    rgb, alpha = cutout(sp.name)
    ch, cw = alpha.shape
    te = _ease(t)
    px = _lerp(sp.p0[0], sp.p1[0], te) + sp.bend * math.sin(math.pi * t)
    py = _lerp(sp.p0[1], sp.p1[1], te) - 0.5 * sp.bend * math.sin(2 * math.pi * t)
    scale = _lerp(sp.s0, sp.s1, te) * h / ch
    angle = math.radians(_lerp(sp.r0, sp.r1, te))
    mirror = -1.0 if (sp.flip_at is not None and t >= sp.flip_at) else 1.0
    ca, sa = math.cos(angle) * scale, math.sin(angle) * scale
    # frame = T(centre) . R(angle) . S(scale) . Mirror . T(-cut-out centre)
    a = np.array([[ca * mirror, -sa], [sa * mirror, ca]])
    c = np.array([(cw - 1) / 2, (ch - 1) / 2])
    m = np.hstack([a, (np.array([px * w, py * h]) - a @ c)[:, None]])
    # warp only the region the cut-out can cover
    corners = np.array([[0, 0], [cw, 0], [0, ch], [cw, ch]], np.float64) @ a.T + m[:, 2]
    x0, y0 = max(int(corners[:, 0].min()) - 2, 0), max(int(corners[:, 1].min()) - 2, 0)
    x1, y1 = min(int(corners[:, 0].max()) + 3, w), min(int(corners[:, 1].max()) + 3, h)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return None
    m_local = m.copy()
    m_local[:, 2] -= (x0, y0)
    wa = cv2.warpAffine(alpha, m_local, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderValue=0)
    ys, xs = np.nonzero(wa > 0.5)
    if len(xs) < 16:
        return None
    wr = cv2.warpAffine(rgb, m_local, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
    sub_a = wa[:, :, None]
    frame[y0:y1, x0:x1] += (wr - frame[y0:y1, x0:x1]) * sub_a
    xs, ys = xs + x0, ys + y0
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _render_shot_frame(shot: Shot, k: int, size: tuple[int, int],
                       rng: np.random.Generator) -> tuple[np.ndarray, dict[int, list[float]]]:
    t = k / max(shot.frames - 1, 1)
    te = _ease(t)
    cx = _lerp(shot.cam0[0], shot.cam1[0], te)
    cy = _lerp(shot.cam0[1], shot.cam1[1], te)
    zoom = _lerp(shot.cam0[2], shot.cam1[2], te)
    if shot.shake:
        cx += shot.shake * rng.normal()
        cy += shot.shake * rng.normal()
    frame = _render_background(photo(shot.background), size, cx, cy, zoom)
    boxes = {}
    for sp in shot.subjects:
        box = _paste(frame, sp, t)
        if box is not None:
            boxes[sp.track] = box
    gain = _lerp(shot.light[0], shot.light[1], t)
    if gain != 1.0:
        frame *= gain
    if shot.noise:
        frame += rng.standard_normal(frame.shape, dtype=np.float32) * np.float32(shot.noise)
    return frame, boxes


def render(spec: VideoSpec, size: tuple[int, int], seed: int) -> Iterable[tuple[np.ndarray, dict[int, list[float]]]]:
    """Yield (RGB uint8 frame, {track: box}) for every frame of the video."""
    rng = np.random.default_rng(seed)
    starts = _shot_starts(spec)
    total = _total_frames(spec)
    for f in range(total):
        live = [(i, f - s) for i, s in enumerate(starts) if 0 <= f - s < spec.shots[i].frames]
        parts = []
        for i, k in live:
            img, boxes = _render_shot_frame(spec.shots[i], k, size, rng)
            parts.append((i, k, img, boxes))
        if len(parts) == 1:
            _, _, img, boxes = parts[0]
        else:  # inside a dissolve: previous shot fades out, next fades in
            (_, _, a, ba), (j, kb, b, bb) = parts[0], parts[-1]
            n = spec.shots[j].dissolve
            wb = (kb + 1) / (n + 1)
            img = a * (1 - wb) + b * wb
            boxes = bb if wb >= 0.5 else ba
        yield np.clip(img + 0.5, 0, 255).astype(np.uint8), boxes


def _shot_starts(spec: VideoSpec) -> list[int]:
    starts, pos = [], 0
    for i, shot in enumerate(spec.shots):
        if i and shot.transition_in == "dissolve":
            pos -= shot.dissolve
        starts.append(pos)
        pos += shot.frames
    return starts


def _total_frames(spec: VideoSpec) -> int:
    starts = _shot_starts(spec)
    return starts[-1] + spec.shots[-1].frames


def ground_truth(spec: VideoSpec, size: tuple[int, int], boxes_per_frame: list[dict[int, list[float]]]) -> dict:
    starts = _shot_starts(spec)
    cuts, gradual = [], []
    for i, shot in enumerate(spec.shots[1:], start=1):
        if shot.transition_in == "dissolve":
            gradual.append([starts[i], starts[i] + shot.dissolve - 1])
        else:
            cuts.append(starts[i])
    categories = {sp.track: CUTOUTS[sp.name][2] for shot in spec.shots for sp in shot.subjects}
    subjects = []
    for track in sorted(categories):
        boxes = {str(f): [round(v, 1) for v in b[track]] for f, b in enumerate(boxes_per_frame) if track in b}
        subjects.append({"track": track, "category": categories[track], "boxes": boxes})
    return {"file": f"{spec.name}.mp4", "fps": FPS, "frames": len(boxes_per_frame),
            "width": size[0], "height": size[1], "kind": spec.kind, "cuts": cuts,
            "gradual": gradual, "subjects": subjects, "bad": False}


def encode(path: Path, frames: Iterable[np.ndarray], size: tuple[int, int], fps: int = FPS,
           crf: int = 20, faststart: bool = False) -> int:
    """Encode RGB frames as H.264 (yuv420p) MP4; returns the frame count. ``faststart``
    puts the index (moov) before the media data, as web video does."""
    n = 0
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else None) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "superfast"}
        for img in frames:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
            n += 1
        for packet in stream.encode():
            out.mux(packet)
    return n


# --------------------------------------------------------------------------- specs

def _pt(rng: np.random.Generator, lo: float = 0.25, hi: float = 0.75) -> tuple[float, float]:
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _cam(rng: np.random.Generator, kind: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Start/end camera for a move: pan (any direction), zoom in/out, or still."""
    if kind == "pan":
        ang = rng.uniform(0, 2 * math.pi)
        d = rng.uniform(0.15, 0.3)
        z = rng.uniform(1.5, 1.9)
        return ((0.5 - d * math.cos(ang), 0.5 - d * math.sin(ang), z),
                (0.5 + d * math.cos(ang), 0.5 + d * math.sin(ang), z))
    if kind == "fastpan":
        z = rng.uniform(1.8, 2.2)
        sgn = 1 if rng.random() < 0.5 else -1
        return ((0.5 - 0.3 * sgn, rng.uniform(0.4, 0.6), z), (0.5 + 0.3 * sgn, rng.uniform(0.4, 0.6), z))
    if kind in ("zoomin", "zoomout"):
        c = _pt(rng, 0.4, 0.6)
        za, zb = 1.05, rng.uniform(1.7, 2.2)
        if kind == "zoomout":
            za, zb = zb, za
        return (c[0], c[1], za), (c[0] + rng.uniform(-0.05, 0.05), c[1] + rng.uniform(-0.05, 0.05), zb)
    c = _pt(rng, 0.45, 0.55)
    return (c[0], c[1], 1.1), (c[0], c[1], 1.1)


def _subject(rng: np.random.Generator, name: str, track: int, *, turn: bool = False,
             spin: float = 0.0, grow: bool | None = None, side: str | None = None) -> SubjectPath:
    if side == "left":
        p0, p1 = (rng.uniform(0.2, 0.3), rng.uniform(0.35, 0.65)), (rng.uniform(0.7, 0.8), rng.uniform(0.35, 0.65))
    elif side == "right":
        p0, p1 = (rng.uniform(0.7, 0.8), rng.uniform(0.35, 0.65)), (rng.uniform(0.2, 0.3), rng.uniform(0.35, 0.65))
    else:
        p0, p1 = _pt(rng, 0.3, 0.7), _pt(rng, 0.3, 0.7)
    a, b = rng.uniform(0.3, 0.42), rng.uniform(0.45, 0.6)
    if grow is False or (grow is None and rng.random() < 0.5):
        a, b = b, a
    return SubjectPath(name=name, track=track, p0=p0, p1=p1, s0=a, s1=b,
                       r0=float(rng.uniform(-8, 8)), r1=float(rng.uniform(-8, 8) + spin),
                       flip_at=float(rng.uniform(0.35, 0.65)) if turn else None,
                       bend=float(rng.uniform(-0.08, 0.08)))


def _len(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def _specs(rng: np.random.Generator) -> list[VideoSpec]:
    """Eight videos covering the cases curation must handle."""
    r = rng
    return [
        VideoSpec("cat_pan_cut", "pan+cut", [
            Shot("hubble", _len(r, 50, 65), *_cam(r, "pan"), [_subject(r, "cat", 0, side="left")]),
            Shot("brick", _len(r, 45, 60), *_cam(r, "zoomin"), [_subject(r, "cat", 0, turn=True, spin=25)]),
        ]),
        VideoSpec("rocket_dissolve", "zoom+dissolve", [
            Shot("moon", _len(r, 55, 65), *_cam(r, "zoomout"), [_subject(r, "rocket", 0, grow=True)]),
            Shot("astronaut", _len(r, 55, 70), *_cam(r, "pan"), [_subject(r, "rocket", 0, spin=-30)],
                 transition_in="dissolve", dissolve=_len(r, 10, 15)),
        ]),
        VideoSpec("two_subjects", "two-subjects+cut", [
            Shot("gravel", _len(r, 60, 75), *_cam(r, "pan"),
                 [_subject(r, "cat", 0, side="left"), _subject(r, "cup", 1, side="right")]),
            Shot("coins", _len(r, 50, 65), *_cam(r, "zoomin"),
                 [_subject(r, "cup", 1, turn=True), _subject(r, "cat", 0, spin=20)], noise=2.0),
        ]),
        VideoSpec("static_scene", "static", [
            Shot("coffee", _len(r, 80, 100), *_cam(r, "still"), [], noise=1.5),
        ]),
        VideoSpec("person_zoom", "zoom+cut+dissolve", [
            Shot("grass", _len(r, 40, 50), *_cam(r, "zoomin"), [_subject(r, "person", 0, grow=True)]),
            Shot("camera", _len(r, 40, 50), *_cam(r, "pan"), [_subject(r, "person", 0, turn=True)]),
            Shot("hubble", _len(r, 45, 55), *_cam(r, "zoomout"), [_subject(r, "person", 0, spin=15)],
                 transition_in="dissolve", dissolve=_len(r, 10, 15)),
        ]),
        VideoSpec("motorcycle_fast", "fast-pan+light-change+cut", [
            Shot("rocket", _len(r, 45, 55), *_cam(r, "fastpan"),
                 [_subject(r, "motorcycle", 0, side="right")], shake=0.004),
            Shot("chelsea", _len(r, 55, 65), *_cam(r, "pan"), [_subject(r, "motorcycle", 0, turn=True)],
                 light=(1.0, float(r.uniform(0.55, 0.7)))),
        ]),
        VideoSpec("many_cuts", "short-shots+same-place-cut", [
            Shot("coffee", _len(r, 28, 34), *_cam(r, "pan"), [_subject(r, "cat", 0)]),
            Shot("retina", _len(r, 28, 34), *_cam(r, "zoomin"), [_subject(r, "cup", 1)]),
            # same photo, another framing: a cut between two views of one place
            Shot("retina", _len(r, 28, 34), (0.25, 0.3, 2.6), (0.3, 0.32, 2.7), [_subject(r, "cup", 1, turn=True)]),
            Shot("clock", _len(r, 28, 34), *_cam(r, "pan"), [_subject(r, "cat", 0, spin=30)]),
        ]),
        VideoSpec("dissolve_two", "two-subjects+dissolve+cut", [
            Shot("motorcycle", _len(r, 40, 50), *_cam(r, "pan"),
                 [_subject(r, "person", 0, side="left"), _subject(r, "rocket", 1, side="right")]),
            Shot("grass", _len(r, 40, 50), *_cam(r, "zoomout"),
                 [_subject(r, "person", 0, turn=True), _subject(r, "rocket", 1)],
                 transition_in="dissolve", dissolve=_len(r, 12, 15)),
            Shot("astronaut", _len(r, 30, 40), *_cam(r, "zoomin"), [_subject(r, "rocket", 1, spin=-20)]),
        ]),
    ]


def video_specs(seed: int = 0, count: int | None = None) -> list[VideoSpec]:
    """The sample videos for a seed; beyond eight, the set repeats with new draws."""
    rng = np.random.default_rng(seed)
    specs = _specs(rng)
    want = len(specs) if count is None else count
    out: list[VideoSpec] = []
    rnd = 0
    while len(out) < want:
        batch = specs if rnd == 0 else _specs(np.random.default_rng([seed, rnd]))
        for s in batch:
            if rnd:
                s.name = f"{s.name}_{rnd}"
            out.append(s)
        rnd += 1
    return out[:want]


def _collect(frames: Iterable[tuple[np.ndarray, dict[int, list[float]]]],
             boxes: list[dict[int, list[float]]]) -> Iterable[np.ndarray]:
    """Yield the images, keeping each frame's boxes."""
    for img, b in frames:
        boxes.append(b)
        yield img


def make_samples(out_dir: Path, *, seed: int = 0, size: tuple[int, int] = SAMPLE_SIZE,
                 count: int | None = None) -> Path:
    """Write the sample videos and ground_truth.json into out_dir; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if size[0] % 2 or size[1] % 2 or min(size) < 64:
        raise ValueError(f"size must be even and at least 64 px per side, got {size}")
    videos = []
    for i, spec in enumerate(video_specs(seed, count)):
        boxes: list[dict[int, list[float]]] = []
        encode(out_dir / f"{spec.name}.mp4", _collect(render(spec, size, seed * 1000 + i), boxes), size)
        videos.append(ground_truth(spec, size, boxes))
    gt_path = out_dir / "ground_truth.json"
    gt_path.write_text(json.dumps({"seed": seed, "size": list(size), "videos": videos}, indent=1))
    return gt_path


# --------------------------------------------------------------------- many tiny videos
TINY_BACKGROUNDS = ("hubble", "brick", "moon", "astronaut", "gravel", "coins", "coffee", "grass", "camera",
                    "rocket", "motorcycle", "chelsea", "retina", "clock")
TINY_SUBJECTS = ("cat", "person", "cup", "rocket", "motorcycle")


def tiny_video(path: Path, i: int, size: tuple[int, int] = (160, 90), frames: int = 38) -> None:
    """One photo background and one cut-out moving across it, all drawn from ``i``: load
    tests need many different videos that are quick to make and to process."""
    rng = np.random.default_rng([7, i])
    w, h = size
    bg_full = photo(TINY_BACKGROUNDS[i % len(TINY_BACKGROUNDS)])
    bh, bw = bg_full.shape[:2]
    cw, chh = int(bw * rng.uniform(0.5, 0.9)), int(bh * rng.uniform(0.5, 0.9))
    x0, y0 = int(rng.integers(0, bw - cw + 1)), int(rng.integers(0, bh - chh + 1))
    bg = cv2.resize(bg_full[y0:y0 + chh, x0:x0 + cw], size, interpolation=cv2.INTER_AREA).astype(np.float32)
    rgb, alpha = cutout(TINY_SUBJECTS[(i // len(TINY_BACKGROUNDS)) % len(TINY_SUBJECTS)])
    sh = rng.uniform(0.45, 0.7) * h
    sw = sh * rgb.shape[1] / rgb.shape[0]
    sub = cv2.resize(rgb, (int(sw), int(sh)), interpolation=cv2.INTER_AREA)
    sa = cv2.resize(alpha, (int(sw), int(sh)), interpolation=cv2.INTER_AREA)[..., None]
    ax, bx = rng.uniform(0.05, 0.35) * w, rng.uniform(0.55, 0.95) * w - sw
    ay, by = rng.uniform(0.05, 0.4) * h, rng.uniform(0.05, 0.4) * h

    def frame(k: int) -> np.ndarray:
        t = k / (frames - 1)
        x, y = int(ax + (bx - ax) * t), int(ay + (by - ay) * t)
        img = bg.copy()
        x, y = max(0, x), max(0, y)
        hh, ww = min(sub.shape[0], h - y), min(sub.shape[1], w - x)
        if hh > 0 and ww > 0:  # a wide cut-out can start past the right edge on the last frames
            img[y:y + hh, x:x + ww] += (sub[:hh, :ww] - img[y:y + hh, x:x + ww]) * sa[:hh, :ww]
        return np.clip(img, 0, 255).astype(np.uint8)

    encode(path, (frame(k) for k in range(frames)), size)


def make_tiny_videos(out_dir: Path, count: int, size: tuple[int, int] = (160, 90), start: int = 0) -> list[Path]:
    """``count`` different tiny videos (``tiny-00000.mp4`` ...), each made once."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = out_dir / f"tiny-{i:05d}.mp4"
        if not path.exists():
            tiny_video(path, i, size)
        paths.append(path)
    return paths


# --------------------------------------------------------------------- bad inputs

HOSTILE_NAME = "-rf $(touch pwned); `id` ünï 猫 'q' \"x\".mp4"


def make_bad_samples(out_dir: Path) -> list[Path]:
    """Inputs that must each end with a readable reason (plus one valid video under a
    hostile file name, which must simply succeed). Writes bad_inputs.json describing
    the expected outcome of each ("failed", "rejected" or "ok")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = SAMPLE_SIZE  # passes the default minimum resolution: the all-black video must fail on quality
    rng = np.random.default_rng(1234)
    expect: dict[str, tuple[str, str]] = {}

    def add(name: str, outcome: str, why: str) -> Path:
        expect[name] = (outcome, why)
        return out_dir / name

    add("empty.mp4", "failed", "zero-byte file").write_bytes(b"")
    add("notes.mp4", "failed", "text file named .mp4").write_text(
        "This is not a video.\nIt is a text file with a video extension.\n" * 20)
    add("random.mp4", "failed", "random bytes").write_bytes(rng.bytes(200_000))

    spec = video_specs(7, 1)[0]
    full = out_dir / "_full.mp4"
    encode(full, (img for img, _ in render(spec, size, 7)), size)
    data = full.read_bytes()
    full.unlink()
    # mp4 written without faststart keeps its index (moov) at the end: a cut file has none
    add("truncated.mp4", "failed", "truncated video").write_bytes(data[: len(data) // 2])
    # with the index first, a cut file opens and decodes until its data runs out
    encode(full, (img for img, _ in render(spec, size, 7)), size, faststart=True)
    data = full.read_bytes()
    full.unlink()
    add("cut_short.mp4", "failed", "truncated video, index intact").write_bytes(data[: len(data) * 6 // 10])

    def png(name: str) -> bytes:
        return cv2.imencode(".png", cv2.cvtColor(photo(name), cv2.COLOR_RGB2BGR))[1].tobytes()

    add("still.png", "failed", "still image").write_bytes(png("chelsea"))
    add("photo.mp4", "failed", "still image renamed .mp4").write_bytes(png("astronaut"))

    one = add("one_frame.mp4", "rejected", "one-frame video")
    encode(one, [next(iter(render(spec, size, 7)))[0]], size)
    black = add("all_black.mp4", "rejected", "all-black video")
    encode(black, (np.zeros((size[1], size[0], 3), np.uint8) for _ in range(3 * FPS)), size)

    hostile = add(HOSTILE_NAME, "ok", "valid video with a hostile file name")
    encode(hostile, (img for img, _ in render(video_specs(3, 1)[0], size, 3)), size)

    (out_dir / "bad_inputs.json").write_text(json.dumps(
        {"inputs": [{"file": k, "expect": v[0], "what": v[1], "bad": v[0] != "ok"}
                    for k, v in expect.items()]}, ensure_ascii=False, indent=1))
    return [out_dir / k for k in expect]

"""Stage 1, curate (pure): video-level filters, shots -> clips, keyframes, quality.

``curate_frames`` consumes decoded frames once, in order. Shots are closed as soon
as the shot detector makes their end final, so memory holds at most about two
clip lengths of keyframe candidates, whatever the video's length. Each finished
clip is handed to ``on_clip`` (the service writes its keyframes out) and then
kept without its images.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from opensubject_tasks.backends.base import Image, QualityScorer
from opensubject_tasks.config import CurateSettings
from opensubject_tasks.errors import Rejected
from opensubject_tasks.media.decode import Frame, KeyframeCandidate
from opensubject_tasks.media.probe import ProbeResult
from opensubject_tasks.media.shots import ShotDetector


@dataclass
class Keyframe:
    frame: int
    image: Image | None          # RGB, longest side <= keyframe_max_side; None once written
    source: Any = None           # the decoded picture (``full_image()``: source resolution); None once written


@dataclass
class ClipResult:
    idx: int
    start_frame: int             # inclusive
    end_frame: int               # exclusive
    start_s: float
    end_s: float
    state: str                   # kept | rejected
    reason: str | None = None
    score: float | None = None
    quality: dict[str, Any] | None = None
    keyframes: list[Keyframe] = field(default_factory=list)


@dataclass
class CurateOutcome:
    clips: list[ClipResult]
    cuts: list[int]
    frames: int

    @property
    def kept(self) -> list[ClipResult]:
        return [c for c in self.clips if c.state == "kept"]


def check_video(probe: ProbeResult, s: CurateSettings) -> None:
    """Video-level filters; raises Rejected with the reason."""
    w, h = probe.display_width, probe.display_height
    if min(w, h) < s.min_short_side:
        raise Rejected(f"resolution {w}x{h}: short side {min(w, h)} px < min_short_side {s.min_short_side}")
    if probe.duration_s < s.min_duration_s or probe.frames < 2:
        raise Rejected(f"too short: {probe.duration_s:.2f} s ({probe.frames} frame(s)) "
                       f"< min_duration_s {s.min_duration_s:g}")
    if probe.duration_s > s.max_duration_s:
        raise Rejected(f"too long: {probe.duration_s:.0f} s > max_duration_s {s.max_duration_s:g}")


def split_shot(start: int, end: int, fps: float, s: CurateSettings) -> list[tuple[int, int]]:
    """Equal parts of a shot, none longer than max_clip_s."""
    max_len = max(1, int(s.max_clip_s * fps))
    n = max(1, math.ceil((end - start) / max_len))
    bounds = [start + round(i * (end - start) / n) for i in range(n + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


def pick_keyframes(start: int, end: int, k: int, available: Sequence[int]) -> list[int]:
    """Up to k available frames spread evenly over [start, end)."""
    avail = sorted(f for f in available if start <= f < end)
    if not avail:
        return []
    picked: list[int] = []
    for j in range(k):
        target = start + (j + 0.5) * (end - start) / k
        best = min(avail, key=lambda f: abs(f - target))
        if best not in picked:
            picked.append(best)
    return sorted(picked)


def quality_reason(score: float, metrics: dict[str, Any], s: CurateSettings) -> str:
    weak = sorted((v, k) for k, v in metrics.items()
                  if k in ("sharpness", "exposure", "contrast", "motion", "aesthetic"))[:3]
    parts = ", ".join(f"{k} {v:.2f}" for v, k in weak)
    return f"quality {score:.2f} < min_quality {s.min_quality:g}" + (f" (lowest: {parts})" if parts else "")


class _ClipMaker:
    def __init__(self, fps: float, s: CurateSettings, scorer: QualityScorer,
                 on_clip: Callable[[ClipResult], None] | None) -> None:
        self.fps, self.s, self.scorer, self.on_clip = fps, s, scorer, on_clip
        self.clips: list[ClipResult] = []
        self.motion: dict[int, float] = {}

    def close(self, start: int, end: int, candidates: dict[int, KeyframeCandidate]) -> None:
        """Turn the shot [start, end) into clips."""
        if end <= start:
            return
        for a, b in split_shot(start, end, self.fps, self.s):
            self._clip(a, b, candidates)

    def _clip(self, a: int, b: int, candidates: dict[int, KeyframeCandidate]) -> None:
        s, fps = self.s, self.fps
        clip = ClipResult(idx=len(self.clips), start_frame=a, end_frame=b,
                          start_s=round(a / fps, 4), end_s=round(b / fps, 4), state="kept")
        self.clips.append(clip)
        if (b - a) < s.min_clip_s * fps:
            clip.state = "rejected"
            clip.reason = f"too short: {(b - a) / fps:.2f} s < min_clip_s {s.min_clip_s:g}"
            return
        frames = pick_keyframes(a, b, s.keyframes_per_clip, list(candidates))
        if len(frames) < 2:
            clip.state, clip.reason = "rejected", "fewer than 2 keyframes could be sampled"
            return
        clip.keyframes = [Keyframe(f, candidates[f].image(), candidates[f]) for f in frames]
        q = self.scorer.score([[k.image for k in clip.keyframes]])[0]
        clip.score = float(q.score)
        motion = [self.motion[f] for f in range(a + 1, b) if f in self.motion]
        clip.quality = {"scorer": getattr(self.scorer, "name", type(self.scorer).__name__),
                        **q.metrics, "frame_change": round(float(np.mean(motion)) / 255.0, 5) if motion else 0.0}
        if clip.score < s.min_quality:
            clip.state, clip.reason = "rejected", quality_reason(clip.score, q.metrics, s)
        if self.on_clip is not None:
            self.on_clip(clip)
        for k in clip.keyframes:
            k.image = k.source = None  # written out by on_clip; do not hold images for the whole video


def curate_frames(frames: Iterable[Frame], probe: ProbeResult, s: CurateSettings,
                  scorer: QualityScorer, on_clip: Callable[[ClipResult], None] | None = None,
                  total_frames: Callable[[], int] | None = None) -> CurateOutcome:
    """Shots, clips, keyframes and quality from one pass over the frames.

    ``on_clip`` is called once per scored clip (kept or rejected on quality) while
    its keyframe images are still attached. Frames may come with gaps (a decoder that
    skipped some); ``total_frames()``, asked at the end, counts the skipped ones too.
    """
    fps = probe.fps
    det = ShotDetector(fps, s.detector, min_shot_s=s.min_shot_s, gradual_detector=s.gradual_detector,
                       gradual_span_s=s.gradual_span_s, step=s.analysis_step, options=s.detector_options)
    maker = _ClipMaker(fps, s, scorer, on_clip)
    max_len = max(1, int(s.max_clip_s * fps))
    candidates: dict[int, KeyframeCandidate] = {}
    shot_start = 0
    prev: np.ndarray | None = None
    prev_index = 0
    n = 0

    def close_until(end: int) -> None:
        nonlocal shot_start
        maker.close(shot_start, end, candidates)
        shot_start = end
        for f in [f for f in candidates if f < end]:
            del candidates[f]
        for f in [f for f in maker.motion if f < end]:
            del maker.motion[f]

    recent: deque[Frame] = deque(maxlen=8 * s.analysis_step)  # frames not analysed, near a cut

    def lookup(index: int) -> np.ndarray | None:
        for f in recent:
            if f.index == index:
                return f.analysis_image()
        return None

    try:
        for fr in frames:
            n = fr.index + 1
            if s.analysis_step > 1:
                recent.append(fr)
            if fr.candidate is not None:
                candidates[fr.index] = fr.candidate
            if fr.small is not None:
                g = fr.small[::2, ::2, 1].astype(np.int16)  # green ~ luma; half size is enough
                if prev is not None:  # change per frame, over the gap since the last analysed one
                    maker.motion[fr.index] = float(np.abs(g - prev).mean()) / (fr.index - prev_index)
                prev, prev_index = g, fr.index
                for cut in det.process(fr.index, fr.small, lookup):
                    close_until(cut)
            # A long shot: once no cut can appear in the next two clip lengths, emit one clip.
            while fr.index - det.lag >= shot_start + 2 * max_len:
                close_until(shot_start + max_len)
    finally:
        # stops a decoder (iter_frames) at once, also when a clip's work raised
        close = getattr(frames, "close", None)
        if close is not None:
            close()
    for cut in det.finish():
        close_until(cut)
    n = max(n, total_frames() if total_frames else 0)  # frames the decoder skipped at the end
    close_until(n)
    return CurateOutcome(clips=maker.clips, cuts=det.cuts, frames=n)

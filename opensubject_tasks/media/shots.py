"""Shot boundaries with PySceneDetect's detectors, fed frames from our own decode.

PySceneDetect's detectors compare consecutive frames, so they find hard cuts but
miss most dissolves: over a dissolve the picture changes only a little from one
frame to the next. We therefore run the same detector twice on the same decoded
frames: once on every frame (hard cuts, exact frame), and once on every
``gradual_step``-th frame, where a dissolve shows up as one large change. A
boundary found only by the strided pass is placed on the frame of largest change
inside its window. Both passes read frames that were decoded once.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from scenedetect import detectors as sd
from scenedetect.common import FrameTimecode

DETECTORS = {
    "adaptive": sd.AdaptiveDetector,
    "content": sd.ContentDetector,
    "histogram": sd.HistogramDetector,
    "hash": sd.HashDetector,
}


def make_detector(name: str, min_scene_len: int, **options: Any) -> Any:
    """A PySceneDetect detector with its library defaults (plus explicit options)."""
    try:
        cls = DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown shot detector {name!r}; choose one of {sorted(DETECTORS)}") from None
    return cls(min_scene_len=min_scene_len, **options)


class ShotDetector:
    """Feed frames in order with ``process``; ``finish`` returns the cut frames.

    A cut frame is the first frame of a new shot. ``gradual_span`` (frames) of 0 or
    1 turns the gradual pass off.
    """

    def __init__(self, fps: float, detector: str = "adaptive", *, min_scene_s: float = 0.6,
                 gradual_span: int = 0, gradual_detector: str | None = None,
                 min_votes: int = 1,
                 options: dict[str, Any] | None = None,
                 gradual_options: dict[str, Any] | None = None) -> None:
        self.fps = Fraction(fps).limit_denominator(1001)
        self.min_len = max(1, round(float(fps) * min_scene_s))  # PySceneDetect's default: 15 frames at 25 fps
        self.span = gradual_span if gradual_span and gradual_span > 1 else 0
        self.min_votes = min_votes
        opts = dict(options or {})
        self._fine = make_detector(detector, self.min_len, **opts)
        gopts = gradual_options if gradual_options is not None else opts
        # one detector per phase: phase j sees frames j, j+span, j+2*span, ...
        self._phases = [make_detector(gradual_detector or detector, self.min_len, **gopts)
                        for _ in range(self.span)]
        self._fine_cuts: list[int] = []
        self._phase_cuts: list[int] = []
        self._diff: list[float] = []       # mean absolute change to the previous frame
        self._prev: np.ndarray | None = None
        self._last = -1

    def _tc(self, n: int) -> FrameTimecode:
        return FrameTimecode(n, self.fps)

    def process(self, index: int, frame_bgr: np.ndarray, gray: np.ndarray | None = None) -> float:
        """Feed frame ``index`` (BGR, analysis size); returns its change to the previous frame."""
        self._last = index
        tc = self._tc(index)
        self._fine_cuts += [c.frame_num for c in self._fine.process_frame(tc, frame_bgr)]
        if self.span:
            det = self._phases[index % self.span]
            self._phase_cuts += [c.frame_num for c in det.process_frame(tc, frame_bgr)]
        g = gray if gray is not None else frame_bgr[..., 1]
        d = 0.0 if self._prev is None else float(np.mean(np.abs(g.astype(np.int16) - self._prev)))
        self._prev = g.astype(np.int16)
        self._diff.append(d)
        return d

    @property
    def frame_changes(self) -> list[float]:
        return self._diff

    def finish(self) -> list[int]:
        if self._last < 0:
            return []
        end = self._tc(self._last)
        self._fine_cuts += [c.frame_num for c in self._fine.post_process(end)]
        for det in self._phases:
            self._phase_cuts += [c.frame_num for c in det.post_process(end)]
        cuts = sorted(set(self._fine_cuts))
        # Phase detections of one transition lie within `span` frames of each other;
        # phase j reports the end of its gap, so the transition sits ~span/2 earlier.
        for group in _groups(sorted(self._phase_cuts), self.span):
            if len(group) < self.min_votes:
                continue
            if any(group[0] - self.span - self.min_len < f <= group[-1] + self.min_len for f in cuts):
                continue  # the every-frame pass found it (or a cut is too close for a new shot)
            cuts.append(max(1, round(float(np.median(group)) - (self.span - 1) / 2)))
            cuts.sort()
        return [c for c in cuts if 0 < c <= self._last]


def _groups(values: list[int], gap: int) -> list[list[int]]:
    out: list[list[int]] = []
    for v in values:
        if out and v - out[-1][0] < gap:
            out[-1].append(v)
        else:
            out.append([v])
    return out


@dataclass
class ShotScore:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    def __add__(self, other: "ShotScore") -> "ShotScore":
        return ShotScore(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def score_cuts(detected: list[int], cuts: list[int], gradual: list[list[int]],
               tolerance: int = 2) -> ShotScore:
    """Match detected cut frames one-to-one against true transitions: a hard cut at
    frame c matches c±tolerance, a dissolve [a, b] matches anything in
    [a-tolerance, b+tolerance]."""
    spans = sorted([(c, c) for c in cuts] + [(int(a), int(b)) for a, b in gradual])
    used: set[int] = set()
    tp = 0
    for d in sorted(detected):
        for i, (a, b) in enumerate(spans):
            if i not in used and a - tolerance <= d <= b + tolerance:
                used.add(i)
                tp += 1
                break
    return ShotScore(tp=tp, fp=len(detected) - tp, fn=len(spans) - tp)

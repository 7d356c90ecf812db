"""Shot boundaries with PySceneDetect's detectors, fed frames from our one decode.

PySceneDetect's detectors compare consecutive frames: they find hard cuts, but
over a dissolve the picture changes only a little from one frame to the next, so
most dissolves pass unseen (measured in docs/curation.md). We run two passes over
the same decoded frames:

* **hard cuts**: one detector (default ``AdaptiveDetector``, library defaults) on
  every frame;
* **gradual transitions**: detectors (default ``HistogramDetector``, library
  defaults) that each see every ``span``-th frame, one per phase (phase j sees
  frames j, j+span, ...). Across a gap of ``span`` frames (0.25 s) a dissolve is
  one large change, and brightness histograms hardly move under camera motion. A
  transition is kept when at least two phases report it (a lone phase is usually
  a histogram blip), and is placed on the first frame whose colour histogram is
  closer to the picture after it than to the picture before it (for a dissolve:
  about its middle). All phases together cost one detector call per frame, on a
  half-size copy of the analysis image.

Cuts come out in order, a fixed number of frames (``lag``) after they happen, so a
caller can close shots while decoding continues.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import cv2
import numpy as np
from scenedetect import detectors as sd
from scenedetect.common import FrameTimecode

class _SameScoreFaster:
    """PySceneDetect's content score (the weighted mean absolute differences of hue,
    saturation and value between consecutive frames) computed from one HSV image with one
    OpenCV ``absdiff`` and ``sumElems`` per frame, instead of three channels split out and
    subtracted as int32 arrays: the same sums of integers, the same scores (tested), less
    than half the time. With edges weighted or a stats manager attached, the library's
    own code runs."""

    _last_hsv: np.ndarray | None = None

    def _calculate_frame_score(self, timecode: FrameTimecode, frame_img: np.ndarray) -> float:
        if self._weights.delta_edges > 0.0 or self.stats_manager is not None:
            return super()._calculate_frame_score(timecode, frame_img)  # type: ignore[misc]
        hsv = cv2.cvtColor(frame_img, cv2.COLOR_BGR2HSV)
        last, self._last_hsv = self._last_hsv, hsv
        if last is None:
            return 0.0
        pixels = float(hsv.shape[0] * hsv.shape[1])
        hue, sat, lum, _ = cv2.sumElems(cv2.absdiff(hsv, last))
        components = sd.ContentDetector.Components(delta_hue=hue / pixels, delta_sat=sat / pixels,
                                                   delta_lum=lum / pixels, delta_edges=0.0)
        return sum(c * w for c, w in zip(components, self._weights, strict=True)) / sum(
            abs(w) for w in self._weights)


class AdaptiveDetector(_SameScoreFaster, sd.AdaptiveDetector):
    pass


class ContentDetector(_SameScoreFaster, sd.ContentDetector):
    pass


DETECTORS = {
    "adaptive": AdaptiveDetector,
    "content": ContentDetector,
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


def _hist(frame_bgr: np.ndarray) -> np.ndarray:
    yuv = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2YUV)
    h = cv2.calcHist([yuv], [0, 1, 2], None, [8, 8, 8], [0, 256] * 3).ravel()
    return h / max(float(h.sum()), 1.0)


class ShotDetector:
    """Feed frames in order with ``process`` (it returns cuts that became final);
    ``finish`` returns the rest. A cut is the first frame of a new shot."""

    def __init__(self, fps: float, detector: str = "adaptive", *, min_shot_s: float = 0.6,
                 gradual_detector: str | None = "histogram", gradual_span_s: float = 0.25,
                 step: int = 1, options: dict[str, Any] | None = None,
                 gradual_options: dict[str, Any] | None = None) -> None:
        self.fps = Fraction(fps).limit_denominator(1001)
        # PySceneDetect's min_scene_len default is 15 frames (0.6 s at 25 fps): keep the time
        self.min_len = max(1, round(float(fps) * min_shot_s))
        self.step = max(1, step)  # only every step-th frame is fed (see process)
        span = round(float(fps) * gradual_span_s / self.step) if gradual_detector not in (None, "", "none") else 0
        self.phases = span if span >= 2 else 0   # phases, each seeing analysed frames `span` apart
        self.span = self.phases * self.step      # in frames
        self.min_votes = 2
        self._fine = make_detector(detector, self.min_len, **(options or {}))
        self._phases = [make_detector(str(gradual_detector), self.min_len, **(gradual_options or {}))
                        for _ in range(self.phases)]
        # Every decision about frame n is made by frame n + lag; frames kept for that.
        self.lag = 2 * self.span + 2 * self.min_len + 8 if self.span else 4
        self._frames: deque[tuple[int, np.ndarray]] = deque(maxlen=4 * self.phases + self.min_len + 8)
        self._recent: deque[tuple[int, np.ndarray]] = deque(maxlen=8)  # fed frames, for _refine
        self._fine_cuts: list[int] = []         # every-frame cuts not yet emitted
        self._all_fine: list[int] = []
        self._votes: list[int] = []             # phase detections not yet grouped
        self._gradual: list[int] = []
        self._emitted: list[int] = []
        self._last = -1
        self._slot = -1                          # slot of the last frame the phases saw

    def _tc(self, n: int) -> FrameTimecode:
        return FrameTimecode(n, self.fps)

    def process(self, index: int, frame_bgr: np.ndarray,
                lookup: Callable[[int], np.ndarray | None] | None = None) -> list[int]:
        """Feed frame ``index`` (BGR, analysis size); returns cuts that are now final.

        Frames may come with gaps (a decoder that skipped some). With ``step`` > 1 feed
        about every step-th frame, and pass ``lookup(n)`` giving the analysis image of a
        recent frame n that was not fed: a hard cut found between two fed frames is then
        placed on its exact frame by looking only at the few frames in that gap."""
        self._last = index
        tc = self._tc(index)
        self._recent.append((index, frame_bgr))
        new = [c.frame_num for c in self._fine.process_frame(tc, frame_bgr)]
        if self.step > 1 and lookup is not None:
            new = [self._refine(c, lookup) for c in new]
        self._fine_cuts += new
        self._all_fine += new
        if self.span:
            # a brightness histogram hardly depends on resolution: the gradual pass reads a
            # half-size copy (a quarter of the pixels, measured: same cuts)
            h, w = frame_bgr.shape[:2]
            half = cv2.resize(frame_bgr, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
            self._frames.append((index, half))
            # phase j sees the first frame fed at or after each of its slots j, j + phases, ...
            # (slots are fed-frame positions): one phase per frame when every frame is fed, and
            # frames a steady span apart in every phase when the decoder skipped some
            slot = index // self.step
            for j in sorted({t % self.phases for t in range(max(self._slot + 1, slot - self.phases + 1), slot + 1)}):
                self._votes += [c.frame_num for c in self._phases[j].process_frame(tc, half)]
            self._slot = slot
            self._group_votes(index, final=False)
        return self._release(index - self.lag)

    def finish(self) -> list[int]:
        """Flush the detectors at the end of the video; returns the remaining cuts."""
        if self._last < 0:
            return []
        end = self._tc(self._last)
        new = [c.frame_num for c in self._fine.post_process(end)]
        self._fine_cuts += new
        self._all_fine += new
        for det in self._phases:
            self._votes += [c.frame_num for c in det.post_process(end)]
        self._group_votes(self._last, final=True)
        return self._release(self._last + 1)

    def _refine(self, cut: int, lookup: Callable[[int], np.ndarray | None]) -> int:
        """The first frame between the fed frame before ``cut`` and ``cut`` that looks
        like ``cut`` rather than like that fed frame."""
        fed = [n for n, _ in self._recent if n < cut]
        recent = dict(self._recent)
        after = recent.get(cut)
        if not fed or after is None:
            return cut
        b, a = recent[fed[-1]].astype(np.int16), after.astype(np.int16)
        for n in range(fed[-1] + 1, cut):
            img = lookup(n)
            if img is None:
                return cut
            x = img.astype(np.int16)
            if np.abs(x - a).mean() < np.abs(x - b).mean():
                return n
        return cut

    @property
    def cuts(self) -> list[int]:
        return list(self._emitted)

    def _group_votes(self, now: int, final: bool) -> None:
        """Turn phase detections into gradual cuts once no more votes can join."""
        self._votes.sort()
        while self._votes:
            group = [self._votes[0]]
            for v in self._votes[1:]:
                if v - group[-1] <= self.span:
                    group.append(v)
                else:
                    break
            if not final and now - group[-1] <= max(2 * self.span, self.min_len) + 3:
                return  # the group may still grow, or its right-hand context is not decoded yet
            del self._votes[:len(group)]
            if len(group) < self.min_votes:
                continue
            # a hard cut found within min_shot_s of this evidence explains it (PySceneDetect's
            # min_scene_len: no new shot that close to another)
            if any(group[0] - self.span - self.min_len < f <= group[-1] + self.min_len
                   for f in self._all_fine):
                continue
            self._gradual.append(self._place(group))

    def _place(self, group: list[int]) -> int:
        """The first frame closer (in colour histogram) to after the change than before it."""
        c = int(np.median(group))
        frames = dict(self._frames)
        lo, hi = max(c - 2 * self.span, min(frames)), min(c + self.span, max(frames))
        if lo not in frames or hi not in frames:
            return max(1, c - self.span // 2)
        before, after = _hist(frames[lo]), _hist(frames[hi])
        for n in sorted(f for f in frames if lo < f <= hi):
            h = _hist(frames[n])
            if np.abs(h - after).sum() < np.abs(h - before).sum():
                return n
        return max(1, c - self.span // 2)

    def _release(self, upto: int) -> list[int]:
        """Emit cuts before frame ``upto``: every-frame cuts win over gradual ones nearby."""
        out = []
        fine = sorted(set(self._fine_cuts))
        candidates = sorted({(c, 0) for c in fine} | {(c, 1) for c in self._gradual})
        keep_fine, keep_gradual = [], []
        for c, kind in candidates:
            if c >= upto:
                (keep_fine if kind == 0 else keep_gradual).append(c)
                continue
            last = self._emitted[-1] if self._emitted else 0
            if c <= 0 or c > self._last or c - last < self.min_len and self._emitted:
                continue
            self._emitted.append(c)
            out.append(c)
        self._fine_cuts, self._gradual = keep_fine, keep_gradual
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

    def __add__(self, other: ShotScore) -> ShotScore:
        return ShotScore(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def score_cuts(detected: list[int], cuts: list[int], gradual: list[list[int]],
               tolerance: int = 2) -> ShotScore:
    """Match detected cut frames one-to-one against true transitions: a hard cut at
    frame c matches c±tolerance, a dissolve [a, b] anything in [a-tolerance, b+tolerance]."""
    spans = sorted([(int(c), int(c)) for c in cuts] + [(int(a), int(b)) for a, b in gradual])
    used: set[int] = set()
    tp = 0
    for d in sorted(detected):
        for i, (a, b) in enumerate(spans):
            if i not in used and a - tolerance <= d <= b + tolerance:
                used.add(i)
                tp += 1
                break
    return ShotScore(tp=tp, fp=len(detected) - tp, fn=len(spans) - tp)

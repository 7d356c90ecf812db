"""One decode pass per video.

Each frame is decoded once (FFmpeg's own threads) and scaled by FFmpeg's scaler
straight to the small analysis size that shot detection and motion need. Every
``keyframe_stride``-th frame is also kept as a keyframe candidate: a reference to
the decoded picture, converted to an RGB keyframe (longest side at most
``keyframe_max_side``, rotated upright) only if a clip picks it. Candidates from
large sources are shrunk at once so that holding them stays cheap.

The pass is bounded in time (``decode_timeout_s``) and the container is closed on
every path. A stream that ends far short of what its container declared is
reported as truncated.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from opensubject_tasks.config import CurateSettings
from opensubject_tasks.errors import BadInput
from opensubject_tasks.media.probe import ProbeResult

_HOLD_RAW_MAX_PIXELS = 1920 * 1088  # above this, candidates are shrunk right away


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Even size no larger than max_side on the longest side, aspect kept."""
    scale = min(1.0, max_side / max(width, height))
    w = max(2, int(round(width * scale / 2)) * 2)
    h = max(2, int(round(height * scale / 2)) * 2)
    return w, h


def analysis_size(width: int, height: int, analysis_width: int) -> tuple[int, int]:
    w = min(width, analysis_width)
    h = max(2, int(round(height * w / width / 2)) * 2)
    return max(2, w // 2 * 2), h


class KeyframeCandidate:
    """A decoded picture held until a clip decides whether to keep it."""

    __slots__ = ("_frame", "_size", "_rotation")

    def __init__(self, frame: av.VideoFrame, size: tuple[int, int], rotation: int) -> None:
        if frame.width * frame.height > _HOLD_RAW_MAX_PIXELS:
            frame = frame.reformat(width=size[0], height=size[1], interpolation="AREA", threads=1)
        self._frame, self._size, self._rotation = frame, size, rotation

    def image(self) -> np.ndarray:
        """RGB uint8, upright, longest side <= keyframe_max_side."""
        img = self._frame.to_ndarray(width=self._size[0], height=self._size[1], format="rgb24",
                                     interpolation="AREA", threads=1)
        if self._rotation:
            img = np.ascontiguousarray(np.rot90(img, k=self._rotation // 90))
        return img


@dataclass
class Frame:
    index: int
    time_s: float
    small: np.ndarray | None                  # BGR uint8, analysis size, coded orientation
    #                                           (None on frames skipped by analysis_step)
    candidate: KeyframeCandidate | None = None
    _skipped: tuple[av.VideoFrame, int, int] | None = None

    def analysis_image(self) -> np.ndarray | None:
        """The analysis image, converted now if this frame was skipped."""
        if self.small is None and self._skipped is not None:
            frame, w, h = self._skipped
            self.small = frame.to_ndarray(width=w, height=h, format="bgr24", interpolation="AREA", threads=1)
            self._skipped = None
        return self.small


@dataclass
class DecodeStats:
    frames: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def keyframe_stride(fps: float, s: CurateSettings) -> int:
    """Candidates dense enough that the shortest clip still gets keyframes_per_clip."""
    return max(1, int(fps * s.min_clip_s / s.keyframes_per_clip))


def iter_frames(path: str | Path, probe: ProbeResult, s: CurateSettings,
                stats: DecodeStats | None = None) -> Iterator[Frame]:
    """Decode the video once, yielding every frame in order (see module doc)."""
    stats = stats if stats is not None else DecodeStats()
    aw, ah = analysis_size(probe.width, probe.height, s.analysis_width)
    kw, kh = fit_size(probe.width, probe.height, s.keyframe_max_side)
    stride = keyframe_stride(probe.fps, s)
    t0 = time.monotonic()
    deadline = t0 + s.decode_timeout_s
    index = 0
    try:
        with av.open(str(path), mode="r", timeout=(s.decode_timeout_s, s.decode_timeout_s)) as c:
            stream = next(st for st in c.streams.video
                          if not (st.disposition & av.stream.Disposition.attached_pic))
            stream.thread_type = "AUTO"
            if s.decode_threads:
                stream.thread_count = s.decode_threads
            try:
                for frame in c.decode(stream):
                    if index >= s.max_frames:
                        raise BadInput(f"more than max_frames={s.max_frames} frames decoded")
                    # area averaging on one thread: swscale's default thread pool costs
                    # more than it saves at this size, and competes with the decoder
                    analysed = index % s.analysis_step == 0
                    small = (frame.to_ndarray(width=aw, height=ah, format="bgr24",
                                              interpolation="AREA", threads=1) if analysed else None)
                    cand = KeyframeCandidate(frame, (kw, kh), probe.rotation) if index % stride == 0 else None
                    yield Frame(index, float(frame.time) if frame.time is not None else index / probe.fps,
                                small, cand, None if analysed else (frame, aw, ah))
                    index += 1
                    stats.frames = index
                    if time.monotonic() > deadline:
                        raise BadInput(f"decoding took longer than decode_timeout_s={s.decode_timeout_s:g} "
                                       f"({index} frames decoded)")
            except av.error.FFmpegError as exc:
                stats.errors.append(f"frame {index}: {getattr(exc, 'strerror', None) or exc}")
    except av.error.FFmpegError as exc:
        if time.monotonic() > deadline:  # FFmpeg's own I/O timeout fired
            raise BadInput(f"decoding took longer than decode_timeout_s={s.decode_timeout_s:g} "
                           f"({index} frames decoded)") from None
        raise BadInput(f"cannot decode the video: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        stats.seconds = time.monotonic() - t0
    if index == 0:
        raise BadInput("no frame could be decoded")
    expected = probe.frames if probe.frames_source in ("container", "counted") else 0
    if expected and index < s.min_decoded_share * expected:
        why = f" ({stats.errors[0]})" if stats.errors else ""
        raise BadInput(f"truncated or corrupt video: decoded {index} of {expected} frames{why}")

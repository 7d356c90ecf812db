"""One decode pass per video, overlapped with the analysis.

A coarse pass (``decode_skip_nonref``, on by default): the decoder skips the frames
that no other frame refers to (most B-frames: 30-40 % of the frames of common H.264
and HEVC encodes), which saves their decoding and their analysis; the frames
that remain are numbered by presentation timestamp (``FrameNumbers``), so frame
numbers, clip bounds and keyframe numbers mean the same as in a full decode. Shot
precision/recall is unchanged (docs/curation.md). Streams without timestamps, or
whose gaps would be long, are decoded whole.

A decode thread does nothing but demux and decode each frame once (with FFmpeg's
own decoding threads) and hands the pictures over through a small bounded queue;
the caller's thread, which has time to spare while the decoder works, has
FFmpeg's scaler shrink each picture straight to the small analysis size that shot
detection and motion need. PyAV's decode and scale calls, OpenCV and NumPy release
the GIL, so the two threads run in parallel. The first frame at or after every
``keyframe_stride``-th is also kept as a keyframe candidate: a reference to the decoded picture, converted
to an RGB keyframe (longest side at most ``keyframe_max_side``, rotated upright)
only if a clip picks it. A candidate records where it lies in the stream (its
timestamp and that of the random-access frame before it), so that the few frames that
become training targets can be decoded again at full resolution (media/frames.py).
Candidates from sources above 1080p are shrunk at once so that holding them stays cheap.

Given the probe's open video (``open_video``), the pass continues with the
probe's decoder and starts with the frames the probe decoded: a video is opened
and stream-probed once, and no frame is decoded twice.

The pass is bounded in time (``decode_timeout_s``); the container is closed on
every path (end, error, or the caller stopping early), and decode errors reach
the caller as exceptions. A stream that ends far short of what its container
declared is reported as truncated.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from opensubject_tasks.config import CurateSettings
from opensubject_tasks.errors import BadInput
from opensubject_tasks.media.probe import OpenedVideo, ProbeResult, open_video

_HOLD_RAW_MAX_PIXELS = 1920 * 1088  # above this, candidates are shrunk right away
_QUEUE_FRAMES = 24                  # decoded frames buffered ahead of the analysis ...
_QUEUE_BYTES = 64 * 1024 * 1024     # ... and at most about this many bytes of them
_END = object()                     # end-of-stream marker in the queue
# Skipping unreferenced frames leaves gaps of 1-2 frames in common encodings (B-frames);
# a stream with longer gaps is decoded whole, so shot detection sees the motion.
_MAX_SKIP_GAP = 4


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


class Shrinker:
    """Scale then convert: area-average a picture down in its own pixel format (no
    colour conversion at full size), then convert the small picture to ``fmt``.
    Converting colours after shrinking costs a fraction of converting while scaling
    (measured in docs/performance.md). Each instance keeps its swscale contexts;
    use one per thread."""

    def __init__(self) -> None:
        self._scale, self._convert = VideoReformatter(), VideoReformatter()
        self._via: dict[str, str] = {}  # source pixel format -> format to shrink in

    def shrink(self, frame: av.VideoFrame, size: tuple[int, int]) -> av.VideoFrame:
        """``size``, in the frame's own pixel format where swscale can write it (area
        averaging, one swscale thread)."""
        if (frame.width, frame.height) == size:
            return frame
        src = frame.format.name
        via = self._via.get(src, src)
        try:
            return self._scale.reformat(frame, width=size[0], height=size[1], format=via,
                                        interpolation="AREA", threads=1)
        except (av.error.FFmpegError, ValueError):
            if via == "rgb24":
                raise
            self._via[src] = "rgb24"  # a format swscale only reads (palette, bitstream)
            return self.shrink(frame, size)

    def to_array(self, frame: av.VideoFrame, size: tuple[int, int], fmt: str) -> np.ndarray:
        small = self.shrink(frame, size)
        return self._convert.reformat(small, format=fmt, threads=1).to_ndarray()


class KeyframeCandidate:
    """A decoded picture held until a clip decides whether to keep it."""

    __slots__ = ("_frame", "_size", "_full_size", "_rotation", "_shrinker", "pts", "seek_pts")

    def __init__(self, frame: av.VideoFrame, size: tuple[int, int], rotation: int,
                 shrinker: Shrinker | None = None, full_size: tuple[int, int] | None = None,
                 pts: int | None = None, seek_pts: int | None = None) -> None:
        self._frame, self._size, self._rotation = frame, size, rotation
        self._full_size = full_size or (frame.width, frame.height)
        self._shrinker = shrinker or Shrinker()
        # where the picture lies in the stream: its timestamp and the random-access frame's
        self.pts, self.seek_pts = pts, seek_pts

    def image(self) -> np.ndarray:
        """RGB uint8, upright, longest side <= keyframe_max_side. Call it from one
        thread per shrinker (the consumer of iter_frames)."""
        return self._upright(self._shrinker.to_array(self._frame, self._size, "rgb24"))

    def full_image(self) -> np.ndarray:
        """RGB uint8, upright, at the source's resolution (longest side <= frame_max_side)."""
        return self._upright(self._shrinker.to_array(self._frame, self._full_size, "rgb24"))

    def _upright(self, img: np.ndarray) -> np.ndarray:
        if self._rotation:
            img = np.ascontiguousarray(np.rot90(img, k=self._rotation // 90))
        return img


@dataclass(slots=True)
class Frame:
    index: int
    time_s: float
    small: np.ndarray | None                  # BGR uint8, analysis size, coded orientation
    #                                           (None on frames skipped by analysis_step)
    candidate: Any = None                     # KeyframeCandidate (or anything with .image())
    _skipped: av.VideoFrame | None = None
    _size: tuple[int, int] = (0, 0)

    def analysis_image(self) -> np.ndarray | None:
        """The analysis image, converted now if this frame was skipped."""
        if self.small is None and self._skipped is not None:
            self.small = self._skipped.to_ndarray(width=self._size[0], height=self._size[1], format="bgr24",
                                                  interpolation="AREA", threads=1)
            self._skipped = None
        return self.small


@dataclass
class DecodeStats:
    frames: int = 0       # frames of the stream gone through, decoded or skipped
    decoded: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def keyframe_stride(fps: float, s: CurateSettings) -> int:
    """Candidates dense enough that the shortest clip still gets keyframes_per_clip."""
    return max(1, int(fps * s.min_clip_s / s.keyframes_per_clip))


def iter_frames(source: str | Path | OpenedVideo, probe: ProbeResult, s: CurateSettings,
                stats: DecodeStats | None = None) -> Iterator[Frame]:
    """Decode the video once, yielding every decoded frame in order, numbered as in a
    full decode (``decode_skip_nonref`` skips some; see module doc).
    ``source`` is a path, or the probe's open video (then closed at the end).

    A decode thread does nothing but demux and decode, so FFmpeg's own decoding
    threads always have the next packets; the pictures are scaled here, in the
    caller's thread, which has time to spare while the decoder works. Close the
    iterator (or exhaust it) to stop the decode thread; ``curate_frames`` does.
    Decode errors are raised here, in the caller's thread."""
    stats = stats if stats is not None else DecodeStats()
    aw, ah = analysis_size(probe.width, probe.height, s.analysis_width)
    kw, kh = fit_size(probe.width, probe.height, s.keyframe_max_side)
    stride = keyframe_stride(probe.fps, s)
    # one swscale context per purpose, reused for every frame (a fresh one per frame
    # costs about half as much again as the scaling itself)
    analysis, keyframes = VideoReformatter(), Shrinker()
    # decoded pictures waiting to be scaled: bounded in bytes (a few dozen at 720p)
    depth = max(4, min(_QUEUE_FRAMES, _QUEUE_BYTES // max(1, probe.width * probe.height * 3 // 2)))
    frames: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    worker = threading.Thread(target=_decode_into, args=(source, probe, s, stats, frames, stop),
                              name="decode", daemon=True)
    deadline = time.monotonic() + s.decode_timeout_s
    next_analysed = next_candidate = 0
    seek_pts = None   # timestamp of the last random-access frame
    worker.start()
    try:
        while True:
            try:  # the decode thread enforces the bound; this only guards against it hanging
                item = frames.get(timeout=max(0.0, deadline - time.monotonic()) + 5.0)
            except queue.Empty:
                raise BadInput(f"decoding took longer than decode_timeout_s={s.decode_timeout_s:g} "
                               f"({stats.frames} frames read)") from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            index, frame = item
            if frame.key_frame:
                seek_pts = frame.pts
            # area averaging on one thread: swscale's thread pool costs more than it
            # saves at this size, and competes with the decoder. (Shrinking first and
            # converting after, as for keyframes, halves this cost but moved shot
            # precision by a cut or two on the sample media: not done.)
            analysed = index >= next_analysed  # the first frame at or after each analysis_step-th
            if analysed:
                next_analysed = (index // s.analysis_step + 1) * s.analysis_step
            small = (analysis.reformat(frame, width=aw, height=ah, format="bgr24",
                                       interpolation="AREA", threads=1).to_ndarray()
                     if analysed else None)
            cand = None
            if index >= next_candidate:  # the first frame at or after each stride-th
                next_candidate = (index // stride + 1) * stride
                held = (frame if frame.width * frame.height <= _HOLD_RAW_MAX_PIXELS
                        else keyframes.shrink(frame, (kw, kh)))
                cand = KeyframeCandidate(held, (kw, kh), probe.rotation, keyframes,
                                          pts=frame.pts, seek_pts=seek_pts)
            t = float(frame.time) if frame.time is not None else index / probe.fps
            yield Frame(index, t, small, cand, None if analysed else frame, (aw, ah))
    finally:
        stop.set()
        worker.join()


def _offer(frames: queue.Queue[Any], stop: threading.Event, item: object) -> bool:
    """Put item on the queue unless the consumer has stopped; False when it has."""
    while not stop.is_set():
        try:
            frames.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False


def _decode_into(source: str | Path | OpenedVideo, probe: ProbeResult, s: CurateSettings, stats: DecodeStats,
                 frames: queue.Queue[Any], stop: threading.Event) -> None:
    """The decode thread: every (index, decoded picture), or the exception that ended
    decoding, goes on the queue, then the end marker."""
    try:
        for item in _decode(source, s, stats, stop):
            if not _offer(frames, stop, item):
                return
        if stats.decoded == 0:
            raise BadInput("no frame could be decoded")
        expected = probe.frames if probe.frames_source in ("container", "counted") else 0
        if expected and stats.frames < s.min_decoded_share * expected:
            why = f" ({stats.errors[0]})" if stats.errors else ""
            raise BadInput(f"truncated or corrupt video: read {stats.frames} of {expected} frames{why}")
        _offer(frames, stop, _END)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
        _offer(frames, stop, exc)


def _decode(source: str | Path | OpenedVideo, s: CurateSettings, stats: DecodeStats,
            stop: threading.Event) -> Iterator[tuple[int, av.VideoFrame]]:
    """(frame number, decoded picture) in presentation order. With ``decode_skip_nonref``
    the decoder skips the frames no other frame refers to; numbers still count them."""
    t0 = time.monotonic()
    deadline = t0 + s.decode_timeout_s
    index = last = -1
    try:
        with (source if isinstance(source, OpenedVideo) else open_video(source, s)) as video:
            numbers, decoder = video.numbers, video.stream.codec_context
            skipping = video.skipping  # set by the probe before its first packet

            def decoded() -> Iterator[av.VideoFrame]:
                yield from video.take_first_frames()
                if video.ended:
                    return
                for packet in video.container.demux(video.stream):
                    numbers.packet(packet)
                    yield from packet.decode()

            try:
                for frame in decoded():
                    if stop.is_set():
                        return
                    index = numbers.frame(frame)
                    if skipping and (not numbers.exact or index - last > _MAX_SKIP_GAP):
                        # no timestamps to number skipped frames by, or gaps too long for
                        # shot detection: decode every frame from here on
                        decoder.skip_frame, skipping = "DEFAULT", False
                    last = index
                    if index >= s.max_frames:
                        raise BadInput(f"more than max_frames={s.max_frames} frames in the stream")
                    yield index, frame
                    stats.decoded += 1
                    stats.frames = numbers.total
                    if time.monotonic() > deadline:
                        raise BadInput(f"decoding took longer than decode_timeout_s={s.decode_timeout_s:g} "
                                       f"({index + 1} frames read)")
            except av.error.FFmpegError as exc:
                stats.errors.append(f"frame {index + 1}: {getattr(exc, 'strerror', None) or exc}")
            stats.frames = numbers.total
    except av.error.FFmpegError as exc:
        if time.monotonic() > deadline:  # FFmpeg's own I/O timeout fired
            raise BadInput(f"decoding took longer than decode_timeout_s={s.decode_timeout_s:g} "
                           f"({index + 1} frames read)") from None
        raise BadInput(f"cannot decode the video: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        stats.seconds = time.monotonic() - t0

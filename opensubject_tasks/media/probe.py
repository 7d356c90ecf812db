"""Probe a video file with PyAV without trusting its container metadata.

Every number a container states (size, rate, duration, frame count, rotation) is
checked against bounds and, where cheap, against what the first decoded frames
say. Anything unusable raises ``BadInput`` with a reason a person can read.

``open_video`` keeps the probed file open for the decode pass (``iter_frames``):
the pass continues with the probe's decoder and starts with the frames the probe
decoded, so a video is opened, stream-probed and started decoding only once.
"""
from __future__ import annotations

import bisect
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import av

from opensubject_tasks.config import CurateSettings
from opensubject_tasks.errors import BadInput

# Demuxers that read single pictures, not videos.
_IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "gif_pipe", "webp_pipe",
                  "tiff_pipe", "ppm_pipe", "pgm_pipe", "pam_pipe", "qoi_pipe", "j2k_pipe",
                  "jpegxl_pipe", "psd_pipe", "svg_pipe", "dpx_pipe", "exr_pipe", "sgi_pipe",
                  "xwd_pipe", "pcx_pipe", "apng", "gif", "webp"}
_MAX_STREAMS = 64
_MAX_SIDE = 16384
_MIN_FPS, _MAX_FPS = 0.5, 1000.0


@dataclass
class ProbeResult:
    container: str
    codec: str
    width: int                   # coded size; see display_width/height for rotation
    height: int
    fps: float
    frames: int
    frames_source: str           # container | counted | estimated
    duration_s: float
    rotation: int                # degrees counter-clockwise to display upright (0/90/180/270)
    pix_fmt: str | None = None
    bit_rate: int | None = None
    streams: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # metadata we did not trust, and why

    @property
    def display_width(self) -> int:
        return self.height if self.rotation in (90, 270) else self.width

    @property
    def display_height(self) -> int:
        return self.width if self.rotation in (90, 270) else self.height

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["display_width"], d["display_height"] = self.display_width, self.display_height
        return d


def _open(path: Path, timeout_s: float) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r", timeout=(timeout_s, timeout_s))
    except av.error.ExitError:  # FFmpeg's I/O timeout fired
        raise BadInput(f"opening took longer than decode_timeout_s={timeout_s:g}") from None
    except av.error.InvalidDataError:
        raise BadInput("not a video FFmpeg can read (invalid or unknown container data)") from None
    except av.error.FFmpegError as exc:
        raise BadInput(f"cannot open the file as media: {_msg(exc)}") from None


def _msg(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(": '", 1)[0][:300]


def _rate(value: Any) -> float | None:
    try:
        f = float(value) if value is not None else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if f is not None and math.isfinite(f) and f > 0 else None


class FrameNumbers:
    """Frame numbers in presentation order that also count frames the decoder skipped.

    Feed it every packet read (``packet``) and every frame decoded (``frame``). A
    frame's number is the rank of its timestamp among the packets' timestamps: frames
    leave the decoder in presentation order, and by then every packet shown before
    them has been read. Timestamps behind the last frame are only counted, so this
    holds a few dozen of them, whatever the video's length. A stream without
    timestamps (raw H.264, for one) makes ``exact`` False: frames are then numbered as
    they come, and the decoder must not skip any.
    """

    def __init__(self) -> None:
        self._ahead: list[int] = []  # sorted timestamps of packets not yet behind the last frame
        self._behind = 0             # packets presented up to the last frame
        self._last = -1
        self.exact = True

    def packet(self, packet: av.Packet) -> None:
        if not packet.size or packet.is_discard:  # a flush, or a packet FFmpeg drops unshown
            return
        if packet.pts is None:
            self.exact = False
        else:
            bisect.insort(self._ahead, packet.pts)

    def frame(self, frame: av.VideoFrame) -> int:
        number = self._last + 1
        if self.exact and frame.pts is not None:
            earlier = bisect.bisect_left(self._ahead, frame.pts)
            own = int(earlier < len(self._ahead) and self._ahead[earlier] == frame.pts)
            number = max(number, self._behind + earlier)
            del self._ahead[:earlier + own]
            self._behind += earlier + own
        elif self.exact:
            self.exact = False
        self._last = number
        return number

    @property
    def total(self) -> int:
        """Frames in the stream so far, decoded or not."""
        return max(self._last + 1, self._behind + len(self._ahead)) if self.exact else self._last + 1


class OpenedVideo:
    """A probed video, open and positioned after the frames the probe decoded. Its
    decoder is set up for the decode pass (FFmpeg's threads) before the first packet,
    so that pass can continue with it; ``numbers`` has seen the packets read so far.
    Close it (or use it as a context manager); closing twice is harmless."""

    def __init__(self, probe: ProbeResult, container: av.container.InputContainer,
                 stream: av.video.stream.VideoStream, first_frames: list[av.VideoFrame],
                 ended: bool, numbers: FrameNumbers, skipping: bool = False) -> None:
        self.probe, self.container, self.stream = probe, container, stream
        self._first, self.ended = first_frames, ended  # ended: the decoder is flushed
        self.numbers = numbers
        self.skipping = skipping  # the decoder skips unreferenced frames (decode_skip_nonref)

    def take_first_frames(self) -> list[av.VideoFrame]:
        """The frames the probe decoded, once (then released)."""
        first, self._first = self._first, []
        return first

    def close(self) -> None:
        self._first = []
        self.container.close()

    def __enter__(self) -> OpenedVideo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe_video(path: str | Path, settings: CurateSettings | None = None) -> ProbeResult:
    """Describe a video file or raise BadInput saying why it is unusable."""
    with open_video(path, settings) as video:
        return video.probe


def open_video(path: str | Path, settings: CurateSettings | None = None) -> OpenedVideo:
    """Probe a video file (see ``probe_video``) and keep it open for the decode pass."""
    s = settings or CurateSettings()
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadInput(f"cannot read the file: {exc.strerror or exc}") from None
    if size == 0:
        raise BadInput("empty file (0 bytes)")
    c = _open(path, s.decode_timeout_s)
    try:
        return _probe(path, c, s)
    except BaseException:
        c.close()
        raise


def _probe(path: Path, c: av.container.InputContainer, s: CurateSettings) -> OpenedVideo:
    deadline = time.monotonic() + s.decode_timeout_s
    notes: list[str] = []
    fmt = c.format.name
    streams = [{"index": st.index, "type": st.type,
                "codec": st.codec_context.name if st.codec_context else None}
               for st in c.streams]
    if len(streams) > _MAX_STREAMS:
        raise BadInput(f"too many streams ({len(streams)} > {_MAX_STREAMS})")
    videos = [st for st in c.streams.video
              if not (st.disposition & av.stream.Disposition.attached_pic)]
    if not videos:
        kinds = sorted({st.type for st in c.streams})
        raise BadInput("no video stream" + (f" (only {', '.join(kinds)})" if kinds else ""))
    if fmt.split(",")[0] in _IMAGE_FORMATS:
        raise BadInput(f"a still image ({fmt}), not a video")
    v = videos[0]
    cc = v.codec_context
    codec = cc.name if cc else "unknown"
    # A damaged stream may come without a codec context: no size to trust then.
    width, height = (int(cc.width or 0), int(cc.height or 0)) if cc else (0, 0)
    if width <= 0 or height <= 0:
        raise BadInput(f"video size missing or invalid ({width}x{height})")
    _check_size(width, height, s)

    fps = _rate(v.average_rate) or _rate(v.guessed_rate) or _rate(v.base_rate)
    if fps is not None and not (_MIN_FPS <= fps <= _MAX_FPS):
        notes.append(f"container frame rate {fps:g} ignored (outside {_MIN_FPS:g}..{_MAX_FPS:g})")
        fps = None

    # Decode the first frame(s): proves the stream decodes, gives the true size, pixel
    # format, rotation and (if the container had none) the frame rate from timestamps.
    # The decode pass continues with this decoder, so it gets that pass's threading now.
    v.thread_type = "AUTO"
    v.thread_count = decode_threads(width, height, s)
    if s.decode_skip_loop_filter:  # a decoder option: set before it opens, at the first packet
        v.codec_context.options = {**v.codec_context.options, "skip_loop_filter": "all"}
    # The coarse pass (decode_skip_nonref) skips from the first packet on, so which frames
    # come out is the stream's affair (each picture says whether others refer to it), not
    # the thread count's: frames in flight when skipping began would come out whole, more
    # of them with more threads. A stream without a frame rate is measured from its first
    # frames' timestamps, which skipping would space unevenly: decoded whole.
    numbers = FrameNumbers()
    skipping = s.decode_skip_nonref and fps is not None
    if skipping:
        v.codec_context.skip_frame = "NONREF"
    first, ended = _first_frames(c, v, deadline, numbers, n=1 if fps is not None else 3)
    skipping = skipping and numbers.exact  # _first_frames stopped it for a stream without timestamps
    if not first:
        raise BadInput(f"no frame of the {codec} stream could be decoded")
    f0 = first[0]
    if (f0.width, f0.height) != (width, height):
        notes.append(f"container size {width}x{height} differs from decoded {f0.width}x{f0.height}")
        width, height = f0.width, f0.height
        _check_size(width, height, s)
    rotation = int(round((getattr(f0, "rotation", 0) or 0) / 90.0)) * 90 % 360
    if fps is None:
        fps = _fps_from_pts(first)
        if fps is None:
            raise BadInput("frame rate missing or absurd, and the timestamps do not give one")
        notes.append(f"frame rate {fps:.3f} measured from timestamps")

    duration = None
    if v.duration is not None and v.time_base:
        duration = float(v.duration * v.time_base)
    elif c.duration is not None:
        duration = c.duration / 1_000_000
    if duration is not None and not (0 < duration < 1e7 and math.isfinite(duration)):
        notes.append(f"container duration {duration!r} ignored")
        duration = None

    frames, source = int(v.frames or 0), "container"
    if frames <= 0 or (duration and abs(frames - duration * fps) > 0.1 * frames + 2):
        if frames > 0:
            notes.append(f"container frame count {frames} disagrees with duration x fps")
        frames, source = _count_packets(path, s, deadline, v.index), "counted"
    if duration is None:
        duration = frames / fps
        notes.append("duration computed from the frame count")
    if ended and len(first) == 1 and frames <= 1:
        frames, source = 1, "counted"
    if frames > s.max_frames:
        raise BadInput(f"too many frames ({frames} > max_frames {s.max_frames})")
    probe = ProbeResult(
        container=fmt, codec=codec, width=width, height=height, fps=round(fps, 6),
        frames=frames, frames_source=source, duration_s=round(duration, 6),
        rotation=rotation, pix_fmt=f0.format.name or (cc.pix_fmt if cc else None),
        bit_rate=int(c.bit_rate) if c.bit_rate else None, streams=streams, notes=notes,
    )
    return OpenedVideo(probe, c, v, first, ended, numbers, skipping)


# FFmpeg's own choice is one frame thread per core, plus one. With so few frames in flight
# the threads of an H.264/HEVC decode mostly wait on one another's reference rows (B-pyramid
# encodes most): on 2 cores 8 threads decoded a 720p x264 encode 1.3x faster and kept 1.9
# instead of 1.45 cores busy, at the same CPU per frame (docs/performance.md). Tiny pictures
# decode too fast for it to matter, and each thread costs its start-up.
_MIN_FRAME_THREADS = 8
_MIN_FRAME_THREADS_PIXELS = 640 * 360
_MAX_FRAME_THREADS = 16  # FFmpeg's own cap on automatic threads


def decode_threads(width: int, height: int, s: CurateSettings) -> int:
    """Decoding threads for a stream of this size (0: FFmpeg's own count): ``decode_threads``
    when set, else FFmpeg's count, but at least 8 from 640x360 up."""
    if s.decode_threads or width * height < _MIN_FRAME_THREADS_PIXELS:
        return s.decode_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(_MIN_FRAME_THREADS, min(_MAX_FRAME_THREADS, cores + 1))


def _check_size(width: int, height: int, s: CurateSettings) -> None:
    if width > _MAX_SIDE or height > _MAX_SIDE or width * height > s.max_pixels:
        raise BadInput(f"video size {width}x{height} is beyond the limit "
                       f"(max {_MAX_SIDE} px a side, max_pixels {s.max_pixels})")


def _first_frames(c: av.container.InputContainer, v: av.video.stream.VideoStream,
                  deadline: float, numbers: FrameNumbers, n: int) -> tuple[list[av.VideoFrame], bool]:
    """The first n frames (fewer if the stream ends or breaks), and whether the stream
    ended: then the decoder has been flushed and has nothing more to give."""
    out: list[av.VideoFrame] = []
    try:
        for packet in c.demux(v):
            numbers.packet(packet)
            if not numbers.exact:  # no timestamps to number skipped frames by
                v.codec_context.skip_frame = "DEFAULT"
            for frame in packet.decode():
                out.append(frame)
            if len(out) >= n or time.monotonic() > deadline:
                return out, packet.size == 0  # an empty packet flushes the decoder
    except av.error.FFmpegError as exc:
        if not out:
            raise BadInput(f"the video stream does not decode: {_msg(exc)}") from None
        return out, False
    return out, True


def _fps_from_pts(frames: list[av.VideoFrame]) -> float | None:
    times = sorted(f.time for f in frames if f.time is not None)
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    fps = (len(times) - 1) / (times[-1] - times[0])
    return fps if _MIN_FPS <= fps <= _MAX_FPS else None


def _count_packets(path: Path, s: CurateSettings, deadline: float, index: int) -> int:
    """Count video packets by demuxing (no decoding): cheap and bounded."""
    n = 0
    with _open(path, s.decode_timeout_s) as c:
        v = c.streams[index]
        try:
            for packet in c.demux(v):
                if packet.size:
                    n += 1
                if n > s.max_frames:
                    break
                if n % 1024 == 0 and time.monotonic() > deadline:
                    raise BadInput(f"probing took longer than decode_timeout_s={s.decode_timeout_s:g}")
        except av.error.FFmpegError:
            pass  # a damaged tail: keep the count so far; decoding will tell
    return n

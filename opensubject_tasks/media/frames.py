"""Single frames of a video at full resolution, decoded again by seeking.

Curation stores only small JPEG keyframes for mining; a training target is a pair's
frame at the source's resolution, without compression artefacts, and only a few frames
of a video become one. So curation records where each keyframe lies in the stream (its
presentation timestamp ``pts`` and that of the random-access frame at or before it,
``seek_pts``), and synthesis decodes just the frames its pairs use: a seek to the
random-access frame, then decoding forward to the frame itself. Frames are taken in
stream order, and a frame whose random-access point the decoder has already passed is
reached by decoding on instead of seeking again, so a batch of frames costs at most one
decode of the video and usually a group of pictures per frame.

The picture is the one curation saw (the same decoded frame; reference frames decode
the same whether or not the frames no other frame refers to were skipped), converted
to RGB at the source's size (longest side at most ``frame_max_side``) and turned
upright, as curation's keyframes are.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from opensubject_tasks.config import CurateSettings
from opensubject_tasks.errors import BadInput
from opensubject_tasks.media.decode import KeyframeCandidate, Shrinker, fit_size
from opensubject_tasks.media.probe import _open


@dataclass(frozen=True)
class FramePosition:
    """Where a frame lies: its number as curation counted (presentation order), and,
    where the stream has timestamps, its ``pts`` and the ``seek_pts`` of the
    random-access frame at or before it (stream time base)."""
    frame: int
    pts: int | None = None
    seek_pts: int | None = None

    @classmethod
    def of(cls, entry: dict) -> FramePosition:
        """From a clip's keyframe entry (``clips.keyframes``)."""
        pts, seek = entry.get("pts"), entry.get("seek_pts")
        return cls(int(entry["frame"]), None if pts is None else int(pts),
                   None if seek is None else int(seek))


def full_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size full frames are kept at: the source's own, or fitted to ``max_side``."""
    if not max_side or max_side >= max(width, height):
        return width, height
    return fit_size(width, height, max_side)


def decode_frames(path: str | Path, wanted: Iterable[FramePosition], s: CurateSettings) -> dict[int, np.ndarray]:
    """RGB uint8 pictures (upright, longest side at most ``s.frame_max_side``) of the
    wanted frames, by frame number. Raises BadInput when a frame cannot be found."""
    wanted = sorted(set(wanted), key=lambda p: (p.pts is None, p.pts if p.pts is not None else p.frame))
    out: dict[int, np.ndarray] = {}
    if not wanted:
        return out
    deadline = time.monotonic() + s.decode_timeout_s
    shrinker = Shrinker()
    try:
        with _open(Path(path), s.decode_timeout_s) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            by_pts = [p for p in wanted if p.pts is not None]
            by_number = [p for p in wanted if p.pts is None]
            if by_pts:
                for pos, frame in _seek_each(container, stream, by_pts, deadline, s):
                    out[pos.frame] = _picture(frame, shrinker, s)
            if by_number:
                container.seek(0, stream=stream)
                numbers = {p.frame for p in by_number}
                for number, frame in enumerate(_frames(container, stream, deadline, s)):
                    if number in numbers:
                        out[number] = _picture(frame, shrinker, s)
                        numbers.discard(number)
                        if not numbers:
                            break
    except av.error.FFmpegError as exc:
        raise BadInput(f"cannot decode frames of {Path(path).name}: "
                       f"{getattr(exc, 'strerror', None) or exc}") from None
    missing = sorted(p.frame for p in wanted if p.frame not in out)
    if missing:
        raise BadInput(f"frame(s) {missing[:8]} not found in {Path(path).name}")
    return out


def _seek_each(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
               wanted: list[FramePosition], deadline: float,
               s: CurateSettings) -> Iterator[tuple[FramePosition, av.VideoFrame]]:
    """Each wanted frame (sorted by pts) with its decoded picture."""
    frames: Iterator[av.VideoFrame] | None = None
    last: int | None = None   # pts of the last frame decoded
    for pos in wanted:
        frame = None
        seek = pos.seek_pts if pos.seek_pts is not None else pos.pts
        if frames is None or last is None or not (seek <= last < pos.pts):
            # not between this frame's random-access point and the frame: seek there
            container.seek(seek, stream=stream, backward=True, any_frame=False)
            frames = _frames(container, stream, deadline, s)
        found = None
        for frame in frames:
            last = frame.pts
            if frame.pts is None or frame.pts < pos.pts:
                continue
            if frame.pts == pos.pts:
                found = frame
            break
        if found is None:
            if seek > 0 and frame is not None:
                # the seek landed past the frame (an index that disagrees): from the start
                yield from _seek_each(container, stream, [FramePosition(pos.frame, pos.pts, 0)], deadline, s)
                frames, last = None, None
                continue
            raise BadInput(f"frame {pos.frame} (pts {pos.pts}) is not in the stream")
        yield pos, found


def _frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
            deadline: float, s: CurateSettings) -> Iterator[av.VideoFrame]:
    for frame in container.decode(stream):
        if time.monotonic() > deadline:
            raise BadInput(f"decoding frames took longer than decode_timeout_s={s.decode_timeout_s:g}")
        yield frame


def _picture(frame: av.VideoFrame, shrinker: Shrinker, s: CurateSettings) -> np.ndarray:
    rotation = int(round((getattr(frame, "rotation", 0) or 0) / 90.0)) * 90 % 360
    size = full_size(frame.width, frame.height, s.frame_max_side)
    return KeyframeCandidate(frame, size, rotation, shrinker, size).full_image()

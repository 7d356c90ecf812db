"""The one decode pass: a decode thread feeding the analysis through a bounded queue.
Frames arrive complete and in order, the thread and the container end on every path,
and errors on either side reach the caller."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from opensubject_tasks.backends.classical.quality import ClassicalQuality
from opensubject_tasks.config import CurateSettings
from opensubject_tasks.errors import BadInput
from opensubject_tasks.media.decode import DecodeStats, Shrinker, analysis_size, fit_size, iter_frames
from opensubject_tasks.media.probe import FrameNumbers, decode_threads, open_video, probe_video
from opensubject_tasks.testmedia.samples import photo
from opensubject_tasks.steps.clips import curate_frames


def _video(path: Path, n: int = 60, size=(320, 180), codec: str = "libx264", pix_fmt: str = "yuv420p",
           fmt: str | None = None) -> Path:
    base, other = _picture("coffee", size), _picture("astronaut", size)
    with av.open(str(path), "w", format=fmt) as out:
        s = out.add_stream(codec, rate=25)
        s.width, s.height = size
        s.pix_fmt = pix_fmt
        for i in range(n):
            img = np.roll(base if i < n // 2 else other, i * 3, axis=1).copy()  # a cut half-way
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt)
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def _picture(name: str, size: tuple[int, int]) -> np.ndarray:
    img = photo(name)
    if img.shape[0] < size[1] or img.shape[1] < size[0]:
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img[:size[1], :size[0]]


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "decode"]


def _open_by_us(path: Path) -> bool:
    """Whether this process holds a file descriptor on path (Linux /proc)."""
    target = os.path.realpath(path)
    fd_dir = Path("/proc/self/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.path.realpath(fd_dir / os.readlink(fd)) == target or os.readlink(fd) == target:
                return True
        except OSError:
            continue
    return False


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return _video(tmp_path_factory.mktemp("pipeline") / "clip.mp4")


@pytest.mark.parametrize("codec,ext", [("mpeg4", "avi"), ("libvpx-vp9", "webm"), ("libx264", "mkv"),
                                       ("libx264", "mp4")])
@pytest.mark.parametrize("threads", [0, 1])
@pytest.mark.parametrize("skip", [False, True])
def test_the_probes_open_video_continues_into_every_frame(tmp_path: Path, codec: str, ext: str,
                                                         threads: int, skip: bool):
    """The decode pass continues with the probe's container and decoder and starts with
    the frame the probe decoded: every frame comes once, in order, the same bytes as a
    plain decode, and the file is closed at the end. With decode_skip_nonref the frames
    no other frame refers to are skipped (x264's B-frames), and each frame that comes
    carries its own number: the same picture as that frame of a plain decode."""
    path = _video(tmp_path / f"v.{ext}", n=40, codec=codec)
    s = CurateSettings(decode_threads=threads, decode_skip_nonref=skip)
    aw, ah = analysis_size(320, 180, s.analysis_width)
    with av.open(str(path)) as c:
        plain = [f.to_ndarray(width=aw, height=ah, format="bgr24", interpolation="AREA") for f in c.decode(video=0)]
    video = open_video(path, s)
    assert video.probe.pix_fmt == "yuv420p" and video.probe.frames == 40 and len(plain) == 40
    stats = DecodeStats()
    frames = list(iter_frames(video, video.probe, s, stats))
    numbers = [f.index for f in frames]
    assert stats.frames == 40 and stats.decoded == len(frames)
    if skip and codec == "libx264":
        assert numbers[0] == 0 and numbers == sorted(set(numbers)) and 20 <= len(numbers) < 36
    else:  # without B-frames there is nothing to skip
        assert numbers == list(range(40))
    assert all(np.array_equal(f.small, plain[f.index]) for f in frames)
    assert not _open_by_us(path)
    video.close()  # closing again (as the service does) is harmless


def test_pictures_from_640x360_up_are_decoded_on_at_least_8_frame_threads(tmp_path: Path):
    """FFmpeg's own count (cores + 1) keeps too few frames in flight on small machines;
    from 640x360 up the decoder gets at least 8 threads, and the frames stay those of a
    plain decode. A count set in the settings is kept; small pictures keep FFmpeg's."""
    s = CurateSettings()
    assert decode_threads(320, 180, s) == 0
    assert 8 <= decode_threads(1280, 720, s) <= 16
    assert decode_threads(1280, 720, CurateSettings(decode_threads=3)) == 3
    path = _video(tmp_path / "v.mp4", n=30, size=(640, 360))
    aw, ah = analysis_size(640, 360, s.analysis_width)
    with av.open(str(path)) as c:
        plain = [f.to_ndarray(width=aw, height=ah, format="bgr24", interpolation="AREA") for f in c.decode(video=0)]
    video = open_video(path, s)
    assert video.stream.codec_context.thread_count >= 8
    frames = list(iter_frames(video, video.probe, s))
    assert 15 <= len(frames) < 30  # B-frames skipped
    assert all(np.array_equal(f.small, plain[f.index]) for f in frames)
    # Which frames the coarse pass skips is the stream's, not the thread count's: a curation
    # on a 2-core machine and one on 16 cores (or in `--jobs N` workers) find the same shots.
    for threads in (1, 3, 16):
        single = CurateSettings(decode_threads=threads)
        assert [f.index for f in iter_frames(path, probe_video(path, single), single)] == [f.index for f in frames]


def test_skipping_the_deblocking_filter_is_opt_in_and_keeps_the_frames_analysed(tmp_path: Path):
    """``decode_skip_loop_filter`` makes the one decode pass cheaper: the same frames come
    out (the coarse pass's choice does not depend on it), their pictures a little off the
    filtered ones; by default the pictures are those of a plain decode (test above)."""
    path = _video(tmp_path / "v.mp4", n=30, size=(640, 360))
    s = CurateSettings(decode_skip_loop_filter=True)
    filtered = {f.index: f.small for f in iter_frames(path, probe_video(path, CurateSettings()), CurateSettings())}
    unfiltered = {f.index: f.small for f in iter_frames(path, probe_video(path, s), s)}
    assert list(unfiltered) == list(filtered)
    diffs = [float(np.abs(unfiltered[i].astype(np.int16) - filtered[i]).mean()) for i in filtered]
    assert max(diffs) > 0 and float(np.mean(diffs)) < 3.0


def _packet(pts: int | None) -> av.Packet:
    packet = av.Packet(b"\0\0")
    packet.pts = pts
    return packet


class _Shown:  # what FrameNumbers reads of a decoded frame
    def __init__(self, pts: int | None) -> None:
        self.pts = pts


def test_frame_numbers_count_the_frames_a_decoder_skips():
    """Packets arrive in decode order (I0 P4 B2 b1 b3 P8 B6 b5 b7); the decoder shows
    frames in presentation order and skips the unreferenced b-frames: each shown frame
    gets its presentation number, and the total counts the skipped ones."""
    numbers = FrameNumbers()
    shown = []
    for pts, decoded in [(0, [0]), (4, []), (2, []), (1, []), (3, [2]), (8, [4]), (6, []), (5, []), (7, [6])]:
        numbers.packet(_packet(pts * 512))
        shown += [numbers.frame(_Shown(t * 512)) for t in decoded]
    numbers.packet(av.Packet())  # the flush packet counts for nothing
    shown.append(numbers.frame(_Shown(8 * 512)))
    assert shown == [0, 2, 4, 6, 8] and numbers.total == 9
    assert len(numbers._ahead) == 0  # nothing kept behind the last frame


def test_frame_numbers_without_timestamps_count_what_comes():
    numbers = FrameNumbers()
    numbers.packet(_packet(None))
    assert not numbers.exact
    assert [numbers.frame(_Shown(None)) for _ in range(3)] == [0, 1, 2] and numbers.total == 3


def test_a_stream_without_timestamps_is_decoded_whole(tmp_path: Path):
    """Raw H.264 carries no timestamps to number skipped frames by: every frame is
    decoded, in order, even with decode_skip_nonref."""
    path = _video(tmp_path / "v.h264", n=40, fmt="h264")
    s = CurateSettings(decode_skip_nonref=True)
    with av.open(str(path)) as c:
        assert all(p.pts is None for p in c.demux(video=0) if p.size)
    stats = DecodeStats()
    assert [f.index for f in iter_frames(path, probe_video(path, s), s, stats)] == list(range(40))
    assert stats.decoded == stats.frames == 40


def test_a_single_frame_video_is_not_decoded_past_its_end(tmp_path: Path):
    path = _video(tmp_path / "one.mp4", n=1)
    s = CurateSettings()
    with open_video(path, s) as video:
        assert video.probe.frames == 1
        stats = DecodeStats()
        assert [f.index for f in iter_frames(video, video.probe, s, stats)] == [0]
        assert stats.errors == []


def test_frames_arrive_complete_in_order_and_equal_a_plain_decode(clip: Path):
    s = CurateSettings(keyframe_max_side=160, decode_skip_nonref=False)
    p = probe_video(clip, s)
    aw, ah = analysis_size(p.width, p.height, s.analysis_width)
    with av.open(str(clip)) as c:
        plain = [f.to_ndarray(width=aw, height=ah, format="bgr24", interpolation="AREA") for f in c.decode(video=0)]
        c.seek(0)
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    frames = list(iter_frames(clip, p, s))
    assert [f.index for f in frames] == list(range(60)) == list(range(len(plain)))
    assert all(np.array_equal(f.small, q) for f, q in zip(frames, plain))
    # keyframes: shrunk in the source's pixel format, then converted: the same picture
    kw, kh = fit_size(p.width, p.height, 160)
    img = frames[0].candidate.image()
    assert img.shape == (kh, kw, 3)
    want = av.VideoFrame.from_ndarray(first, format="rgb24").to_ndarray(width=kw, height=kh, format="rgb24",
                                                                          interpolation="AREA")
    assert np.abs(img.astype(int) - want).mean() < 3.0
    assert not _decode_threads() and not _open_by_us(clip)


@pytest.mark.parametrize("codec,pix_fmt,fmt", [("libx264", "yuv444p", "mp4"), ("png", "rgb24", "mov")])
def test_other_pixel_formats_give_the_same_keyframes(tmp_path: Path, codec: str, pix_fmt: str, fmt: str):
    path = _video(tmp_path / f"v.{fmt}", n=12, codec=codec, pix_fmt=pix_fmt, fmt=fmt)
    s = CurateSettings(keyframe_max_side=160)
    p = probe_video(path, s)
    frames = list(iter_frames(path, p, s))
    with av.open(str(path)) as c:
        direct = next(c.decode(video=0)).to_ndarray(width=160, height=90, format="rgb24", interpolation="AREA")
    assert frames[0].candidate.image().shape == (90, 160, 3)
    assert np.abs(frames[0].candidate.image().astype(int) - direct).mean() < 3.0


def test_a_format_swscale_cannot_write_is_shrunk_through_rgb():
    frame = av.VideoFrame(64, 32, "pal8")  # palette pictures: swscale reads them, never writes them
    img = Shrinker().to_array(frame, (32, 16), "rgb24")
    assert img.shape == (16, 32, 3) and img.dtype == np.uint8


def test_stopping_early_ends_the_thread_and_closes_the_file(clip: Path):
    s = CurateSettings()
    frames = iter_frames(clip, probe_video(clip, s), s)
    for f in frames:
        if f.index >= 3:  # (frame 3 itself may be one the coarse pass skips)
            break
    assert _decode_threads()  # still open: the generator is only suspended
    frames.close()
    assert not _decode_threads() and not _open_by_us(clip)


def test_an_error_in_the_analysis_stops_decoding(clip: Path):
    s = CurateSettings(min_quality=0.0)
    p = probe_video(clip, s)

    def fail(_clip) -> None:
        raise RuntimeError("the store is down")

    with pytest.raises(RuntimeError, match="the store is down"):
        curate_frames(iter_frames(clip, p, s), p, s, ClassicalQuality(), on_clip=fail)
    assert not _decode_threads() and not _open_by_us(clip)


@pytest.mark.parametrize("skip", [False, True])
def test_a_decode_error_reaches_the_caller_after_the_good_frames(tmp_path: Path, skip: bool):
    full = _video(tmp_path / "full.mp4")
    cut = tmp_path / "cut.mp4"
    with av.open(str(full)) as src, av.open(str(cut), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for pk in src.demux(src.streams.video[0]):
            if pk.dts is not None:
                pk.stream = stream
                out.mux(pk)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # the index (first) promises 60 frames
    s = CurateSettings(decode_skip_nonref=skip)
    seen = []
    with pytest.raises(BadInput, match="truncated or corrupt video: read"):
        for f in iter_frames(cut, probe_video(cut, s), s):
            seen.append(f.index)
    assert seen and seen[0] == 0 and seen == sorted(set(seen)) and seen[-1] < 54
    if not skip:
        assert seen == list(range(len(seen)))
    assert not _decode_threads() and not _open_by_us(cut)


def test_the_time_bound_holds_with_the_thread(clip: Path):
    s = CurateSettings(decode_timeout_s=1e-6)
    with pytest.raises(BadInput, match="decode_timeout_s"):
        for _ in iter_frames(clip, probe_video(clip), s):
            pass
    assert not _decode_threads()

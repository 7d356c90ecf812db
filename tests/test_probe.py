"""Probing and decoding never trust container metadata and always end with a reason."""
from __future__ import annotations

import json
import random
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from opensubject_tasks.config import CurateSettings
from opensubject_tasks.errors import BadInput
from opensubject_tasks.media.decode import DecodeStats, iter_frames
from opensubject_tasks.media.probe import probe_video
from opensubject_tasks.testmedia.samples import HOSTILE_NAME, make_bad_samples, photo


def _video(path: Path, n: int = 30, size=(320, 180), rate=25, rotation: int | None = None,
           fmt: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    base = photo("coffee")[:size[1], :size[0]]
    with av.open(str(path), "w", format=fmt) as out:
        s = out.add_stream("libx264", rate=rate)
        s.width, s.height = size
        s.pix_fmt = "yuv420p"
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i in range(n):
            img = np.roll(base, i * 3, axis=1).copy()
            img[:8, :8] = rng.integers(0, 255, (8, 8, 3))
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def test_probe_sample(sample_media: Path):
    gt = json.loads((sample_media / "ground_truth.json").read_text())["videos"][0]
    p = probe_video(sample_media / gt["file"])
    assert (p.codec, p.width, p.height, p.fps, p.rotation) == ("h264", 854, 480, 25.0, 0)
    assert p.frames == gt["frames"] and p.frames_source == "container"
    assert p.duration_s == pytest.approx(gt["frames"] / 25, abs=0.05)
    assert p.container.startswith("mov,mp4") and p.pix_fmt == "yuv420p"
    assert p.streams == [{"index": 0, "type": "video", "codec": "h264"}]
    assert json.loads(json.dumps(p.to_dict()))["display_width"] == 854


def test_rotation_tag_swaps_display_size_and_keyframes(tmp_path: Path):
    path = _video(tmp_path / "rot.mp4", rotation=90)
    p = probe_video(path)
    assert p.rotation == 90 and (p.display_width, p.display_height) == (180, 320)
    frames = list(iter_frames(path, p, CurateSettings(keyframe_max_side=320)))
    img = frames[0].candidate.image()
    assert img.shape == (320, 180, 3)          # upright
    assert frames[0].small.shape[1] > frames[0].small.shape[0]  # analysis stays coded-orientation


def test_stream_without_index_is_counted(tmp_path: Path):
    # a raw H.264 elementary stream has no container duration or frame count
    path = _video(tmp_path / "raw.h264", n=40, fmt="h264")
    p = probe_video(path)
    assert p.frames == 40 and p.frames_source == "counted"
    assert p.duration_s == pytest.approx(40 / p.fps, rel=0.01)
    assert sum(1 for _ in iter_frames(path, p, CurateSettings())) == 40


def test_absurd_frame_rate_is_refused(tmp_path: Path):
    path = _video(tmp_path / "slow.mp4", n=5, rate=Fraction(1, 10))
    with pytest.raises(BadInput, match="frame rate"):
        probe_video(path)


def test_audio_only_is_refused(tmp_path: Path):
    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=44100)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1024
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with pytest.raises(BadInput, match=r"no video stream \(only audio\)"):
        probe_video(path)


def test_many_streams_are_refused(tmp_path: Path):
    path = tmp_path / "many.mkv"
    with av.open(str(path), "w") as out:
        streams = [out.add_stream("pcm_s16le", rate=8000) for _ in range(70)]
        for s in streams:
            f = av.AudioFrame.from_ndarray(np.zeros((1, 160), np.int16), format="s16", layout="mono")
            f.sample_rate, f.pts = 8000, 0
            for p in s.encode(f):
                out.mux(p)
    with pytest.raises(BadInput, match="too many streams"):
        probe_video(path)


def test_bounds_from_settings(tmp_path: Path):
    path = _video(tmp_path / "v.mp4")
    with pytest.raises(BadInput, match="max_pixels"):
        probe_video(path, CurateSettings(max_pixels=320 * 180 - 1))
    with pytest.raises(BadInput, match="max_frames"):
        probe_video(path, CurateSettings(max_frames=10))
    p = probe_video(path)
    with pytest.raises(BadInput, match="decode_timeout_s"):
        for _ in iter_frames(path, p, CurateSettings(decode_timeout_s=1e-6)):
            pass


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    make_bad_samples(d)
    return d


def _probe_and_decode(path: Path) -> int:
    p = probe_video(path)
    return sum(1 for _ in iter_frames(path, p, CurateSettings()))


def test_bad_files_give_readable_reasons(bad_dir: Path):
    manifest = json.loads((bad_dir / "bad_inputs.json").read_text())["inputs"]
    reasons = {}
    for entry in manifest:
        path = bad_dir / entry["file"]
        if entry["expect"] == "failed":
            with pytest.raises(BadInput) as err:
                _probe_and_decode(path)
            reasons[entry["file"]] = err.value.reason
        else:  # valid videos (rejected later by a filter, or fine)
            assert _probe_and_decode(path) >= 1
    assert reasons["empty.mp4"] == "empty file (0 bytes)"
    assert "still image" in reasons["still.png"] and "still image" in reasons["photo.mp4"]
    assert "truncated" in reasons["cut_short.mp4"]
    for r in reasons.values():
        assert 10 < len(r) < 400 and "Traceback" not in r and "\n" not in r


def test_hostile_name_is_just_a_name(bad_dir: Path):
    path = bad_dir / HOSTILE_NAME
    assert probe_video(path).frames > 75
    assert not (Path.cwd() / "pwned").exists()


def _mutations(data: bytes, n: int, rng: random.Random) -> list[bytes]:
    out = []
    for i in range(n):
        b = bytearray(data)
        kind = i % 5
        if kind == 0:    # bit flips
            for _ in range(rng.randint(1, 50)):
                pos = rng.randrange(len(b))
                b[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation
            b = b[: rng.randrange(1, len(b))]
        elif kind == 2:  # a zeroed run (container boxes, headers, slices)
            pos = rng.randrange(len(b))
            b[pos:pos + rng.randint(4, 400)] = bytes(min(len(b) - pos, 400))
        elif kind == 3:  # box sizes/types swapped: swap two 8-byte runs
            a, c = sorted(rng.sample(range(len(b) - 8), 2))
            b[a:a + 8], b[c:c + 8] = b[c:c + 8], b[a:a + 8]
        else:            # concatenation with another copy's tail
            b = b + data[rng.randrange(len(data)):]
        out.append(bytes(b))
    return out


def test_mutated_videos_never_crash_or_hang(tmp_path: Path):
    src = _video(tmp_path / "src.mp4", n=20).read_bytes()
    rng = random.Random(7)
    outcomes = {"ok": 0, "bad": 0}
    slowest = 0.0
    s = CurateSettings(decode_timeout_s=10)
    for i, blob in enumerate(_mutations(src, 60, rng)):
        path = tmp_path / f"m{i}.mp4"
        path.write_bytes(blob)
        t = time.perf_counter()
        try:
            p = probe_video(path, s)
            stats = DecodeStats()
            for _ in iter_frames(path, p, s, stats):
                pass
            outcomes["ok"] += 1
        except BadInput as exc:
            assert exc.reason and "\n" not in exc.reason
            outcomes["bad"] += 1
        slowest = max(slowest, time.perf_counter() - t)
    assert outcomes["ok"] + outcomes["bad"] == 60
    assert outcomes["bad"] > 0 and slowest < 10

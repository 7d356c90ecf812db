"""Sample media: real photo content, exact and deterministic ground truth."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import av
import numpy as np

from opensubject_tasks.testmedia.samples import (
    HOSTILE_NAME, SAMPLE_SIZE, make_bad_samples, make_samples, render, video_specs,
)


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_ground_truth_matches_the_files(sample_media: Path):
    gt = json.loads((sample_media / "ground_truth.json").read_text())
    videos = gt["videos"]
    assert len(videos) == 8
    kinds = " ".join(v["kind"] for v in videos)
    assert "static" in kinds and "dissolve" in kinds
    assert any(len(v["subjects"]) >= 2 for v in videos)
    assert any(not v["subjects"] for v in videos)
    assert sum(len(v["gradual"]) for v in videos) >= 2
    assert sum(len(v["cuts"]) for v in videos) >= 5
    for v in videos:
        path = sample_media / v["file"]
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "h264"
            assert s.codec_context.pix_fmt == "yuv420p"
            assert (s.width, s.height) == (v["width"], v["height"]) == SAMPLE_SIZE
            assert s.average_rate == 25
            n = sum(1 for _ in c.decode(video=0))
        assert n == v["frames"]
        assert 3.0 <= n / v["fps"] <= 6.0, v["file"]
        for c_ in v["cuts"]:
            assert 0 < c_ < n
        for a, b in v["gradual"]:
            assert 0 < a < b < n and 10 <= b - a + 1 <= 15
        for s in v["subjects"]:
            assert s["category"] in {"cat", "person", "cup", "rocket", "motorcycle"}
            for f, (x0, y0, x1, y1) in s["boxes"].items():
                assert 0 <= int(f) < n
                assert 0 <= x0 < x1 <= SAMPLE_SIZE[0] and 0 <= y0 < y1 <= SAMPLE_SIZE[1]


def test_cut_frames_are_where_the_picture_changes(sample_media: Path):
    gt = json.loads((sample_media / "ground_truth.json").read_text())
    v = next(v for v in gt["videos"] if v["file"] == "cat_pan_cut.mp4")
    frames = [f.astype(np.float32) for f in _decode(sample_media / v["file"])]
    diffs = np.array([np.abs(frames[i] - frames[i - 1]).mean() for i in range(1, len(frames))])
    cut = v["cuts"][0]
    # the largest frame-to-frame change is exactly at the cut, far above the rest
    assert int(np.argmax(diffs)) + 1 == cut
    assert diffs[cut - 1] > 4 * np.median(diffs)


def test_boxes_cover_the_pasted_subject():
    spec = video_specs(0, 1)[0]
    bare = copy.deepcopy(spec)
    for shot in bare.shots:
        shot.subjects = []
    size = (320, 180)
    with_subject = render(spec, size, 5)
    without = render(bare, size, 5)
    for f, ((a, boxes), (b, _)) in enumerate(zip(with_subject, without)):
        if f % 20:
            continue
        changed = np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 40
        ys, xs = np.nonzero(changed)
        x0, y0, x1, y1 = boxes[0]
        # every strongly changed pixel lies inside the box (soft edge: 3 px slack)
        assert xs.min() >= x0 - 3 and xs.max() <= x1 + 3 and ys.min() >= y0 - 3 and ys.max() <= y1 + 3
        # and the box is not much larger than what changed
        assert (xs.max() - xs.min()) > 0.6 * (x1 - x0) and (ys.max() - ys.min()) > 0.6 * (y1 - y0)


def test_same_seed_same_content_other_seed_other_content(tmp_path: Path):
    g1 = json.loads(make_samples(tmp_path / "a", count=2, size=(320, 180)).read_text())
    g2 = json.loads(make_samples(tmp_path / "b", count=2, size=(320, 180)).read_text())
    g3 = json.loads(make_samples(tmp_path / "c", count=2, size=(320, 180), seed=1).read_text())
    assert g1 == g2
    assert g1["videos"] != g3["videos"]
    a = _decode(tmp_path / "a" / g1["videos"][0]["file"])
    b = _decode(tmp_path / "b" / g2["videos"][0]["file"])
    assert len(a) == len(b)
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, b)) <= 2


def test_720p_scales_the_ground_truth(tmp_path: Path):
    small = json.loads(make_samples(tmp_path / "s", count=1, size=(320, 180)).read_text())["videos"][0]
    big = json.loads(make_samples(tmp_path / "b", count=1, size=(1280, 720)).read_text())["videos"][0]
    assert (big["width"], big["height"]) == (1280, 720)
    assert big["cuts"] == small["cuts"] and big["frames"] == small["frames"]
    for f in ("0", "40", "100"):
        bb = np.array(big["subjects"][0]["boxes"][f])
        sb = np.array(small["subjects"][0]["boxes"][f]) * 4
        assert np.abs(bb - sb).max() < 12


def test_bad_samples(tmp_path: Path):
    paths = make_bad_samples(tmp_path)
    names = {p.name for p in paths}
    assert HOSTILE_NAME in names and len(paths) >= 9
    manifest = json.loads((tmp_path / "bad_inputs.json").read_text())
    assert {e["file"] for e in manifest["inputs"]} == names
    assert (tmp_path / "empty.mp4").stat().st_size == 0
    assert (tmp_path / "still.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(_decode(tmp_path / "one_frame.mp4")) == 1
    black = _decode(tmp_path / "all_black.mp4")
    assert len(black) == 75 and max(int(f.max()) for f in black) <= 2
    assert len(_decode(tmp_path / HOSTILE_NAME)) > 75

"""Training targets at source resolution: curate keeps small mining keyframes and where
each lies in the stream; synthesis decodes a pair's frames again at full resolution and
cuts targets and subject crops from them, with mining's keyframe-pixel boxes scaled.
Frames stored losslessly by an earlier curation are still used where rows point to them."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from opensubject_tasks.context import Context
from opensubject_tasks.errors import BadInput
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.models import Build, Clip, Pair, Sample, Subject, Video
from opensubject_tasks.testmedia.samples import cutout, encode, photo
from opensubject_tasks.services.common import run_stage
from opensubject_tasks.steps.pair_inputs import grow_box, int_box
from opensubject_tasks.steps.verdict import sample_seed
from opensubject_tasks.storage import Keys
from opensubject_tasks.storage.sources import file_uri

W, H = 1280, 720


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _frames(n: int = 50) -> list[np.ndarray]:
    """A slow pan over a photo with fine detail (coins), 1280x720."""
    big = cv2.resize(photo("coins"), (W + 4 * n, H + 2 * n), interpolation=cv2.INTER_CUBIC)
    return [np.ascontiguousarray(big[i:i + H, 2 * i:2 * i + W]) for i in range(n)]


def _decode_all(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _ctx(settings) -> Context:  # noqa: ANN001
    ctx = Context.from_settings(settings)
    upgrade(ctx.engine)
    return ctx


def _register(ctx: Context, path: Path) -> str:
    vid = hashlib.sha256(path.name.encode()).hexdigest()[:32]
    with session_scope(ctx.sessions) as s:
        s.add(Build(id="b1"))
        s.flush()
        s.add(Video(id=vid, content_hash=vid, source_uri=file_uri(path), name=path.name, build_id="b1"))
    return vid


def _add_pair(ctx: Context, vid: str, clip_id: str, keyframes: list[dict], boxes: dict[int, list[float]]) -> str:
    """A subject seen on two keyframes of a clip, its pair and a pending sample."""
    (ref, ref_box), (tgt, tgt_box) = boxes.items()
    pair_id = f"{clip_id}-s0-p{ref}-{tgt}"
    with session_scope(ctx.sessions) as s:
        s.add(Subject(id=f"{clip_id}-s0", clip_id=clip_id, idx=0, category="cat", category_source="test",
                      boxes={str(k): v for k, v in boxes.items()}))
        s.flush()
        s.add(Pair(id=pair_id, subject_id=f"{clip_id}-s0", ref_frame=ref, tgt_frame=tgt,
                   ref_box=ref_box, tgt_box=tgt_box))
        s.flush()
        s.add(Sample(id=pair_id, pair_id=pair_id, build_id="b1", seed=sample_seed(pair_id, 1)))
    return pair_id


def _stored_png(ctx: Context, key: str) -> np.ndarray:
    data = np.frombuffer(ctx.store.get_bytes(key), np.uint8)
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_targets_are_the_decoded_frames_at_source_resolution(embedded_settings, tmp_path: Path) -> None:
    """Curation stores only the small JPEG keyframes and where each lies in the stream;
    synthesis decodes a pair's frames again, and the target it stores is the decoded
    picture itself, at source resolution, losslessly."""
    video = tmp_path / "pan_720p.mp4"
    encode(video, _frames(), (W, H), crf=18)
    reference = _decode_all(video)   # an independent decode of every frame
    ctx = _ctx(embedded_settings)
    vid = _register(ctx, video)
    assert run_stage(ctx, "curate", vid).status == "ok"
    with session_scope(ctx.sessions) as s:
        clip = next(iter(s.query(Clip).filter(Clip.state == "kept")))
        clip_id, entries = clip.id, list(clip.keyframes)
    assert len(entries) >= 2 and all(e["width"] == 768 and "pts" in e and "seek_pts" in e for e in entries)
    stored = {o.key for o in ctx.store.list(f"videos/{vid}/")}
    assert stored == {e["key"] for e in entries} and all(k.endswith(".jpg") for k in stored)

    # a pair of the clip's first and last keyframes: the subject box in keyframe pixels
    first, last = entries[0]["frame"], entries[-1]["frame"]
    sid = _add_pair(ctx, vid, clip_id, entries, {first: [100.0, 80.0, 300.0, 260.0], last: [400.0, 100.0, 600.0, 300.0]})
    assert run_stage(ctx, "synthesize", sid).status == "ok"
    with session_scope(ctx.sessions) as s:
        row = s.get(Sample, sid)
        keys, augment = dict(row.keys), dict(row.augment)
    target = _stored_png(ctx, keys["target"])
    assert target.shape == (H, W, 3) and np.array_equal(target, reference[last])   # bit for bit
    small = _stored_png(ctx, entries[-1]["key"])
    # the mining keyframe lost detail the target keeps
    assert _psnr(cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC), reference[last]) < 45
    frames = augment["frames"]
    assert frames["target"]["source"] == "video" and frames["target"]["size"] == [W, H]
    assert frames["reference"]["scale"] == pytest.approx([W / 768, H / 432], abs=1e-5)
    sx, sy = frames["reference"]["scale"]
    x0, y0, x1, y1 = int_box([100.0 * sx, 80.0 * sy, 300.0 * sx, 260.0 * sy], W, H)
    assert np.array_equal(_stored_png(ctx, keys["reference"]), reference[first][y0:y1, x0:x1])

    # frame_max_side bounds the decoded frames
    ctx.settings.curate.frame_max_side = 960
    from opensubject_tasks.media.frames import FramePosition, decode_frames

    got = decode_frames(video, [FramePosition.of(e) for e in entries], ctx.settings.curate)
    assert {f: img.shape for f, img in got.items()} == {e["frame"]: (540, 960, 3) for e in entries}
    ctx.engine.dispose()


def test_a_frame_is_found_wherever_it_lies(tmp_path: Path) -> None:
    """Frames decoded by seeking are the frames of a plain decode: any order, several in
    one group of pictures, across groups, and by number where a stream has no timestamps."""
    from opensubject_tasks.config import CurateSettings
    from opensubject_tasks.media.frames import FramePosition, decode_frames

    video = tmp_path / "gops.mp4"   # a random-access frame every 12, B-frames between references
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W // 2, H // 2, "yuv420p"
        stream.options = {"crf": "23", "preset": "superfast", "x264-params": "keyint=12:min-keyint=12:bframes=3"}
        for img in _frames(60):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(cv2.resize(img, (W // 2, H // 2)), format="rgb24")))
        out.mux(stream.encode())
    positions, key = [], None
    with av.open(str(video)) as c:
        for i, f in enumerate(c.decode(video=0)):
            key = f.pts if f.key_frame else key
            positions.append((FramePosition(i, f.pts, key), f.to_ndarray(format="rgb24")))
    s = CurateSettings()
    wanted = [positions[i] for i in (50, 3, 4, 13, 59, 0, 25, 26, 11)]
    got = decode_frames(video, [p for p, _ in wanted], s)
    assert all(np.array_equal(got[p.frame], img) for p, img in wanted)
    # without timestamps: by frame number; without a random-access point: from the pts
    got = decode_frames(video, [FramePosition(7), FramePosition(31, positions[31][0].pts)], s)
    assert np.array_equal(got[7], positions[7][1]) and np.array_equal(got[31], positions[31][1])
    with pytest.raises(BadInput):
        decode_frames(video, [FramePosition(999, 10**9, 0)], s)


@pytest.fixture()
def full_frame_sample(embedded_settings):
    """A clip whose keyframes are 640x360 JPEGs and whose full frames are 1280x720 PNGs,
    one subject (a cat) in both frames, and a pending sample for the pair."""
    ctx = _ctx(embedded_settings)
    vid, clip_id = "f" * 32, "f" * 32 + "-c0"
    rgb, alpha = cutout("cat")
    boxes = {10: [100.0, 60.0, 260.0, 230.0], 40: [380.0, 120.0, 520.0, 300.0]}   # keyframe pixels
    keyframes, fulls = [], {}
    bg = cv2.resize(photo("grass"), (W, H), interpolation=cv2.INTER_CUBIC)
    for frame, box in boxes.items():
        img = bg.copy().astype(np.float32)
        x0, y0, x1, y1 = (int(v * 2) for v in box)
        a = cv2.resize(alpha, (x1 - x0, y1 - y0))[..., None]
        img[y0:y1, x0:x1] = a * cv2.resize(rgb, (x1 - x0, y1 - y0)) + (1 - a) * img[y0:y1, x0:x1]
        full = img.round().astype(np.uint8)
        fulls[frame] = full
        small = cv2.resize(full, (640, 360), interpolation=cv2.INTER_AREA)
        key, full_key = Keys.keyframe(vid, clip_id, frame), Keys.frame(vid, clip_id, frame)
        ctx.store.put_bytes(key, cv2.imencode(".jpg", small[..., ::-1])[1].tobytes(), "image/jpeg")
        ctx.store.put_bytes(full_key, cv2.imencode(".png", full[..., ::-1])[1].tobytes(), "image/png")
        keyframes.append({"frame": frame, "key": key, "width": 640, "height": 360,
                          "full_key": full_key, "full_width": W, "full_height": H})
    pair_id = f"{clip_id}-s0-p10-40"
    with session_scope(ctx.sessions) as s:
        s.add(Build(id="b1"))
        s.flush()
        s.add(Video(id=vid, content_hash=vid, source_uri="file:///x.mp4", name="x.mp4", build_id="b1",
                    state="running"))
        s.flush()
        s.add(Clip(id=clip_id, video_id=vid, idx=0, start_frame=0, end_frame=50, start_s=0, end_s=2,
                   state="mined", keyframes=keyframes))
        s.flush()
        s.add(Subject(id=f"{clip_id}-s0", clip_id=clip_id, idx=0, category="cat", category_source="test",
                      boxes={str(k): v for k, v in boxes.items()}))
        s.flush()
        s.add(Pair(id=pair_id, subject_id=f"{clip_id}-s0", ref_frame=10, tgt_frame=40,
                   ref_box=boxes[10], tgt_box=boxes[40]))
        s.flush()
        s.add(Sample(id=pair_id, pair_id=pair_id, build_id="b1", seed=sample_seed(pair_id, 1)))
    yield ctx, pair_id, boxes, fulls
    ctx.engine.dispose()


def test_synthesis_cuts_target_and_reference_from_full_frames(full_frame_sample) -> None:
    ctx, sid, boxes, fulls = full_frame_sample
    assert run_stage(ctx, "synthesize", sid).status == "ok"
    with session_scope(ctx.sessions) as s:
        row = s.get(Sample, sid)
        keys, augment = dict(row.keys), dict(row.augment)

    def img(name: str) -> np.ndarray:
        data = np.frombuffer(ctx.store.get_bytes(keys[name]), np.uint8)
        out = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        return out > 127 if out.ndim == 2 else cv2.cvtColor(out, cv2.COLOR_BGR2RGB)

    assert np.array_equal(img("target"), fulls[40])                    # the full frame, bit for bit
    x0, y0, x1, y1 = int_box([v * 2 for v in boxes[10]], W, H)         # keyframe box x2
    assert np.array_equal(img("reference"), fulls[10][y0:y1, x0:x1])
    bx0, by0, bx1, by1 = grow_box([v * 2 for v in boxes[40]], ctx.settings.synth.box_margin, W, H)
    region = img("manipulation_mask")
    # the box (full-frame pixels), grown where the subject's mask in the target reaches beyond it
    assert region.shape == (H, W) and region[by0:by1, bx0:bx1].all()
    mx0, my0, mx1, my1 = augment["manipulation_box"]
    assert mx0 <= bx0 and my0 <= by0 and mx1 >= bx1 and my1 >= by1
    assert region.sum() == (mx1 - mx0) * (my1 - my0) and region[my0:my1, mx0:mx1].all()
    subject = img("target_mask")
    assert subject.shape == (H, W) and subject.any() and region[subject].all()
    assert augment["frames"]["target"] == {"source": "full", "size": [W, H], "scale": [2.0, 2.0]}
    assert max(img("generation_input").shape[:2]) == ctx.settings.synth.output_size   # 1024 of 1280


def test_verification_compares_the_subject_where_it_is_in_the_full_frame(full_frame_sample) -> None:
    """The same-individual check crops the target's subject with the pair's box scaled to
    the full frame: the same cat passes (the unscaled box would crop grass)."""
    ctx, sid, _, _ = full_frame_sample
    assert run_stage(ctx, "synthesize", sid).status == "ok"
    run_stage(ctx, "verify", sid)
    with session_scope(ctx.sessions) as s:
        verdict = s.get(Sample, sid).verdict
    threshold = ctx.settings.verify.same_individual_threshold("classical")
    assert verdict["scores"]["same_individual"] >= threshold
    assert not any(r.startswith("same individual") for r in verdict["reasons"])


def test_manifest_boxes_are_in_the_exported_images_pixels(full_frame_sample, tmp_path: Path) -> None:
    """The manifest's boxes are in the shipped images' pixels (mining's are in keyframe
    pixels, half the size here), with the images' sizes beside them."""
    import pyarrow.parquet as pq

    from opensubject_tasks.export.service import export_build_to

    ctx, sid, boxes, fulls = full_frame_sample
    assert run_stage(ctx, "synthesize", sid).status == "ok"
    with session_scope(ctx.sessions) as s:   # verification is not what is tested here
        row = s.get(Sample, sid)
        row.state, row.caption_short, row.caption_long, row.caption_source = "verified", "a cat", "a cat on grass", "test"
        row.verdict = {"passed": True, "source": "test", "reasons": [], "scores": {"identity": 1.0}}
    out = tmp_path / "dataset"
    export_build_to(ctx, "b1", out)
    [m] = pq.read_table(out / "manifest.parquet").to_pylist()
    assert m["tgt_box"] == [2 * v for v in boxes[40]] and m["tgt_size"] == [W, H]
    assert m["ref_box"] == [2 * v for v in boxes[10]] and m["ref_size"] == [W, H]
    target = cv2.cvtColor(cv2.imread(str(out / m["output_image"])), cv2.COLOR_BGR2RGB)
    assert target.shape[1::-1] == tuple(m["tgt_size"]) and np.array_equal(target, fulls[40])
    x0, y0, x1, y1 = (int(v) for v in m["tgt_box"])   # the box holds the subject: it differs from the grass
    grass = cv2.resize(photo("grass"), (W, H), interpolation=cv2.INTER_CUBIC)
    assert np.abs(target[y0:y1, x0:x1].astype(int) - grass[y0:y1, x0:x1]).mean() > 20
    assert np.array_equal(target[:y0], grass[:y0])

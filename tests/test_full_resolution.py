"""Training targets at source resolution: curate keeps lossless full frames of kept
clips next to the small mining keyframes, and synthesis cuts targets and subject crops
from them, with mining's keyframe-pixel boxes scaled."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.models import Build, Clip, Pair, Sample, Subject, Video
from opensubject_tasks.testmedia.samples import cutout, encode, photo
from opensubject_tasks.services.common import run_stage
from opensubject_tasks.stages.synthesize import grow_box, int_box
from opensubject_tasks.stages.verify import sample_seed
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


def test_curate_keeps_lossless_frames_at_source_resolution(embedded_settings, tmp_path: Path) -> None:
    video = tmp_path / "pan_720p.mp4"
    encode(video, _frames(), (W, H), crf=18)
    reference = _decode_all(video)   # an independent decode of every frame
    ctx = _ctx(embedded_settings)
    vid = _register(ctx, video)
    assert run_stage(ctx, "curate", vid).status == "ok"
    with session_scope(ctx.sessions) as s:
        kept = [list(c.keyframes) for c in s.query(Clip).filter(Clip.state == "kept")]
    entries = [e for kfs in kept for e in kfs]
    assert entries and all(e["width"] == 768 and e["full_width"] == W and e["full_height"] == H for e in entries)
    for e in entries:
        full = cv2.cvtColor(cv2.imdecode(np.frombuffer(ctx.store.get_bytes(e["full_key"]), np.uint8),
                                         cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        small = cv2.cvtColor(cv2.imdecode(np.frombuffer(ctx.store.get_bytes(e["key"]), np.uint8),
                                          cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert e["full_key"].endswith(".png") and e["key"].endswith(".jpg") and full.shape == (H, W, 3)
        truth = reference[e["frame"]]
        # the stored frame is the decoded picture (only the RGB conversion may differ by a level)
        assert _psnr(full, truth) > 45
        # the keyframe lost detail the target keeps
        assert _psnr(cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC), truth) < _psnr(full, truth) - 10
    # a re-run keeps exactly the objects its rows point to
    assert run_stage(ctx, "curate", vid).status == "ok"
    stored = {o.key for o in ctx.store.list(f"videos/{vid}/clips/")}
    assert stored == {k for e in entries for k in (e["key"], e["full_key"])}

    # frame_max_side bounds the stored frames; 0 stores none (each an explicit recompute)
    from opensubject_tasks.services.rerun import invalidate

    ctx.settings.curate.frame_max_side = 960
    invalidate(ctx, "curate", vid, reason="smaller full frames", actor="test")
    assert run_stage(ctx, "curate", vid).status == "ok"
    with session_scope(ctx.sessions) as s:
        e = next(iter(s.query(Clip).filter(Clip.state == "kept"))).keyframes[0]
    assert (e["full_width"], e["full_height"]) == (960, 540)
    ctx.settings.curate.frame_max_side = 0
    invalidate(ctx, "curate", vid, reason="no full frames", actor="test")
    assert run_stage(ctx, "curate", vid).status == "ok"
    assert not [o.key for o in ctx.store.list(f"videos/{vid}/clips/") if o.key.endswith(".png")]
    ctx.engine.dispose()


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
    assert region.shape == (H, W) and region[by0:by1, bx0:bx1].all() and region.sum() == (bx1 - bx0) * (by1 - by0)
    assert augment["frames"]["target"] == {"source": "full", "size": [W, H], "scale": [2.0, 2.0]}
    assert augment["manipulation_box"] == [bx0, by0, bx1, by1]
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

    from opensubject_tasks.services.export import export_build_to

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

"""Stage 3, synthesize: identity preservation, background preservation, recorded and
replayable augmentation, determinism; the service's objects and rows; the contact sheet."""
from __future__ import annotations

import hashlib
import math

import cv2
import numpy as np
import pytest
from sqlalchemy import func, select

from mining_fixtures import gt_clips, seed_video
from opensubject_tasks.backends.registry import get_backend
from opensubject_tasks.catalogue import SAMPLE_IMAGES
from opensubject_tasks.config import SynthSettings
from opensubject_tasks.errors import Rejected
from opensubject_tasks.services.synthesize import encode_png
from opensubject_tasks.steps.pair_inputs import (
    apply_augmentation,
    irregular_erosion,
    synthesize_pair,
)

RUNTIME = {"device": "cpu", "dtype": "auto", "batch_size": 4}
SETTINGS = SynthSettings()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def synth(ref, ref_box, tgt, tgt_box, seed=7, attempt=1, settings=SETTINGS):
    return synthesize_pair(ref, ref_box, tgt, tgt_box, seed=seed, attempt=attempt,
                           segmenter=get_backend("segmenter", "classical", **RUNTIME),
                           inpainter=get_backend("inpainter", "classical", **RUNTIME),
                           settings=settings, category="cat")


@pytest.fixture(scope="module")
def pairs(sample_media):
    """(reference frame, box, target frame, box) from the first and last keyframes of
    every ground-truth subject of a few clips."""
    out = []
    for clip in gt_clips(sample_media)[:6]:
        for boxes in clip.boxes.values():
            frames = sorted(boxes)
            a, b = clip.frame_numbers.index(frames[1]), clip.frame_numbers.index(frames[-2])
            out.append((clip.frames[a], boxes[frames[1]], clip.frames[b], boxes[frames[-2]]))
    return out


def test_generation_input_keeps_the_augmented_subject_exactly(pairs) -> None:
    for ref, ref_box, tgt, tgt_box in pairs:
        r = synth(ref, ref_box, tgt, tgt_box)
        geometry = r.augment["geometry"]
        subject, warped_mask = apply_augmentation(r.images["reference"], r.images["mask"], geometry)
        keep = r.images["generation_mask"]
        gen = r.images["generation_input"]
        # identity preservation: under the eroded mask, the replayed transform's pixels
        assert keep.any() and psnr(gen[keep], subject[keep]) == math.inf
        assert not (keep & ~warped_mask).any()                  # erosion only removes
        assert gen.shape[:2] == tuple(geometry["canvas"][::-1])
        assert max(gen.shape[:2]) == min(SETTINGS.output_size, max(ref.shape[:2]))   # never upscaled
        # kept inside the canvas: the whole warped mask lands on it
        ys, xs = np.nonzero(r.images["mask"])
        pts = np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.max() + 1],
                        [xs.min(), ys.max() + 1], [xs.max() + 1, ys.min()]], float)
        m = np.array(geometry["matrix"])
        moved = pts @ m[:, :2].T + m[:, 2]
        assert (moved >= -1).all() and (moved[:, 0] <= gen.shape[1] + 1).all() and (moved[:, 1] <= gen.shape[0] + 1).all()
        # the rest was synthesized: it is not the black canvas the subject was put on
        assert gen[~keep].mean() > 5
        lo, hi = sorted(SETTINGS.scale_range)
        assert geometry["scale"] <= hi + 1e-9 and abs(geometry["rotation_deg"]) <= SETTINGS.max_rotation_deg


def test_manipulation_input_changes_only_the_box(pairs) -> None:
    for ref, ref_box, tgt, tgt_box in pairs:
        r = synth(ref, ref_box, tgt, tgt_box)
        box = r.images["manipulation_mask"]
        man, target = r.images["manipulation_input"], r.images["target"]
        assert np.array_equal(target, tgt)
        assert psnr(man[~box], target[~box]) == math.inf          # background untouched
        assert psnr(man[box], target[box]) < 25                   # the subject's box was filled
        x0, y0, x1, y1 = r.augment["manipulation_box"]
        assert box[y0:y1, x0:x1].all() and box.sum() == (x1 - x0) * (y1 - y0)
        assert x0 <= tgt_box[0] and y0 <= tgt_box[1] and x1 >= min(tgt_box[2], tgt.shape[1]) - 1


def test_reference_and_mask_come_from_the_reference_box(pairs) -> None:
    ref, ref_box, tgt, tgt_box = pairs[0]
    r = synth(ref, ref_box, tgt, tgt_box)
    x0, y0, x1, y1 = r.augment["reference_crop"]
    assert np.array_equal(r.images["reference"], ref[y0:y1, x0:x1])
    assert r.images["mask"].shape == r.images["reference"].shape[:2]
    assert 0.4 < r.images["mask"].mean() < 0.99       # an elliptical subject in its box
    assert set(r.images) == set(SAMPLE_IMAGES)
    assert r.backends == {"segmenter": "classical", "inpainter": "classical"}


def test_same_seed_same_bytes_other_seed_other_images(pairs) -> None:
    ref, ref_box, tgt, tgt_box = pairs[0]

    def digest(result):
        return {k: hashlib.sha256(encode_png(v)).hexdigest() for k, v in result.images.items()}

    a, b = synth(ref, ref_box, tgt, tgt_box, seed=11), synth(ref, ref_box, tgt, tgt_box, seed=11)
    assert digest(a) == digest(b) and a.augment == b.augment
    c = synth(ref, ref_box, tgt, tgt_box, seed=12)
    d = synth(ref, ref_box, tgt, tgt_box, seed=11, attempt=2)
    for other in (c, d):
        assert digest(other)["generation_input"] != digest(a)["generation_input"]
        assert other.augment["geometry"] != a.augment["geometry"]
        assert digest(other)["reference"] == digest(a)["reference"]      # the subject stays


def test_boundary_erosion_is_irregular() -> None:
    mask = np.zeros((200, 300), bool)
    cv2.ellipse(mask.view(np.uint8), (150, 100), (100, 70), 0, 0, 360, 1, -1)
    eroded, info = irregular_erosion(mask, np.random.default_rng(3), SynthSettings(erosion_px=8))
    assert not (eroded & ~mask).any() and eroded.sum() > 0.5 * mask.sum()
    assert info["depth_min"] < info["depth_max"]
    # how deep the erosion goes, measured along the original boundary, varies
    boundary = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    to_eroded = cv2.distanceTransform((~eroded).astype(np.uint8), cv2.DIST_L2, 5)[boundary]
    assert np.percentile(to_eroded, 90) - np.percentile(to_eroded, 10) >= 3
    thin, _ = irregular_erosion(mask, np.random.default_rng(3), SynthSettings(erosion_px=0))
    assert thin.sum() >= mask.sum() * 0.97                 # only the one-pixel fringe goes


def test_oversized_subjects_are_shrunk_into_the_canvas_and_tiny_boxes_refused(pairs) -> None:
    ref, _, tgt, tgt_box = pairs[0]
    h, w = ref.shape[:2]
    big = synth(ref, [2, 2, w - 2, h - 2], tgt, tgt_box, settings=SynthSettings(scale_range=(1.5, 1.6)))
    assert big.augment["geometry"]["scale"] < 1.5
    with pytest.raises(Rejected):
        synth(ref, [10, 10, 12, 40], tgt, tgt_box)


# ------------------------------------------------------------------------ the service

@pytest.fixture()
def mined_ctx(service_ctx, sample_media):
    from opensubject_tasks.services.common import run_stage

    ctx = service_ctx
    clips = [c for c in gt_clips(sample_media) if c.video == "rocket_dissolve.mp4"][:1]
    video_id = seed_video(ctx, clips)
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Sample

    res = run_stage(ctx, "mine", video_id)
    assert res.status == "ok" and res.next == [("samples", video_id)], res
    with session_scope(ctx.sessions) as s:
        return ctx, video_id, sorted(x.id for x in s.query(Sample))


def test_synthesize_service_writes_objects_then_rows_idempotently(mined_ctx, tmp_path) -> None:
    from opensubject_tasks.contact_sheet import write_contact_sheet
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import Sample
    from opensubject_tasks.services.common import run_stage
    from opensubject_tasks.storage import Keys

    ctx, video_id, sample_ids = mined_ctx
    sid = sample_ids[0]
    res = run_stage(ctx, "synthesize", sid)
    assert res.status == "ok" and res.next == [("verify", sid)]
    with session_scope(ctx.sessions) as s:
        row = s.get(Sample, sid)
        assert row.state == "synthesized"
        assert row.keys == {n: Keys.sample_file(video_id, sid, 1, f"{n}.png") for n in SAMPLE_IMAGES}
        assert row.backends["segmenter"] == "classical" and row.backends["inpainter"] == "classical"
        assert row.augment["seed"] == row.seed and "matrix" in row.augment["geometry"]
        keys = dict(row.keys)
    first = {k: ctx.store.get_bytes(k) for k in keys.values()}
    prefix = f"videos/{video_id}/samples/"
    n_objects = len(list(ctx.store.list(prefix)))
    assert n_objects == len(SAMPLE_IMAGES)

    # re-running the same attempt: same keys, same bytes, no new object, one row
    with session_scope(ctx.sessions) as s:
        s.get(Sample, sid).state = "pending"     # as if the first run died before its row update
    again = run_stage(ctx, "synthesize", sid)
    assert again.status == "ok"
    assert {k: ctx.store.get_bytes(k) for k in keys.values()} == first
    assert len(list(ctx.store.list(prefix))) == n_objects
    with session_scope(ctx.sessions) as s:
        assert s.scalar(select(func.count()).select_from(Sample).where(Sample.id == sid)) == 1
        assert s.get(Sample, sid).keys == keys

    # a redelivered message for a finished sample changes nothing
    with session_scope(ctx.sessions) as s:
        s.get(Sample, sid).state = "verified"
    assert run_stage(ctx, "synthesize", sid).next == []

    # masks are stored as 0/255 PNGs of the images' sizes
    mask = cv2.imdecode(np.frombuffer(first[keys["generation_mask"]], np.uint8), cv2.IMREAD_UNCHANGED)
    gen = cv2.imdecode(np.frombuffer(first[keys["generation_input"]], np.uint8), cv2.IMREAD_COLOR)
    assert mask.shape == gen.shape[:2] and set(np.unique(mask)) <= {0, 255}

    for other in sample_ids[1:]:
        assert run_stage(ctx, "synthesize", other).status == "ok"
    sheet = write_contact_sheet(ctx, tmp_path / "sheet.png", limit=8)
    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[1] == 5 * 200
    assert img.shape[0] > len(sample_ids) * 200

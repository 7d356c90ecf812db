"""The classical backends (OpenCV/numpy, no weights) on controlled synthetic scenes:
real photographs, a camera that pans and zooms, subjects that move, grow and turn."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from mining_fixtures import BORDER, ONE_CAT, TWO_SUBJECTS, iou, make_clip
from opensubject_tasks.backends.base import Detector, Embedder, Inpainter, Segmenter
from opensubject_tasks.backends.registry import get_backend

RUNTIME = {"device": "cpu", "dtype": "auto", "batch_size": 4}


def backend(interface: str, name: str = "classical"):
    return get_backend(interface, name, **RUNTIME)


@pytest.fixture(scope="module")
def panning_clip():
    return make_clip(ONE_CAT)


@pytest.fixture(scope="module")
def two_subject_clip():
    return make_clip(TWO_SUBJECTS, scene="hubble")


# ------------------------------------------------------------------------------ registry

def test_backends_are_registered_and_ignore_runtime_options() -> None:
    assert isinstance(backend("detector"), Detector)
    assert isinstance(backend("segmenter"), Segmenter)
    assert isinstance(backend("inpainter"), Inpainter)
    assert isinstance(backend("embedder"), Embedder)
    assert backend("vlm", "none").name == "none"
    # options reach the constructor; a misspelt option is an error, not ignored
    assert get_backend("inpainter", "classical", radius=3, **RUNTIME).radius == 3
    with pytest.raises(TypeError):
        get_backend("inpainter", "classical", radiuss=3, **RUNTIME)


# ----------------------------------------------------------------------------------- VLM

def test_no_vlm_never_pretends_to_see() -> None:
    vlm = backend("vlm", "none")
    img = data.chelsea()
    cats = vlm.list_categories([img, img])
    assert [c.categories for c in cats] == [[], []]
    assert all(c.error == "no VLM configured" for c in cats)
    answers = vlm.ask_yes_no([[img]], ["Is this a cat?"])
    assert answers[0].answer is None and answers[0].p_yes is None
    h, w = img.shape[:2]
    # captions from the pixels and the facts it is told (the same template as the pipeline's)
    caps = vlm.caption([img, img], [{"category": "cat", "box": [0, 0, w / 3, h]}, {}])
    assert all(c.source == "template" for c in caps)
    assert caps[0].short.endswith(" cat") and "left" in caps[0].long
    assert caps[1].short.endswith(" object")
    assert "cat" not in caps[1].long  # nothing it was not told


# ------------------------------------------------------------------------------ detector

def _hits(clip, dets, track_of=None):
    """(frames where a detection matches the subject with IoU >= 0.5, tracks of those)."""
    hits, tracks = {}, {}
    for k, gt in enumerate(clip.boxes):
        for subj, box in gt.items():
            best = max(dets[k], key=lambda d: iou(box, d.box), default=None)
            if best is not None and iou(box, best.box) >= 0.5:
                hits.setdefault(subj, []).append(k)
                tracks.setdefault(subj, set()).add(best.track)
    return hits, tracks


def test_detector_finds_a_moving_subject_under_pan_and_zoom(panning_clip) -> None:
    dets = backend("detector").detect(panning_clip.frames, [])
    hits, tracks = _hits(panning_clip, dets)
    assert len(hits[0]) >= 5, hits            # of 6 keyframes
    assert len(tracks[0]) == 1, tracks         # one identity across keyframes
    assert all(d.category == "object" for fd in dets for d in fd)
    assert all(0 <= d.score <= 1 for fd in dets for d in fd)


def test_detector_separates_two_subjects(two_subject_clip) -> None:
    dets = backend("detector").detect(two_subject_clip.frames, [])
    hits, tracks = _hits(two_subject_clip, dets)
    assert len(hits.get(0, [])) >= 4 and len(hits.get(1, [])) >= 4, hits
    assert tracks[0].isdisjoint(tracks[1])


def test_detector_finds_nothing_in_a_scene_without_subject() -> None:
    empty = make_clip([], pan=(0.2, 0.1), zoom=1.2)
    assert backend("detector").detect(empty.frames, []) == [[] for _ in empty.frames]
    assert backend("detector").detect([], []) == []


def test_detector_is_deterministic(panning_clip) -> None:
    det = backend("detector")
    a = det.detect(panning_clip.frames, [])
    b = det.detect(panning_clip.frames, [])
    assert [[(d.box, d.score, d.track) for d in fd] for fd in a] == \
           [[(d.box, d.score, d.track) for d in fd] for fd in b]


# ----------------------------------------------------------------------------- segmenter

def test_grabcut_segments_the_subject_inside_its_box(panning_clip) -> None:
    seg = backend("segmenter")
    k = 3
    box = panning_clip.boxes[k][0]
    truth = panning_clip.masks[k][0]
    mask = seg.segment([panning_clip.frames[k]], [box])[0]
    assert mask.dtype == bool and mask.shape == truth.shape
    inter, union = (mask & truth).sum(), (mask | truth).sum()
    assert inter / union >= 0.75, inter / union
    x0, y0, x1, y1 = (int(v) for v in box)
    outside = mask.copy()
    outside[y0:y1 + 1, x0:x1 + 1] = False
    assert not outside.any()                               # never outside the box
    assert np.array_equal(mask, seg.segment([panning_clip.frames[k]], [box])[0])  # deterministic


def test_grabcut_handles_degenerate_boxes() -> None:
    seg = backend("segmenter")
    img = data.astronaut()
    empty, whole, off = seg.segment([img] * 3, [[10, 10, 10.5, 200], [0, 0, 512, 512], [600, 600, 700, 700]])
    assert not empty.any() and not off.any()
    assert whole.any()


# ----------------------------------------------------------------------------- inpainter

def test_inpainter_keeps_known_pixels_and_is_seeded() -> None:
    inp = backend("inpainter")
    img = data.astronaut()
    box = np.zeros(img.shape[:2], bool)
    box[120:300, 160:360] = True
    a, b, c = inp.inpaint([img, img, img], [box, box, box], ["", "", ""], [1, 1, 2])
    assert np.array_equal(a[~box], img[~box])            # outside the mask: untouched
    assert np.array_equal(a, b)                           # same seed, same pixels
    assert not np.array_equal(a[box], c[box])             # the seed matters
    assert not np.array_equal(a[box], img[box])           # the region was filled


def test_inpainter_continues_smooth_surroundings() -> None:
    inp = backend("inpainter")
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    img = np.stack([xx, yy, 255 - xx], axis=-1).astype(np.uint8)  # a smooth colour ramp
    hole = np.zeros(img.shape[:2], bool)
    hole[80:180, 60:200] = True
    out = inp.inpaint([img], [hole], [""], [0])[0]
    truth = img[hole].astype(float)
    err = np.abs(out[hole].astype(float) - truth).mean()
    flat = np.abs(truth - truth.mean(axis=0)).mean()      # the best single-colour fill
    assert err < 0.5 * flat, (err, flat)


def test_inpainter_outpaints_around_a_subject_and_edge_cases() -> None:
    inp = backend("inpainter")
    img = data.chelsea()
    keep = np.zeros(img.shape[:2], bool)
    cv2.ellipse(keep.view(np.uint8), (220, 150), (70, 60), 0, 0, 360, 1, -1)
    out = inp.inpaint([img], [~keep], [""], [3])[0]
    assert np.array_equal(out[keep], img[keep])
    assert out[~keep].std() > 2                            # texture, not a flat colour
    nothing = inp.inpaint([img], [np.zeros_like(keep)], [""], [3])[0]
    assert np.array_equal(nothing, img)
    everything = inp.inpaint([img], [np.ones_like(keep)], [""], [3])[0]
    assert everything.shape == img.shape


# ------------------------------------------------------------------------------ embedder

def test_embedder_vectors_are_unit_length_and_identity_aware(panning_clip, two_subject_clip) -> None:
    emb = backend("embedder")

    def crops(clip, subj):
        out = []
        for frame, boxes in zip(clip.frames, clip.boxes, strict=True):
            x0, y0, x1, y1 = (int(v) for v in boxes[subj])
            out.append(frame[y0:y1, x0:x1])
        return out

    cat, rocket = crops(two_subject_clip, 0), crops(two_subject_clip, 1)
    vec = emb.embed(cat + rocket)
    assert vec.shape[0] == 12 and vec.dtype == np.float32
    assert np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    sim = vec @ vec.T
    same = [sim[i, j] for i in range(6) for j in range(6) if i != j] + \
           [sim[i, j] for i in range(6, 12) for j in range(6, 12) if i != j]
    other = [sim[i, j] for i in range(6) for j in range(6, 12)]
    assert min(same) > max(other), (min(same), max(other))
    # flipped and rescaled views of one subject stay close
    view = cat[2]
    flipped = cv2.resize(view[:, ::-1], None, fx=0.6, fy=0.6)
    a, b = emb.embed([view, flipped])
    assert float(a @ b) > 0.9
    assert np.array_equal(emb.embed([view]), emb.embed([view]))
    assert emb.embed([np.zeros((1, 1, 3), np.uint8)]).shape == (1, vec.shape[1])
    assert emb.embed([]).shape == (0, vec.shape[1])


def test_detector_subject_on_the_border_is_still_boxed() -> None:
    clip = make_clip(BORDER)
    dets = backend("detector").detect(clip.frames, [])
    hits, _ = _hits(clip, dets)
    assert len(hits.get(0, [])) >= 3


def test_the_registry_refuses_a_second_backend_under_a_taken_name():
    import pytest

    from opensubject_tasks.backends.registry import register

    @register("embedder", "registry-test-one")
    def first(**_):  # noqa: ANN003, ANN202
        return None

    register("embedder", "registry-test-one")(first)  # the same factory again: fine
    with pytest.raises(ValueError, match="registered already"):
        @register("embedder", "registry-test-one")
        def second(**_):  # noqa: ANN003, ANN202
            return None


def test_asking_for_one_classical_backend_imports_only_its_module():
    """A curation run asks for the quality scorer alone: it must not pay for SciPy and
    scikit-image, which only the detector needs; every classical backend is still found."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from opensubject_tasks.backends.registry import available, get_backend\n"
            "get_backend('quality', 'classical')\n"
            "print(sorted(m for m in ('scipy', 'skimage') if m in sys.modules))\n"
            "print([i for i in ('detector', 'segmenter', 'inpainter', 'embedder', 'verifier', 'quality')"
            " if 'classical' not in available(i)] + ([] if 'none' in available('vlm') else ['vlm']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "[]"]

"""The `small` profile (real small models on a CPU): its wiring, and each of its backends
through the same classes and code paths on tiny randomly initialised versions of its
models (Florence-2, SAM, a latent-consistency Stable Diffusion, DINOv2), offline."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from opensubject_tasks.backends import VLM, Detector, Embedder, Inpainter, Segmenter
from opensubject_tasks.backends.hf.florence import NO_QUESTIONS, FlorenceDetector, FlorenceVLM
from opensubject_tasks.config import PROFILE_OPTIONS, load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.weights import required_weights

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ctx(tiny_models, tmp_path_factory) -> Context:
    """The small profile, each model option pointed at its tiny stand-in (and sized for it)."""
    tmp = tmp_path_factory.mktemp("small")
    florence = {"model": str(tiny_models["florence"]), "max_new_tokens": 24, "num_beams": 1, "batch_size": 2}
    settings = load_settings(
        profile="small", database_url=f"sqlite:///{tmp / 'db.sqlite'}",
        store={"kind": "local", "local_root": str(tmp / "store")},
        backends={"options": {"vlm": florence, "detector": florence,
                              "segmenter": {"model": str(tiny_models["segmenter"])},
                              "inpainter": {"model": str(tiny_models["lcm_inpainter"]), "resolution": 64},
                              "embedder": {"model": str(tiny_models["dinov2"])}}})
    return Context.from_settings(settings)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    out = []
    for h, w in ((90, 120), (90, 120), (64, 64)):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[h // 4: h // 2, w // 4: w // 2] = (30, 160, 60)
        out.append(img)
    return out


def test_profile_names_small_real_models_and_keeps_user_options() -> None:
    s = load_settings(profile="small")
    b = s.backends
    assert (b.vlm, b.detector, b.segmenter, b.inpainter, b.embedder, b.quality, b.verifier, b.device) == (
        "florence", "florence", "hf", "hf", "hf", "classical", "classical", "cpu")
    assert b.options["inpainter"]["model"] == "SimianLuo/LCM_Dreamshaper_v7" and b.options["inpainter"]["steps"] == 4
    mine = load_settings(profile="small", backends={"options": {"inpainter": {"steps": 6}}})
    assert mine.backends.options["inpainter"] == {**PROFILE_OPTIONS["small"]["inpainter"], "steps": 6}
    repos = {w.repo: w.interfaces for w in required_weights(s)}
    assert repos == {"florence-community/Florence-2-base": ["vlm", "detector"],
                     "facebook/sam-vit-base": ["segmenter"], "SimianLuo/LCM_Dreamshaper_v7": ["inpainter"],
                     "facebook/dinov2-small": ["embedder"]}


def test_florence_names_and_captions_through_the_vlm_interface(ctx, frames) -> None:
    vlm = ctx.backend("vlm")
    assert isinstance(vlm, FlorenceVLM) and isinstance(vlm, VLM)
    got = vlm.list_categories(frames)              # 3 frames with batch_size 2: two generate calls
    assert len(got) == 3
    for c in got:    # random weights: whatever was generated was screened, refused words recorded
        assert c.error is None and all(c.categories + c.rejected) is not None
        assert all(" (" in r for r in c.rejected)
    caps = vlm.caption(frames[:2], [{"category": "dog"}, {}])
    assert [c.source for c in caps] == [vlm.name] * 2
    assert not any("<loc_" in c.short + c.long for c in caps)   # the model's location tokens are no words
    yn = vlm.ask_yes_no([[frames[0]]], ["Is this a dog?"])
    assert yn[0].answer is None and yn[0].raw == NO_QUESTIONS   # it cannot answer: said, not guessed


def test_florence_detector_shares_the_model_and_parses_boxes(ctx, frames) -> None:
    det, vlm = ctx.backend("detector"), ctx.backend("vlm")
    assert isinstance(det, FlorenceDetector) and isinstance(det, Detector)
    assert det.model is vlm.model                   # one Florence-2 in memory for both interfaces
    out = det.detect(frames, ["dog", "cat"])
    assert len(out) == 3 and all(isinstance(d, list) for d in out)
    assert len(det.detect(frames[:1], [])) == 1     # no categories: region proposals
    # what a trained model replies, through the real processor's parser
    proc = det.processor
    text = "</s><s>dog<loc_100><loc_200><loc_500><loc_900>dog<loc_110><loc_210><loc_505><loc_890></s>"
    parsed = proc.post_process_generation(text=text, task="<OPEN_VOCABULARY_DETECTION>", image_size=(120, 90))
    dets = det.detections([parsed["<OPEN_VOCABULARY_DETECTION>"]], ["dog"], 120, 90)
    assert len(dets) == 1 and dets[0].category == "dog" and dets[0].score == 1.0   # overlapping pair: NMS
    assert dets[0].box == pytest.approx([12, 18, 60, 81], abs=1)
    od = proc.post_process_generation(text="</s><s>Dogs<loc_1><loc_2><loc_300><loc_400>sky<loc_0><loc_0>"
                                           "<loc_999><loc_300></s>", task="<OD>", image_size=(120, 90))
    from opensubject_tasks.backends.categories import screen_categories

    assert screen_categories(od["<OD>"]["labels"]) == (["dog"], ["sky (not a subject)"])


def test_sam_lcm_and_dinov2_through_their_interfaces(ctx, frames) -> None:
    seg = ctx.backend("segmenter")
    assert isinstance(seg, Segmenter)
    mask = seg.segment([frames[0]], [[30, 22, 60, 45]])[0]
    assert mask.shape == frames[0].shape[:2] and mask.dtype == bool

    inp = ctx.backend("inpainter")
    assert isinstance(inp, Inpainter)
    assert type(inp.pipe).__name__ == "StableDiffusionInpaintPipeline"
    assert type(inp.pipe.scheduler).__name__ == "LCMScheduler" and inp.steps == 4
    assert inp.pipe.unet.config.in_channels == 4 and inp.pipe.unet.config.time_cond_proj_dim
    box = np.zeros(frames[0].shape[:2], bool)
    box[20:60, 30:80] = True
    a = inp.inpaint([frames[0]], [box], ["background"], [7])[0]
    b = inp.inpaint([frames[0]], [box], ["background"], [7])[0]
    assert np.array_equal(a[~box], frames[0][~box]) and np.array_equal(a, b)   # kept outside, seeded
    assert (a[box] != frames[0][box]).mean() > 0.5

    emb = ctx.backend("embedder")
    assert isinstance(emb, Embedder) and type(emb.model).__name__ == "Dinov2Model"
    vecs = emb.embed(frames)
    assert vecs.shape == (3, 32) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert ctx.backend("quality").name.startswith("classical") and ctx.backend("verifier").name == "classical"

"""The transformers/diffusers backends through their real code paths, offline on a CPU,
with tiny randomly initialised models built from configs (see backends/hf/tiny.py).

The tiny models' outputs are meaningless; what is checked is everything around them:
loading from a local directory, processors and tokenizers, batching, parsing,
compositing, seeds, errors and the out-of-memory fallback.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from opensubject_tasks.backends import VLM, Detector, Embedder, Inpainter, QualityScorer, Segmenter
from opensubject_tasks.backends.hf import tiny
from opensubject_tasks.backends.hf.common import Batcher, resolve_dtype, resolve_model
from opensubject_tasks.backends.hf.detector import HFDetector
from opensubject_tasks.backends.hf.embedder import HFAestheticScorer, HFEmbedder
from opensubject_tasks.backends.hf.inpainter import HFInpainter
from opensubject_tasks.backends.hf.segmenter import HFSegmenter
from opensubject_tasks.backends.hf.vlm import HFVLM, parse_categories, parse_yes_no
from opensubject_tasks.backends.prompts import load_prompts, prompt_text, prompts_version
from opensubject_tasks.backends.registry import get_backend
from opensubject_tasks.config import load_settings
from opensubject_tasks.errors import ConfigError, ModelNotAvailable

CPU = {"device": "cpu", "dtype": "auto"}
torch.set_num_threads(1)  # as the tiny factories do: tiny layers only lose to thread spin waits
PREFIX = '{"categories": ['


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for h, w in ((120, 160), (120, 160), (90, 90)):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[h // 4: h // 2, w // 4: w // 2] = (200, 40, 40)  # a flat "subject"
        out.append(img)
    return out


@pytest.fixture(scope="module")
def vlm(tiny_models: dict[str, Path]) -> HFVLM:
    return HFVLM(model=str(tiny_models["vlm"]), batch_size=2, name="tiny:vlm",
                 **{**tiny.TINY_DEFAULTS["vlm"], **CPU})


# ----------------------------------------------------------------- tiny models

def test_tiny_models_are_cached_and_deterministic(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    for part, path in tiny_models.items():
        assert path.exists(), part
    before = (tiny_models["clip"] / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_models() == tiny_models  # built once, then reused
    assert (tiny_models["clip"] / "model.safetensors").stat().st_mtime_ns == before
    torch.manual_seed(tiny.SEED)
    tiny.build_clip(tmp_path / "clip")
    assert ((tmp_path / "clip" / "model.safetensors").read_bytes()
            == (tiny_models["clip"] / "model.safetensors").read_bytes())


def test_tiny_profile_gives_every_interface_from_local_dirs(tiny_models: dict[str, Path]) -> None:
    settings = load_settings(profile="tiny")
    b = settings.backends
    expected = {"vlm": VLM, "detector": Detector, "segmenter": Segmenter, "inpainter": Inpainter,
                "embedder": Embedder, "quality": QualityScorer}
    for interface, protocol in expected.items():
        name = getattr(b, interface)
        assert name == "tiny"
        backend = get_backend(interface, name, device=b.device, dtype=b.dtype, batch_size=b.batch_size,
                              **b.options.get(interface, {}))
        assert isinstance(backend, protocol), interface
        assert backend.name.startswith(f"tiny:{interface}")
        assert get_backend(interface, name, device=b.device, dtype=b.dtype, batch_size=b.batch_size) is backend
    assert Path(get_backend("vlm", "tiny", **CPU, batch_size=b.batch_size).path).is_relative_to(
        tiny_models["vlm"].parent)


# ----------------------------------------------------------------- VLM

@pytest.mark.parametrize("raw, categories, error, rejected", [
    ('{"categories": ["dog", "Person", "a red car"]}', ["dog", "person", "car"], None, []),
    ('```json\n{"categories": ["cat"]}\n```', ["cat"], None, []),
    ('Sure! Here they are: {"categories": ["horse"]} Hope this helps.', ["horse"], None, []),
    ('["bicycle", "dog", "dogs", "Dog"]', ["bicycle", "dog"], None, []),
    (PREFIX + '"cat", "dog"', ["cat", "dog"], None, []),          # cut off by the token limit
    ('{"categories": ["People", "teddy bears", "puppies", "boxes", "glasses"]}',
     ["person", "teddy bear", "puppy", "box", "glasses"], None, []),
    ("", [], "empty reply", []),
    ("   ", [], "empty reply", []),
    (PREFIX, [], "empty reply", []),
    ("I see a dog and a cat.", [], "not JSON", []),
    (PREFIX + "[[[[[[[[", [], "not JSON", []),
    ('{"objects": ["dog"]}', [], "no 'categories' list", []),
    ('{"categories": []}', [], None, []),                           # a valid "nothing there"
    ('{"categories": [42, "sky", "background"]}', [], None,
     ["42 (not text)", "sky (not a subject)", "background (not a subject)"]),
    ('{"categories": ["dog", "a very long description of a thing"]}', ["dog"], None,
     ["very long description of a thing (not a short noun)"]),
])
def test_parse_categories(raw: str, categories: list[str], error: str | None, rejected: list[str]) -> None:
    got = parse_categories(raw, prefix=PREFIX)
    assert got.categories == categories
    assert got.raw == raw
    assert got.rejected == rejected
    if error is None:
        assert got.error is None
    else:
        assert got.error is not None and error in got.error


def test_parse_categories_vocabulary_and_limit() -> None:
    got = parse_categories('{"categories": ["dog", "cat", "unicorn"]}', vocabulary=["Dog", "cats"])
    assert got.categories == ["dog", "cat"]
    assert got.rejected == ["unicorn (not in the vocabulary)"] and got.error is None
    got = parse_categories('{"categories": ["ant", "bee", "cow", "doe"]}', max_categories=2)
    assert got.categories == ["ant", "bee"] and got.error is None


@pytest.mark.parametrize("reply, answer", [
    ("Yes", True), ("yes.", True), (" YES, it is", True), ("No", False), ("no, it isn't", False),
    ("", None), ("maybe", None), ("\n\n\n", None), ("Not sure", None), ("yesterday", None),
])
def test_parse_yes_no(reply: str, answer: bool | None) -> None:
    assert parse_yes_no(reply) is answer


def test_tiny_vlm_malformed_category_reply_is_recorded(vlm: HFVLM, frames: list[np.ndarray]) -> None:
    from transformers import ProcessorMixin

    assert isinstance(vlm.processor, ProcessorMixin)  # the image-only processor or the full one
    got = vlm.list_categories(frames)  # 3 images with batch_size 2: two generate calls
    assert len(got) == 3
    for c in got:
        assert c.raw.startswith(PREFIX)             # the forced JSON opening
        assert c.error, c                           # random weights never give valid JSON
        assert parse_categories(c.raw, prefix=PREFIX).error == c.error
    assert vlm.name.endswith(f"+prompts@{prompts_version()}")


def test_tiny_vlm_yes_no_uses_first_token_logits(vlm: HFVLM, frames: list[np.ndarray]) -> None:
    got = vlm.ask_yes_no([[frames[0]], [frames[1], frames[2]]],
                         ["Is there a dog?", "Are these the same dog? Answer yes or no."])
    assert len(got) == 2
    for yn in got:
        assert 0.0 < yn.p_yes < 1.0
        assert yn.answer is parse_yes_no(yn.raw)
    vlm.batcher.batch_size = 1  # left padding: a batched turn scores as it does alone
    try:
        alone = vlm.ask_yes_no([[frames[0]], [frames[1], frames[2]]],
                               ["Is there a dog?", "Are these the same dog? Answer yes or no."])
    finally:
        vlm.batcher.batch_size = 2
    assert [a.p_yes for a in alone] == pytest.approx([g.p_yes for g in got], abs=1e-4)
    assert vlm.yes_ids and vlm.no_ids and not vlm.yes_ids & vlm.no_ids
    logits = torch.zeros(vlm.model.config.text_config.vocab_size)
    logits[sorted(vlm.yes_ids)] = 6.0
    assert vlm.p_yes(logits) > 0.99
    logits[sorted(vlm.no_ids)] = 9.0
    assert vlm.p_yes(logits) < 0.1


def test_tiny_vlm_caption_and_answer(vlm: HFVLM, frames: list[np.ndarray]) -> None:
    caps = vlm.caption(frames[:2], [{"category": "dog"}, {}])
    assert [c.source for c in caps] == [vlm.name] * 2
    assert all(isinstance(c.short, str) and isinstance(c.long, str) for c in caps)
    answers = vlm.answer([[frames[0], frames[2]]], ["Compare the two images."])
    assert len(answers) == 1 and isinstance(answers[0], str)
    with pytest.raises(ValueError):
        vlm.caption(frames[:2], [{}])


def test_tiny_vlm_answer_as_one_user_turn_text_first(vlm: HFVLM, frames: list[np.ndarray]) -> None:
    """The released OSBench request: no system turn, the text before the images; the
    token ids the model gets follow that order (the chat template renders it)."""
    rendered: list[str] = []
    real = vlm.processor.apply_chat_template

    def spy(messages, **kw):  # noqa: ANN001, ANN003 - the processor's own signature
        rendered.append(real(messages, **kw))
        return rendered[-1]

    vlm.processor.apply_chat_template = spy
    try:
        vlm.answer([[frames[0]]], ["Rate it."], max_new_tokens=3, system=False, text_first=True)
        vlm.answer([[frames[0]]], ["Rate it."], max_new_tokens=3)
    finally:
        vlm.processor.apply_chat_template = real
    released, default = rendered
    system = prompt_text("system")
    assert system not in released and system in default
    assert released.index("Rate it.") < released.index("<|vision_start|>")
    assert default.index("<|vision_start|>") < default.index("Rate it.")


def test_prompts_file_is_versioned() -> None:
    data = load_prompts()
    assert str(data["version"]) == prompts_version()
    assert '{"categories"' in prompt_text("list_categories")
    assert "dog" in prompt_text("caption_short", hints=prompt_text("hints", facts="category: dog"))
    with pytest.raises(ConfigError, match="needs a value"):
        prompt_text("caption_short")


# ----------------------------------------------------------------- detector, segmenter

def test_tiny_detector_batches_frames(tiny_models: dict[str, Path], frames: list[np.ndarray]) -> None:
    det = HFDetector(model=str(tiny_models["detector"]), batch_size=2, max_detections=5,
                     **{**tiny.TINY_DEFAULTS["detector"], **CPU})
    got = det.detect(frames, ["Dog", "cat", "dog"])
    assert len(got) == 3 and any(got)
    for frame, dets in zip(frames, got, strict=True):
        h, w = frame.shape[:2]
        assert len(dets) <= 5
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        for d in dets:
            assert d.category in {"dog", "cat"} and d.score >= det.threshold
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert det.detect(frames, ["Dog", "cat", "dog"]) == got  # deterministic
    proposals = det.detect(frames[:1], [])
    assert proposals[0] and {d.category for d in proposals[0]} == {"object"}


def test_tiny_grounding_dino_maps_phrases_to_categories(tiny_models: dict[str, Path],
                                                        frames: list[np.ndarray]) -> None:
    det = HFDetector(model=str(tiny_models["grounding_dino"]), batch_size=2, threshold=0.0,
                     text_threshold=0.0, max_detections=4, **CPU)
    assert det.grounding
    got = det.detect(frames, ["cat", "red car"])
    assert len(got) == 3 and all(got)
    for frame, dets in zip(frames, got, strict=True):
        h, w = frame.shape[:2]
        assert len(dets) <= 4
        for d in dets:
            assert d.category in {"cat", "red car"}
            assert 0 <= d.box[0] < d.box[2] <= w and 0 <= d.box[1] < d.box[3] <= h


def test_tiny_segmenter_box_prompts(tiny_models: dict[str, Path], frames: list[np.ndarray]) -> None:
    seg = HFSegmenter(model=str(tiny_models["segmenter"]), batch_size=3, **CPU)
    boxes = [[40, 30, 80, 60], [0, 0, 160, 120], [500, 500, 600, 600]]  # the last is off the image
    masks = seg.segment(frames, boxes)
    assert [m.shape for m in masks] == [f.shape[:2] for f in frames]
    assert all(m.dtype == bool for m in masks)
    assert masks[0].any() or masks[1].any()
    assert not masks[2].any()
    seg.batcher.batch_size = 1  # one at a time gives the same masks
    for a, b in zip(seg.segment(frames, boxes), masks, strict=True):
        assert np.array_equal(a, b)
    # a box prompt asks SAM for one mask, not three candidates to choose from
    seen: list[int] = []
    hook = seg.model.register_forward_hook(lambda _m, _a, out: seen.append(out.pred_masks.shape[2]))
    try:
        seg.segment(frames[:1], boxes[:1])
    finally:
        hook.remove()
    assert seen == [1]


# ----------------------------------------------------------------- inpainter

def test_tiny_inpainter_keeps_outside_and_honours_seeds(tiny_models: dict[str, Path],
                                                        frames: list[np.ndarray]) -> None:
    inp = HFInpainter(model=str(tiny_models["inpainter"]), batch_size=4,
                      **{**tiny.TINY_DEFAULTS["inpainter"], **CPU})
    masks = []
    for f in frames:
        m = np.zeros(f.shape[:2], bool)
        m[10:60, 20:70] = True
        masks.append(m)
    masks[2] = np.zeros(frames[2].shape[:2], bool)  # nothing to fill
    out = inp.inpaint(frames, masks, ["a dog", "a dog", "x"], [1, 1, 3])
    for src, m, res in zip(frames, masks, out, strict=True):
        assert res.shape == src.shape and res.dtype == np.uint8
        assert np.array_equal(res[~m], src[~m])  # outside the mask: exactly the input
    assert (out[0][masks[0]] != frames[0][masks[0]]).mean() > 0.5
    assert np.array_equal(out[2], frames[2])
    again = inp.inpaint(frames[:1], masks[:1], ["a dog"], [1])[0]
    other = inp.inpaint(frames[:1], masks[:1], ["a dog"], [2])[0]
    assert np.array_equal(again, out[0])  # same seed, same pixels
    assert not np.array_equal(other, out[0])
    with pytest.raises(ValueError, match="does not match"):
        inp.inpaint(frames[:1], [np.zeros((5, 5), bool)], ["x"], [0])


# ----------------------------------------------------------------- embedder, quality

def test_tiny_embedder_unit_vectors(tiny_models: dict[str, Path], frames: list[np.ndarray]) -> None:
    emb = HFEmbedder(model=str(tiny_models["clip"]), batch_size=2, **CPU)
    vecs = emb.embed(frames + [frames[0]])
    assert vecs.shape == (4, 16) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vecs[0], vecs[3], atol=1e-5)
    assert emb.embed([]).shape == (0, 16)


def test_tiny_aesthetic_scores_and_missing_head(tiny_models: dict[str, Path], frames: list[np.ndarray],
                                                tmp_path: Path) -> None:
    q = HFAestheticScorer(model=str(tiny_models["clip"]), head=str(tiny_models["aesthetic_head.safetensors"]),
                          batch_size=2, score_range=(-1.0, 1.0), **CPU)
    got = q.score([frames[:2], frames[2:], []])
    assert len(got) == 3
    per_frame = q.frame_scores(frames)
    assert got[0].metrics["aesthetic"] == pytest.approx(float(per_frame[:2].mean()), abs=1e-5)
    assert got[0].score == pytest.approx(float(np.clip((per_frame[:2].mean() + 1) / 2, 0, 1)), abs=1e-5)
    assert got[2].metrics["frames"] == 0.0
    with pytest.raises(ModelNotAvailable, match="aesthetic head weights"):
        HFAestheticScorer(model=str(tiny_models["clip"]), head=None, **CPU)
    with pytest.raises(ModelNotAvailable, match="do not exist"):
        HFAestheticScorer(model=str(tiny_models["clip"]), head=str(tmp_path / "nope.pth"), **CPU)
    wrong = tmp_path / "head768.pth"
    torch.save({"layers.0.weight": torch.zeros(1, 768), "layers.0.bias": torch.zeros(1)}, wrong)
    with pytest.raises(ModelNotAvailable, match="768 inputs but gets 16"):
        HFAestheticScorer(model=str(tiny_models["clip"]), head=str(wrong), **CPU)


# ----------------------------------------------------------------- loading, devices, OOM

def test_missing_model_says_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable) as err:
        HFVLM(model=str(tmp_path / "qwen"), **CPU)
    assert str(tmp_path / "qwen") in str(err.value)
    assert f"hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir {tmp_path / 'qwen'}" in str(err.value)
    with pytest.raises(ModelNotAvailable) as err:
        get_backend("detector", "hf", model="opensubject-absent/owl-none", batch_size=2, **CPU)
    assert "hf download opensubject-absent/owl-none" in str(err.value)
    assert "not in the local Hugging Face cache" in str(err.value)
    with pytest.raises(ModelNotAvailable, match="hf download Qwen/Qwen2.5-VL-7B-Instruct"):
        get_backend("vlm", "hf", batch_size=1, **CPU)  # the default model id, not cached here
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        resolve_model("./models/absent", "google/owlv2-large-patch14-ensemble", "detector")


def test_incomplete_model_dir_is_not_available(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ModelNotAvailable, match="could not be loaded"):
        HFEmbedder(model=str(tmp_path), **CPU)


def test_bf16_paths_as_on_a_gpu(tiny_models: dict[str, Path], vlm: HFVLM, frames: list[np.ndarray]) -> None:
    """GPUs run bf16: pixels follow the model's dtype, SAM's boxes and outputs stay float32."""
    bf16 = {"device": "cpu", "dtype": "bf16"}
    seg = HFSegmenter(model=str(tiny_models["segmenter"]), **bf16)
    assert seg.model.dtype == torch.bfloat16
    masks = seg.segment(frames[:2], [[40, 30, 80, 60]] * 2)
    assert [m.shape for m in masks] == [f.shape[:2] for f in frames[:2]]
    det = HFDetector(model=str(tiny_models["detector"]), threshold=0.05, **bf16)
    assert all(isinstance(d.score, float) for dets in det.detect(frames[:2], ["cat"]) for d in dets)
    emb = HFEmbedder(model=str(tiny_models["clip"]), **bf16)
    vecs = emb.embed(frames[:2])
    assert vecs.dtype == np.float32 and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)
    half_vlm = HFVLM(model=str(tiny_models["vlm"]), max_new_tokens=4, max_image_side=112, **bf16)
    yn = half_vlm.ask_yes_no([[frames[0]]], ["Is there a dog?"])[0]
    assert 0.0 < yn.p_yes < 1.0


def test_dtype_and_device_resolution() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA"):
            HFEmbedder(model="unused", device="cuda")


def _oom_above(limit: int, calls: list[int]):
    """A callable that fails like a GPU out of memory when given more than `limit` items."""
    def fn(chunk: list[int]) -> list[int]:
        calls.append(len(chunk))
        if len(chunk) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in chunk]
    return fn


def test_batcher_halves_on_out_of_memory() -> None:
    calls: list[int] = []
    b = Batcher(8)
    assert b.map(_oom_above(2, calls), list(range(11))) == [x * 10 for x in range(11)]
    assert calls == [8, 4, 2, 2, 2, 2, 2, 1]
    assert b.batch_size == 2  # kept for the next call
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Batcher(4).map(_oom_above(0, []), [1, 2])  # still out of memory at one item
    with pytest.raises(ValueError):  # anything else is not retried
        Batcher(4).map(lambda chunk: [int("x")], [1, 2])
    calls.clear()
    plain = RuntimeError("CUDA error: out of memory")  # how older kernels report it
    def old_style(chunk):
        calls.append(len(chunk))
        if len(chunk) > 1:
            raise plain
        return chunk
    assert Batcher(3).map(old_style, [1, 2, 3]) == [1, 2, 3] and calls == [3, 1, 1, 1]


def test_backend_survives_out_of_memory(tiny_models: dict[str, Path], frames: list[np.ndarray]) -> None:
    emb = HFEmbedder(model=str(tiny_models["clip"]), batch_size=4, **CPU)
    expected = emb.embed(frames)
    real = emb._embed

    def tight_memory(chunk):  # the GPU holds one image at a time
        if len(chunk) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return real(chunk)

    emb._embed = tight_memory
    assert np.allclose(emb.embed(frames), expected, atol=1e-5)
    assert emb.batch_size == 1


def test_tiny_vlm_takes_extreme_aspect_crops_and_hint_boxes_in_its_pixels(vlm: HFVLM,
                                                                          frames: list[np.ndarray]) -> None:
    """A 1x300 crop (a sliver of a box) is padded, never a failed batch; a caption hint's
    box is given in the pixels the model sees, not the frame's."""
    from opensubject_tasks.backends.hf.vlm import MAX_ASPECT, MIN_SIDE, scale_hint_box

    sliver = np.full((300, 1, 3), 200, np.uint8)
    side, vlm.max_image_side = vlm.max_image_side, 768   # the sliver is seen at full size: 300:1
    try:
        answers = vlm.ask_yes_no([[sliver], [frames[0]], [sliver.transpose(1, 0, 2)]], ["Is it red?"] * 3)
        seen = vlm.vlm_image(sliver)
    finally:
        vlm.max_image_side = side
    assert len(answers) == 3
    assert min(seen.size) >= MIN_SIDE and max(seen.size) / min(seen.size) <= MAX_ASPECT
    assert np.array_equal(np.asarray(seen)[:300, :1], sliver)       # padded right/bottom: same coordinates
    big = np.zeros((1080, 1920, 3), np.uint8)
    scale = vlm.vlm_scale(big)
    assert scale == vlm.max_image_side / 1920
    assert scale_hint_box({"category": "dog", "box": [960, 540, 1920, 1080]}, scale)["box"] == \
        [round(960 * scale), round(540 * scale), vlm.max_image_side, round(1080 * scale)]
    assert vlm.vlm_scale(frames[0]) == 1.0 or max(frames[0].shape[:2]) > vlm.max_image_side

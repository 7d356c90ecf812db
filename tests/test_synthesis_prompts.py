"""Synthesis prompts per inpainting model family (backends/synthesis_prompts.yaml), the
documented per-model defaults, negative prompts reaching the pipeline, replacement
instead of insertion, and a re-synthesis loop that ends."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mining_fixtures import gt_clips, seed_video
from opensubject_tasks.backends import synthesis_prompts as sp
from opensubject_tasks.backends.base import Verdict
from opensubject_tasks.backends.hf import tiny
from opensubject_tasks.backends.registry import register

FAMILIES = ("sd", "sdxl", "flux-fill")


def test_every_family_keeps_the_subject_out_of_what_it_asks_for() -> None:
    for family in FAMILIES:
        out = sp.synthesis_prompt(family, "outpaint", "dog")
        assert out.prompt and "dog" not in out.prompt.lower()      # describes only the surroundings
        rep = sp.synthesis_prompt(family, "replace", "dog", "wooden crate")
        assert "wooden crate" in rep.prompt and "dog" not in rep.prompt.lower()
        assert rep.replacement == "wooden crate" and out.replacement is None
        rem = sp.synthesis_prompt(family, "remove", "dog")
        assert "dog" not in rem.prompt.lower()
        if family == "flux-fill":   # guidance-distilled: takes no negative prompt at all
            assert out.negative == rep.negative == rem.negative == ""
        else:                       # the subject's category is what must not be painted
            assert all("dog" in p.negative for p in (out, rep, rem))
    assert not sp.paints_objects("classical") and all(sp.paints_objects(f) for f in FAMILIES)


def test_documented_defaults_per_model_family() -> None:
    assert sp.family_for("FluxFillPipeline") == "flux-fill"
    assert sp.family_for("StableDiffusionXLInpaintPipeline") == "sdxl"
    assert sp.family_for("StableDiffusionInpaintPipeline") == "sd"
    assert sp.defaults("flux-fill") == {"steps": 50, "guidance_scale": 30.0, "strength": 1.0}
    assert sp.defaults("sdxl") == {"steps": 20, "guidance_scale": 8.0, "strength": 1.0}
    assert sp.defaults("sd") == {"steps": 50, "guidance_scale": 7.5, "strength": 1.0}


def test_replacements_are_seeded_and_never_the_subject() -> None:
    rng = np.random.default_rng(0)
    picks = [sp.pick_replacement(rng, "bicycle") for _ in range(200)]
    assert "bicycle" not in picks and len(set(picks)) > 5
    assert sp.pick_replacement(np.random.default_rng(5), "dog") == sp.pick_replacement(np.random.default_rng(5), "dog")


def test_tiny_inpainter_gets_family_defaults_and_per_image_negatives(tmp_path: Path) -> None:
    from opensubject_tasks.backends.hf.inpainter import HFInpainter

    model = tiny.ensure_tiny_models()["inpainter"]
    configured = HFInpainter(model=str(model), device="cpu", dtype="auto", steps=2, resolution=64)
    assert configured.family == "sd" and configured.steps == 2          # configured values win
    assert (configured.guidance_scale, configured.strength) == (7.5, 1.0)  # the rest: documented
    calls: list[dict[str, Any]] = []
    real = configured.pipe.__call__

    def spy(**kwargs: Any) -> Any:   # the real pipeline runs; we only look at what it was given
        calls.append(kwargs)
        return real(**kwargs)

    configured.pipe = _Spied(configured.pipe, spy)
    img = np.full((48, 64, 3), 120, np.uint8)
    mask = np.zeros((48, 64), bool)
    mask[10:30, 10:40] = True
    configured.negative_prompt = "watermark"
    configured.inpaint([img, img], [mask, mask], ["a plain wall", "a crate"], [1, 2], ["dog", ""])
    assert calls[0]["negative_prompt"] == ["dog, watermark", "watermark"]
    assert calls[0]["prompt"] == ["a plain wall", "a crate"] and calls[0]["num_inference_steps"] == 2


def _first_unet_latents(inpainter: Any, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[Any, int]:
    """The latents the UNet denoises at the first step (the pipeline's own, through a
    forward hook on the real UNet) and how many denoising steps ran."""
    seen: list[Any] = []
    hook = inpainter.pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        inpainter.inpaint([image], [mask], ["empty background"], [seed])
    finally:
        hook.remove()
    return seen[0][:, :4], len(seen)


def test_inpainting_starts_from_pure_noise_in_the_mask() -> None:
    """What is masked (the subject to replace or remove, the canvas around an outpainted
    subject) is erased: at the family's default strength the first denoising step sees
    exactly the seed's Gaussian noise (nothing of the input image), and no step is
    skipped. At strength 0.5 (half the steps skipped) the input would survive: there the
    masked pixels are noise before the pipeline sees them."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from opensubject_tasks.backends.hf.inpainter import HFInpainter, erase_masked

    model = tiny.ensure_tiny_models()["inpainter"]
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = (230, 40, 40)               # the subject, inside the mask
    mask = np.zeros((64, 64), bool)
    mask[12:52, 12:52] = True
    for family in FAMILIES:                          # every family erases by default
        assert sp.defaults(family)["strength"] == 1.0
    full = HFInpainter(model=str(model), steps=4, guidance_scale=1.0, resolution=64)
    assert full.strength == 1.0
    latents, calls = _first_unet_latents(full, img, mask, seed=7)
    assert calls == 4                                # the first step is not skipped
    noise = randn_tensor(tuple(latents.shape), generator=torch.Generator("cpu").manual_seed(7),
                         dtype=latents.dtype) * full.pipe.scheduler.init_noise_sigma
    assert torch.equal(latents, noise)               # pure noise, nothing of the image
    assert full.pipe.scheduler.timesteps[0] == max(full.pipe.scheduler.timesteps)

    half = HFInpainter(model=str(model), steps=4, guidance_scale=1.0, resolution=64, strength=0.5)
    latents_half, calls_half = _first_unet_latents(half, img, mask, seed=7)
    assert calls_half == 2 and not torch.equal(latents_half, noise)   # strength < 1 keeps input signal...
    erased = erase_masked(img, mask, 7)              # ...so the masked pixels are noise first
    assert (erased[~mask] == img[~mask]).all()
    assert not (erased[16:48, 16:48] == (230, 40, 40)).all(axis=-1).any()
    assert abs(float(erased[mask].mean()) - 127.5) < 5


class _Spied:
    def __init__(self, pipe: Any, call: Any) -> None:
        self._pipe, self._call = pipe, call

    def __call__(self, **kwargs: Any) -> Any:
        return self._call(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


# --- the re-synthesis loop ---------------------------------------------------------
CALLS: list[tuple[str, str]] = []   # (prompt, negative) of every inpaint call, in order


class RecordingInpainter:
    """The tiny diffusers inpainter (a real pipeline), recording what it was asked."""

    def __init__(self, **options: Any) -> None:
        from opensubject_tasks.backends.hf.inpainter import HFInpainter

        # built here, not through get_backend: the registry's lock is held while we are made
        self.inner = tiny._tiny("inpainter", HFInpainter, options)
        self.name, self.family = "recording:" + self.inner.name, self.inner.family

    def inpaint(self, images, masks, prompts, seeds, negative_prompts=None):  # noqa: ANN001, ANN201
        CALLS.extend(zip(prompts, negative_prompts or [""] * len(prompts), strict=True))
        return self.inner.inpaint(images, masks, prompts, seeds, negative_prompts)


class ExtraCopyVerifier:
    """A scripted stand-in for the VLM's "is there a second <category>?" question about a
    diffusion model that paints what its prompt names: a sample whose outpainting or box
    fill asked for the subject's category gets an extra copy and fails. ``always`` makes
    every attempt fail, as a model that keeps adding one would."""

    name = "scripted-extra-copy"
    always = False

    def verify(self, samples: list[dict[str, Any]], thresholds=None, **_: Any) -> list[Verdict]:  # noqa: ANN001
        out = []
        for s in samples:
            (gen_prompt, _), (fill_prompt, _) = CALLS[-2:]   # this sample's synthesis, just run
            named = s["category"] in gen_prompt.lower() or s["category"] in fill_prompt.lower()
            failed = self.always or named
            out.append(Verdict(passed=not failed, scores={"identity": 1.0},
                               reasons=[f"extra copy: a second {s['category']} was painted"] if failed else [],
                               source=self.name))
        return out


@register("inpainter", "recording-tiny")
def _make_recording(**options: Any) -> RecordingInpainter:
    return RecordingInpainter(**options)


@register("verifier", "scripted-extra-copy")
def _make_scripted(**_: Any) -> ExtraCopyVerifier:
    return ExtraCopyVerifier()


def test_the_scripted_verifier_fails_a_prompt_that_names_the_subject() -> None:
    CALLS[:] = [("a dog in a natural scene", ""), ("background", "")]   # the old outpainting prompt
    v = ExtraCopyVerifier().verify([{"category": "dog"}])[0]
    assert not v.passed and "extra copy" in v.reasons[0]


@pytest.mark.parametrize("always_fails", [False, True])
def test_resynthesis_loop_ends(embedded_settings, sample_media, always_fails: bool, monkeypatch) -> None:
    """The samples unit runs synthesize -> verify -> (re-synthesize ...) until the sample is
    terminal: with
    prompts that never ask for the subject it verifies at once; with a model that always
    adds a copy it is rejected after exactly max_attempts, with every attempt's reason."""
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import session_scope, upgrade
    from opensubject_tasks.db.models import Sample, Subject
    from opensubject_tasks.services.common import run_stage

    monkeypatch.setattr(ExtraCopyVerifier, "always", always_fails)
    settings = embedded_settings
    settings.backends.inpainter, settings.backends.verifier = "recording-tiny", "scripted-extra-copy"
    settings.backends.options = {"inpainter": dict(tiny.TINY_DEFAULTS["inpainter"])}
    settings.verify.max_attempts = 3
    ctx = Context.from_settings(settings)
    upgrade(ctx.engine)
    clips = [c for c in gt_clips(sample_media) if c.video == "rocket_dissolve.mp4"][:1]
    vid = seed_video(ctx, clips)
    assert run_stage(ctx, "mine", vid).next == [("samples", vid)]
    with session_scope(ctx.sessions) as s:   # a named category, as a VLM would give
        for subj in s.query(Subject):
            subj.category = "rocket"
        sid, *others = sorted(x.id for x in s.query(Sample))
        for x in s.query(Sample).filter(Sample.id.in_(others)):   # one sample: its calls are CALLS
            x.state = "rejected"
    CALLS.clear()
    out = run_stage(ctx, "samples", vid)   # synthesize -> verify -> re-synthesize ... in one unit
    assert out.status == "ok" and out.next == [], out   # it ends
    with session_scope(ctx.sessions) as s:
        row = s.get(Sample, sid)
        state, attempt, history, augment = row.state, row.attempt, row.history, row.augment
    assert all("rocket" not in p.lower() and (not n or "rocket" in n) for p, n in CALLS)
    assert augment["prompts"]["family"] == "sd" and augment["replacement"]["object"]
    assert augment["prompts"]["manipulation"]["request"] == "replace"
    if always_fails:
        assert (state, attempt, len(history)) == ("rejected", 3, 3) and len(CALLS) == 6
        assert all("extra copy" in h["reasons"][0] for h in history)
    else:
        assert (state, attempt, len(history)) == ("verified", 1, 1) and len(CALLS) == 2
    ctx.engine.dispose()


def test_replacements_are_screened_by_word_and_kind_not_by_substring() -> None:
    assert sp.same_kind("bag", "backpack") and sp.same_kind("Bags", "suitcase")       # a backpack is a bag
    assert sp.same_kind("book", "stack of books") and sp.same_kind("bike", "bicycle")
    assert sp.same_kind("plant", "potted plant") and sp.same_kind("box", "cardboard box")
    assert not sp.same_kind("car", "cardboard box")                                    # a word, not a substring
    assert not sp.same_kind("cat", "traffic cone") and not sp.same_kind("dog", "backpack")
    rng = np.random.default_rng(1)
    picks = {sp.pick_replacement(rng, "bag") for _ in range(300)}
    assert picks and not picks & {"backpack", "suitcase"}
    assert "cardboard box" in {sp.pick_replacement(rng, "car") for _ in range(300)}

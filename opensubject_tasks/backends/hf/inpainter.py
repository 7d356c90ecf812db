"""Diffusers inpainting (default SDXL inpainting; FLUX-Fill through ``pipeline_class``),
used for box-guided inpainting and mask-guided outpainting alike: it fills the True
pixels of each mask and keeps every other pixel exactly as it was.

Steps, guidance and strength default to what the model family's documentation gives
(synthesis_prompts.yaml: SDXL inpainting 20 / 8.0, FLUX.1 Fill 50 / 30), at full strength
so that nothing under the mask survives; configured values win. A strength configured
below 1 runs on an input whose masked pixels are noise (``erase_masked``)."""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import diffusers
import numpy as np
import torch
from PIL import Image as PILImage

from opensubject_tasks.backends import synthesis_prompts
from opensubject_tasks.backends.base import Image, Mask
from opensubject_tasks.backends.hf.common import HFBackend, to_pil
from opensubject_tasks.backends.registry import register
from opensubject_tasks.errors import ConfigError

DEFAULT_INPAINTER = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"


def working_size(width: int, height: int, resolution: int, multiple: int = 16) -> tuple[int, int]:
    """Size the pipeline runs at: longest side = resolution, both sides multiples of
    ``multiple`` (the latent grid), aspect kept as closely as that allows."""
    scale = resolution / max(width, height)
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))


def erase_masked(image: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
    """The image with its masked pixels replaced by seeded uniform noise: what a pipeline
    that skips its first steps (strength < 1) keeps of the masked input is then noise, never
    the subject or a black canvas."""
    noise = np.random.default_rng(seed).integers(0, 256, image.shape, dtype=np.uint8)
    return np.where(mask[..., None], noise, image)


class HFInpainter(HFBackend):
    interface = "inpainter"
    default_model = DEFAULT_INPAINTER

    def __init__(self, model: str = DEFAULT_INPAINTER, device: str = "cpu", dtype: str = "auto",
                 batch_size: int = 4, steps: int | None = None, guidance_scale: float | None = None,
                 strength: float | None = None, resolution: int = 1024, negative_prompt: str = "",
                 pipeline_class: str | None = None, variant: str | None = None,
                 name: str | None = None) -> None:
        super().__init__(model, device, dtype, batch_size, name)
        self.resolution, self.negative_prompt = resolution, negative_prompt   # negative: added to every call's
        cls = diffusers.AutoPipelineForInpainting
        if pipeline_class:
            cls = getattr(diffusers, pipeline_class, None)
            if cls is None:
                raise ConfigError(f"backends.options.inpainter.pipeline_class: diffusers has no {pipeline_class!r}")
        # variant="fp16" loads the *.fp16.safetensors files (half the download).
        extra = {"variant": variant} if variant else {}
        self.pipe = self.load(cls.from_pretrained, dtype=self.dtype, **extra)
        # Stable Diffusion 1.x pipelines (LCM Dreamshaper of the small profile) carry an NSFW
        # checker whose false positives come back as black images, which would be composited
        # into the mask as the fill: the frames are the corpus's own videos, it is dropped.
        if getattr(self.pipe, "safety_checker", None) is not None:
            self.pipe.safety_checker = None
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._accepts = set(inspect.signature(self.pipe.__call__).parameters)
        self.family = synthesis_prompts.family_for(type(self.pipe).__name__)
        documented = synthesis_prompts.defaults(self.family)
        self.steps = int(steps if steps is not None else documented.get("steps", 50))
        self.guidance_scale = float(guidance_scale if guidance_scale is not None
                                    else documented.get("guidance_scale", 7.5))
        self.strength = float(strength if strength is not None else documented.get("strength", 1.0))

    def inpaint(self, images: Sequence[Image], masks: Sequence[Mask], prompts: Sequence[str],
                seeds: Sequence[int], negative_prompts: Sequence[str] | None = None) -> list[Image]:
        negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(images)
        if not len(images) == len(masks) == len(prompts) == len(seeds) == len(negatives):
            raise ValueError(f"{len(images)} images, {len(masks)} masks, {len(prompts)} prompts, "
                             f"{len(seeds)} seeds, {len(negatives)} negative prompts: one of each per image")
        items = []
        for image, mask, prompt, seed, negative in zip(images, masks, prompts, seeds, negatives, strict=True):
            image, mask = np.asarray(image), np.asarray(mask, bool)
            if mask.shape != image.shape[:2]:
                raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
            negative = ", ".join(n for n in (str(negative or ""), self.negative_prompt) if n)
            items.append((image, mask, str(prompt), int(seed), negative))
        todo = [i for i, it in enumerate(items) if it[1].any()]  # nothing to fill: as is
        filled = self.batcher.map(self._inpaint, [items[i] for i in todo])
        out = [it[0].copy() for it in items]
        for i, im in zip(todo, filled, strict=True):
            out[i] = im
        return out

    def _inpaint(self, chunk: list[tuple[np.ndarray, np.ndarray, str, int, str]]) -> list[Image]:
        # One pipeline call per working size (images of a batch must share it).
        sizes = [working_size(im.shape[1], im.shape[0], self.resolution) for im, *_ in chunk]
        out: list[Image | None] = [None] * len(chunk)
        for size in dict.fromkeys(sizes):
            idx = [i for i, s in enumerate(sizes) if s == size]
            for i, gen in zip(idx, self._call([chunk[i] for i in idx], size), strict=True):
                image, mask = chunk[i][0], chunk[i][1]
                gen = np.asarray(PILImage.fromarray(gen).resize(
                    (image.shape[1], image.shape[0]), PILImage.Resampling.LANCZOS))
                out[i] = np.where(mask[..., None], gen, image)  # outside the mask: untouched
        return out  # type: ignore[return-value]

    def _call(self, group: list[tuple[np.ndarray, np.ndarray, str, int, str]],
              size: tuple[int, int]) -> np.ndarray:
        w, h = size
        if self.strength < 1.0:
            group = [(erase_masked(im, m, s), m, p, s, n) for im, m, p, s, n in group]
        kwargs: dict[str, Any] = {
            "prompt": [p for _, _, p, _, _ in group],
            "image": [to_pil(im).resize(size, PILImage.Resampling.LANCZOS) for im, *_ in group],
            "mask_image": [PILImage.fromarray(m.astype(np.uint8) * 255).resize(size, PILImage.Resampling.NEAREST)
                           for _, m, *_ in group],
            "height": h, "width": w, "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale, "strength": self.strength,
            # FLUX.1 Fill takes no negative prompt: dropped below with the other unknown keywords
            "negative_prompt": [n for *_, n in group],
            # CPU generators: the same seed gives the same noise on any device.
            "generator": [torch.Generator("cpu").manual_seed(s) for _, _, _, s, _ in group],
            "output_type": "np",
        }
        kwargs = {k: v for k, v in kwargs.items() if k in self._accepts}
        with torch.inference_mode():
            result = self.pipe(**kwargs).images
        return (np.clip(np.asarray(result, np.float32), 0, 1) * 255).round().astype(np.uint8)


@register("inpainter", "hf")
def make_hf_inpainter(**options: Any) -> HFInpainter:
    return HFInpainter(**options)

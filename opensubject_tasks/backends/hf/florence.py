"""Florence-2 (default ``florence-community/Florence-2-base``, 0.23 B parameters, MIT
licence) as the VLM and the detector of the ``small`` profile: one small model that
names objects, grounds a category in boxes and captions, fast enough for a CPU.

It is a task-prompted model, not a chat model: categories come from its object
detection task (``<OD>``) and go through the same normalisation and screening as a
chat VLM's list; boxes from open-vocabulary detection (``<OPEN_VOCABULARY_DETECTION>``,
one category per call) or, without categories, region proposals labelled ``object``;
captions from ``<CAPTION>`` and ``<MORE_DETAILED_CAPTION>``. It answers no yes/no
question: ``ask_yes_no`` says so (``answer is None``), never guesses, so the profile
verifies with the classical verifier. Florence-2 gives no box confidence: scores are 1.

The VLM and the detector of one process share a single loaded model.
"""
from __future__ import annotations

import re
import threading
from typing import Any, Sequence

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from opensubject_tasks.backends.base import Caption, CategoryList, Detection, Image, YesNo
from opensubject_tasks.backends.categories import normalise_category, screen_categories
from opensubject_tasks.backends.hf.common import HFBackend, move, to_pil
from opensubject_tasks.backends.hf.detector import nms
from opensubject_tasks.backends.registry import register

DEFAULT_FLORENCE = "florence-community/Florence-2-base"
NO_QUESTIONS = "Florence-2 answers no yes/no questions"
_TOKENS = re.compile(r"<(?:loc_\d+|/?od|/?poly|sep|s|/s|pad)>")   # Florence's own tokens, not words

_SHARED: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_LOCK = threading.Lock()


class _Florence(HFBackend):
    default_model = DEFAULT_FLORENCE

    def __init__(self, model: str = DEFAULT_FLORENCE, device: str = "cpu", dtype: str = "auto",
                 batch_size: int = 8, max_new_tokens: int = 256, num_beams: int = 3,
                 name: str | None = None) -> None:
        super().__init__(model, device, dtype, batch_size, name)
        self.name = name or f"florence:{self.model_id}"
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams
        key = (str(self.path), str(self.device), str(self.dtype))
        with _LOCK:
            if key not in _SHARED:
                processor = self.load(AutoProcessor.from_pretrained)
                net = self.load(AutoModelForImageTextToText.from_pretrained, dtype=self.dtype)
                _SHARED[key] = (processor, net.to(self.device).eval())
        self.processor, self.model = _SHARED[key]

    def run_tasks(self, turns: Sequence[tuple[Image, str, str]]) -> list[Any]:
        """Parsed answers of (image, task token, text input) turns, batched."""
        return self.batcher.map(self._run, list(turns))

    def _run(self, chunk: list[tuple[Image, str, str]]) -> list[Any]:
        images = [to_pil(im) for im, _, _ in chunk]
        prompts = [task + text for _, task, text in chunk]
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        inputs = move(dict(inputs), self.device, self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                      do_sample=False)
        texts = self.processor.batch_decode(out, skip_special_tokens=False)
        return [self.processor.post_process_generation(text=t, task=task, image_size=(im.width, im.height))[task]
                for t, (_, task, _), im in zip(texts, chunk, images, strict=True)]


class FlorenceVLM(_Florence):
    interface = "vlm"

    def __init__(self, *args: Any, max_categories: int = 8, vocabulary: Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_categories = max_categories
        self.allowed = frozenset(normalise_category(v) for v in vocabulary) if vocabulary else None

    def list_categories(self, images: Sequence[Image]) -> list[CategoryList]:
        out = []
        for found in self.run_tasks([(im, "<OD>", "") for im in images]):
            labels = list(found.get("labels", []))
            valid, rejected = screen_categories(labels, self.allowed, self.max_categories)
            out.append(CategoryList(valid, raw="; ".join(labels), rejected=rejected))
        return out

    def ask_yes_no(self, images: Sequence[Sequence[Image]], questions: Sequence[str]) -> list[YesNo]:
        return [YesNo(None, None, raw=NO_QUESTIONS) for _ in questions]

    def answer(self, images: Sequence[Sequence[Image]], prompts: Sequence[str], **_: Any) -> list[str]:
        return ["" for _ in prompts]

    def caption(self, images: Sequence[Image], hints: Sequence[dict[str, Any]]) -> list[Caption]:
        if len(images) != len(hints):
            raise ValueError(f"{len(images)} images for {len(hints)} hints")
        turns = [(im, task, "") for im in images for task in ("<CAPTION>", "<MORE_DETAILED_CAPTION>")]
        texts = self.run_tasks(turns)
        def clean(text: Any) -> str:
            return " ".join(_TOKENS.sub(" ", str(text)).split())

        return [Caption(short=clean(texts[2 * i]), long=clean(texts[2 * i + 1]), source=self.name)
                for i in range(len(images))]


class FlorenceDetector(_Florence):
    interface = "detector"

    def __init__(self, *args: Any, nms_iou: float = 0.5, max_detections: int = 20, min_box_px: float = 4.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nms_iou, self.max_detections, self.min_box_px = nms_iou, max_detections, min_box_px

    def detect(self, frames: Sequence[Image], categories: Sequence[str]) -> list[list[Detection]]:
        queries = list(dict.fromkeys(c.strip().lower() for c in categories if c.strip()))
        if queries:
            turns = [(f, "<OPEN_VOCABULARY_DETECTION>", q) for f in frames for q in queries]
        else:      # class-agnostic proposals, labelled "object" as the interface says
            turns = [(f, "<REGION_PROPOSAL>", "") for f in frames]
        found = self.run_tasks(turns)
        per = max(len(queries), 1)
        return [self.detections(found[i * per:(i + 1) * per], queries or ["object"], *np.asarray(f).shape[1::-1])
                for i, f in enumerate(frames)]

    def detections(self, found: Sequence[dict[str, Any]], categories: Sequence[str], width: int,
                   height: int) -> list[Detection]:
        """One frame's parsed answers (one per category, in order) as detections."""
        dets = []
        for got, category in zip(found, categories, strict=True):
            for box in got.get("bboxes", []):
                x0, y0 = float(np.clip(box[0], 0, width)), float(np.clip(box[1], 0, height))
                x1, y1 = float(np.clip(box[2], 0, width)), float(np.clip(box[3], 0, height))
                if x1 - x0 >= self.min_box_px and y1 - y0 >= self.min_box_px:
                    dets.append(Detection([x0, y0, x1, y1], 1.0, category))
        return nms(dets, self.nms_iou)[:self.max_detections]


@register("vlm", "florence")
def make_florence_vlm(**options: Any) -> FlorenceVLM:
    return FlorenceVLM(**options)


@register("detector", "florence")
def make_florence_detector(**options: Any) -> FlorenceDetector:
    return FlorenceDetector(**options)


__all__ = ["DEFAULT_FLORENCE", "FlorenceDetector", "FlorenceVLM", "NO_QUESTIONS"]

"""Open-vocabulary detection through transformers: OWLv2 / OWL-ViT (default
google/owlv2-large-patch14-ensemble) or Grounding DINO, with the categories as text
queries, batched over the frames of a clip."""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np
import torch
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

from opensubject_tasks.backends.base import Detection, Image
from opensubject_tasks.backends.hf.common import HFBackend, move, to_pil
from opensubject_tasks.backends.registry import register

DEFAULT_DETECTOR = "google/owlv2-large-patch14-ensemble"


def nms(dets: list[Detection], iou: float) -> list[Detection]:
    """Per-category non-maximum suppression (OWL models return overlapping boxes)."""
    kept: list[Detection] = []
    for cat in dict.fromkeys(d.category for d in dets):
        group = [d for d in dets if d.category == cat]
        boxes = [[d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]] for d in group]
        idx = cv2.dnn.NMSBoxes(boxes, [d.score for d in group], 0.0, iou)
        kept.extend(group[int(i)] for i in np.asarray(idx).reshape(-1))
    return sorted(kept, key=lambda d: -d.score)


class HFDetector(HFBackend):
    interface = "detector"
    default_model = DEFAULT_DETECTOR

    def __init__(self, model: str = DEFAULT_DETECTOR, device: str = "cpu", dtype: str = "auto",
                 batch_size: int = 8, threshold: float = 0.2, text_threshold: float = 0.25,
                 nms_iou: float = 0.5, max_detections: int = 20, min_box_px: float = 4.0,
                 name: str | None = None) -> None:
        super().__init__(model, device, dtype, batch_size, name)
        self.threshold = threshold
        self.text_threshold = text_threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections
        self.min_box_px = min_box_px
        self.processor = self.load(AutoProcessor.from_pretrained)
        self.model = self.load(AutoModelForZeroShotObjectDetection.from_pretrained, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.model_type = self.model.config.model_type
        self.grounding = self.model_type in ("grounding-dino", "mm-grounding-dino")

    def detect(self, frames: Sequence[Image], categories: Sequence[str]) -> list[list[Detection]]:
        # No categories: class-agnostic proposals, labelled "object" as the interface says.
        queries = list(dict.fromkeys(c.strip().lower() for c in categories if c.strip())) or ["object"]
        return self.batcher.map(lambda chunk: self._detect(chunk, queries), list(frames))

    def _detect(self, frames: list[Image], queries: list[str]) -> list[list[Detection]]:
        images = [to_pil(f) for f in frames]
        n = len(images)
        if self.grounding:  # one lowercase text, phrases ended by "."
            inputs = self.processor(images=images, text=[". ".join(queries) + "."] * n,
                                    return_tensors="pt", padding=True)
        else:
            inputs = self.processor(text=[queries] * n, images=images, return_tensors="pt",
                                    padding=True, truncation=True)
        inputs = move(dict(inputs), self.device, self.dtype)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        if self.model_type == "owlv2":
            # OWLv2 pads each image to a square at the bottom/right: boxes are relative to it.
            sizes = [(max(im.height, im.width),) * 2 for im in images]
        else:
            sizes = [(im.height, im.width) for im in images]
        outputs = _to_float(outputs)
        if self.grounding:
            results = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=self.threshold,
                text_threshold=self.text_threshold, target_sizes=sizes)
        else:
            results = self.processor.post_process_grounded_object_detection(
                outputs, threshold=self.threshold, target_sizes=sizes, text_labels=[queries] * n)
        return [self._collect(r, im.width, im.height, queries) for r, im in zip(results, images, strict=True)]

    def _collect(self, result: dict[str, Any], width: int, height: int,
                 queries: list[str]) -> list[Detection]:
        dets = []
        labels = result.get("text_labels") if self.grounding else result["labels"].tolist()
        for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), labels, strict=True):
            category = _match_query(label, queries) if self.grounding else queries[int(label)]
            if category is None:
                continue
            x0, y0, x1, y1 = (float(np.clip(box[0], 0, width)), float(np.clip(box[1], 0, height)),
                              float(np.clip(box[2], 0, width)), float(np.clip(box[3], 0, height)))
            if x1 - x0 < self.min_box_px or y1 - y0 < self.min_box_px:
                continue
            dets.append(Detection([x0, y0, x1, y1], float(score), category))
        return nms(dets, self.nms_iou)[:self.max_detections]


def _match_query(phrase: str, queries: list[str]) -> str | None:
    """Grounding DINO labels a box with the words it matched, not the query itself."""
    phrase = phrase.strip().lower()
    if phrase in queries:
        return phrase
    for q in queries:
        if q in phrase or (phrase and phrase in q):
            return q
    return None


def _to_float(outputs: Any) -> Any:
    """Post-processing runs in float32 (half-precision sigmoid/boxes lose small scores)."""
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            outputs[key] = value.float()
    return outputs


@register("detector", "hf")
def make_hf_detector(**options: Any) -> HFDetector:
    return HFDetector(**options)

"""Box-prompted segmentation with SAM through transformers (SamModel/SamProcessor,
default facebook/sam-vit-huge), batched over images, one box per image."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from transformers import SamModel, SamProcessor

from opensubject_tasks.backends.base import Box, Image, Mask
from opensubject_tasks.backends.hf.common import HFBackend, move, to_pil
from opensubject_tasks.backends.registry import register

DEFAULT_SEGMENTER = "facebook/sam-vit-huge"


def clip_box(box: Box, width: int, height: int) -> list[float] | None:
    """The box inside the image, or None when nothing of it is left."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return [x0, y0, x1, y1]


class HFSegmenter(HFBackend):
    interface = "segmenter"
    default_model = DEFAULT_SEGMENTER

    def __init__(self, model: str = DEFAULT_SEGMENTER, device: str = "cpu", dtype: str = "auto",
                 batch_size: int = 8, multimask: bool = False, name: str | None = None) -> None:
        # A box prompt is unambiguous: SAM's authors advise one mask for it (three
        # candidates are for a single ambiguous point, and the best-rated of them is often
        # a part of the object).
        super().__init__(model, device, dtype, batch_size, name)
        self.multimask = multimask
        self.processor = self.load(SamProcessor.from_pretrained)
        self.model = self.load(SamModel.from_pretrained, dtype=self.dtype)
        self.model.to(self.device).eval()

    def segment(self, images: Sequence[Image], boxes: Sequence[Box]) -> list[Mask]:
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images for {len(boxes)} boxes")
        items = []
        for image, box in zip(images, boxes, strict=True):
            h, w = np.asarray(image).shape[:2]
            items.append((image, clip_box(box, w, h)))
        # A box wholly outside its image selects nothing: an empty mask, no model call.
        todo = [i for i, (_, b) in enumerate(items) if b is not None]
        masks = self.batcher.map(self._segment, [items[i] for i in todo])
        out = [np.zeros(np.asarray(im).shape[:2], bool) for im, _ in items]
        for i, m in zip(todo, masks, strict=True):
            out[i] = m
        return out

    def _segment(self, chunk: list[tuple[Image, list[float]]]) -> list[Mask]:
        images = [to_pil(im) for im, _ in chunk]
        inputs = self.processor(images=images, input_boxes=[[b] for _, b in chunk], return_tensors="pt")
        original, reshaped = inputs["original_sizes"], inputs["reshaped_input_sizes"]
        # Box corners stay float32: SAM normalises them before its own cast, and bf16
        # would round pixel coordinates near 1024 to steps of 4-8 px.
        boxes = inputs["input_boxes"].to(self.device, torch.float32)
        pixels = move({"p": inputs["pixel_values"]}, self.device, self.dtype)["p"]
        with torch.inference_mode():
            outputs = self.model(pixel_values=pixels, input_boxes=boxes, multimask_output=self.multimask)
        # pred_masks: (batch, boxes=1, candidates, h, w); keep the candidate SAM rates best.
        best = outputs.iou_scores.float()[:, 0].argmax(-1).tolist()
        masks = self.processor.post_process_masks(outputs.pred_masks.float().cpu(), original, reshaped)
        return [m[0, k].numpy().astype(bool) for m, k in zip(masks, best, strict=True)]


@register("segmenter", "hf")
def make_hf_segmenter(**options: Any) -> HFSegmenter:
    return HFSegmenter(**options)

"""The "no VLM" backend: the pipeline runs without a vision-language model and says so.

It never pretends to see: it lists no categories (with an error that says why), answers
no question, and writes captions only from the pixels and facts it is given (``hints``:
category, box), marked with source ``template``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from opensubject_tasks.backends.base import Caption, CategoryList, Image, YesNo
from opensubject_tasks.backends.registry import register
from opensubject_tasks.captions import template_caption

NO_VLM = "no VLM configured"


class NoVLM:
    name = "none"

    def list_categories(self, images: Sequence[Image]) -> list[CategoryList]:
        return [CategoryList(categories=[], raw="", error=NO_VLM) for _ in images]

    def ask_yes_no(self, images: Sequence[Sequence[Image]], questions: Sequence[str]) -> list[YesNo]:
        return [YesNo(answer=None, p_yes=None, raw=NO_VLM) for _ in questions]

    def answer(self, images: Sequence[Sequence[Image]], prompts: Sequence[str], **_: Any) -> list[str]:
        return ["" for _ in prompts]

    def caption(self, images: Sequence[Image], hints: Sequence[dict[str, Any]]) -> list[Caption]:
        return [_from_pixels(image, hint) for image, hint in zip(images, hints, strict=True)]


def _from_pixels(image: Image, hint: dict[str, Any]) -> Caption:
    """Template captions of the hint's box (the whole image without one) in its scene."""
    box_mask, subject = None, image
    if hint.get("box"):
        h, w = image.shape[:2]
        x0, y0, x1, y1 = (int(round(v)) for v in hint["box"])
        box = (slice(max(0, y0), min(h, y1)), slice(max(0, x0), min(w, x1)))
        box_mask = np.zeros((h, w), bool)
        box_mask[box] = True
        if box_mask.any():
            subject = image[box]
    return template_caption(subject, None, image, box_mask, str(hint.get("category") or "object"))


@register("vlm", "none")
def make_no_vlm(**_options: Any) -> NoVLM:
    return NoVLM()

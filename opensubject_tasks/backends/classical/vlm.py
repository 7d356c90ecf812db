"""The "no VLM" backend: the pipeline runs without a vision-language model and says so.

It never pretends to see: it lists no categories (with an error that says why), answers
no question, and writes captions only from the facts it is given (``hints``), marked
with source ``template``.
"""
from __future__ import annotations

from typing import Any, Sequence

from opensubject_tasks.backends.base import Caption, CategoryList, Image, YesNo
from opensubject_tasks.backends.registry import register

NO_VLM = "no VLM configured"


class NoVLM:
    name = "none"

    def list_categories(self, images: Sequence[Image]) -> list[CategoryList]:
        return [CategoryList(categories=[], raw="", error=NO_VLM) for _ in images]

    def ask_yes_no(self, images: Sequence[Sequence[Image]], questions: Sequence[str]) -> list[YesNo]:
        return [YesNo(answer=None, p_yes=None, raw=NO_VLM) for _ in questions]

    def answer(self, images: Sequence[Sequence[Image]], prompts: Sequence[str]) -> list[str]:
        return ["" for _ in prompts]

    def caption(self, images: Sequence[Image], hints: Sequence[dict[str, Any]]) -> list[Caption]:
        return [template_caption(h) for h in hints]


def template_caption(hint: dict[str, Any]) -> Caption:
    """Captions assembled from known facts only (category, colours, position, scene)."""
    category = str(hint.get("category") or "object")
    colours = [str(c) for c in (hint.get("colours") or hint.get("colors") or []) if c]
    colour = " and ".join(colours[:2])
    words = f"{colour} {category}" if colour else category
    subject = f"{'an' if words[0].lower() in 'aeiou' else 'a'} {words}"
    short = subject
    parts = [subject[0].upper() + subject[1:]]
    if hint.get("position"):
        parts.append(f"in the {hint['position']} of the image")
    if hint.get("size"):
        parts.append(f"taking up a {hint['size']} part of the frame")
    long = " ".join(parts)
    if hint.get("scene"):
        long += f", in a {hint['scene']} scene"
    return Caption(short=short, long=long + ".", source="template")


@register("vlm", "none")
def make_no_vlm(**_options: Any) -> NoVLM:
    return NoVLM()

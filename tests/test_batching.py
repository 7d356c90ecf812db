"""Model call sites pass whole batches: mining names every class-agnostic identity of a
clip with one VLM call.

No offline VLM can name categories (the tiny models have random weights), so the VLM
and the class-agnostic detector here are scripted: the VLM names what it is shown by
colour and records every call; the embedder is the real classical one."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from opensubject_tasks.backends.base import CategoryList, Detection, Image, YesNo
from opensubject_tasks.backends.registry import get_backend
from opensubject_tasks.config import MineSettings
from opensubject_tasks.stages.mine import GENERIC, mine_clip

RED, BLUE = (220, 30, 30), (30, 30, 220)
BOXES = {"red": [20.0, 20.0, 80.0, 80.0], "blue": [140.0, 60.0, 210.0, 130.0]}


def _frames(n: int = 4) -> list[Image]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(90, 140, (180, 320, 3), dtype=np.uint8)
        for colour, (x0, y0, x1, y1) in ((RED, BOXES["red"]), (BLUE, BOXES["blue"])):
            dx = 6 * i
            img[int(y0):int(y1), int(x0) + dx:int(x1) + dx] = colour
            img[int(y0) + 10:int(y0) + 20, int(x0) + dx + 10:int(x0) + dx + 30] = 250  # some texture
        out.append(img)
    return out


class ScriptedVLM:
    """Names a view 'cat' when it is mostly red and 'cup' when mostly blue."""

    name = "scripted-vlm"

    def __init__(self) -> None:
        self.yes_no_calls: list[int] = []

    def list_categories(self, images: Sequence[Image]) -> list[CategoryList]:
        return [CategoryList(["cat", "cup"]) for _ in images]

    def ask_yes_no(self, images: Sequence[Sequence[Image]], questions: Sequence[str]) -> list[YesNo]:
        self.yes_no_calls.append(len(questions))
        out = []
        for imgs, q in zip(images, questions, strict=True):
            r, _, b = imgs[0].reshape(-1, 3).mean(axis=0)
            seen = "cat" if r > b else "cup"
            out.append(YesNo(answer=f"a {seen}?" in q, p_yes=0.9 if f"a {seen}?" in q else 0.1))
        return out


class ClassAgnosticDetector:
    """Boxes without categories, as a motion/saliency detector gives them."""

    name = "scripted-detector"

    def detect(self, frames: Sequence[Image], categories: Sequence[str]) -> list[list[Detection]]:
        out = []
        for i, _ in enumerate(frames):
            dx = 6 * i
            out.append([Detection([b[0] + dx, b[1], b[2] + dx, b[3]], 0.9, GENERIC, track=t)
                        for t, b in enumerate(BOXES.values())])
        return out


def test_class_agnostic_identities_are_named_in_one_vlm_call():
    vlm = ScriptedVLM()
    frames = _frames()
    result = mine_clip(frames, [0, 10, 20, 30], vlm=vlm, detector=ClassAgnosticDetector(),
                       embedder=get_backend("embedder", "classical"),
                       settings=MineSettings(min_identity=0.5, min_diversity=0.0))
    assert vlm.yes_no_calls == [4]  # 2 identities x 2 categories, one call
    named = {s.category: s for s in result.subjects}
    assert set(named) == {"cat", "cup"}
    assert all(s.category_source == "scripted-vlm" for s in result.subjects)
    # each identity got its own answer: the red one is the cat, the blue one the cup
    assert named["cat"].boxes[0] == BOXES["red"] and named["cup"].boxes[0] == BOXES["blue"]

"""VLM verifier: asks a vision-language model three yes/no questions per sample and
combines the answers with the classical scores.

1. Are the reference and the subject in the target frame the same individual?         (yes)
2. Is the subject still visible in the repainted region of the manipulation input?   (no)
3. Do the painted parts show artifacts, or the generation input a second copy?        (no)

Each question sees the pair's own subject and the painted content only (the target's box
crop, the repainted region of the manipulation input), and names what was painted there,
so that another individual of the same category elsewhere in the frame (a herd, a crowd)
fails nothing. The questions' wording is in prompts.yaml (``verify``). An answer the model's reply
could not be parsed into (``YesNo.answer is None``) is recorded as such and fails the
sample: a guess is never substituted.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from opensubject_tasks.backends.base import VLM, Embedder, Verdict, YesNo
from opensubject_tasks.backends.classical.verifier import ClassicalVerifier, as_mask, bbox, box_crop
from opensubject_tasks.backends.prompts import prompt_text
from opensubject_tasks.backends.registry import get_backend, register
from opensubject_tasks.config import VerifySettings

# (check, expected answer, question key in prompts.yaml under `verify`)
QUESTIONS: tuple[tuple[str, bool, str], ...] = (
    ("vlm_same_individual", True, "same_individual"),
    ("vlm_subject_present", False, "subject_present"),
    ("vlm_artifacts", False, "artifacts"),
)
# Which classical checks the VLM's answers stand in for when vlm_combine == "vlm".
_REPLACED = ("identity:", "residual:", "artifact: seam")


def _region(image: np.ndarray, mask: np.ndarray | None, margin: float = 0.05) -> np.ndarray:
    """The repainted box with a thin rim of its surroundings (to judge seams)."""
    b = bbox(mask) if mask is not None and mask.shape == image.shape[:2] else None
    if b is None:
        return image
    x0, y0, x1, y1 = b
    mx, my = int((x1 - x0) * margin), int((y1 - y0) * margin)
    h, w = image.shape[:2]
    return image[max(0, y0 - my):min(h, y1 + my), max(0, x0 - mx):min(w, x1 + mx)]


def questions_for(sample: dict[str, Any]) -> list[tuple[list[np.ndarray], str]]:
    """The three (images, question) pairs asked about one sample."""
    category = str(sample.get("category") or "subject")
    ref, gen, man = sample["reference"], sample["generation_input"], sample["manipulation_input"]
    target = sample.get("target")
    tgt_box = sample.get("tgt_box")
    # the target's subject; without its box the whole target frame (the classical
    # same-individual check fails such a sample anyway)
    tgt_subject = (box_crop(target, tgt_box) if target is not None and tgt_box else None)
    if tgt_subject is None:
        tgt_subject = target if target is not None else man
    region = _region(man, as_mask(sample.get("manipulation_mask")))
    replacement = sample.get("replacement")
    new_content = f"a {replacement}" if replacement else "background only"
    images = ([ref, tgt_subject], [ref, region], [gen, region])
    return [(list(imgs), prompt_text("verify", key, category=category, new_content=new_content))
            for imgs, (_, _, key) in zip(images, QUESTIONS, strict=True)]


def combine(answers: Sequence[YesNo], classical: Verdict, vlm_name: str,
            mode: str = "all") -> Verdict:
    """Merge one sample's three VLM answers with its classical verdict."""
    scores = dict(classical.scores)
    reasons: list[str] = []
    answers = list(answers) + [YesNo(None, None, "<no answer returned>")] * (len(QUESTIONS) - len(answers))
    for (check, expected, _), ans in zip(QUESTIONS, answers[:len(QUESTIONS)], strict=True):
        if ans.answer is None:
            scores[check] = -1.0  # recorded as unparseable, never guessed
            raw = " ".join((ans.raw or "").split())[:80]
            reasons.append(f"{check}: unparseable answer from {vlm_name} ({raw!r})")
            continue
        # Score = probability of the expected answer where the model gives one.
        p_yes = ans.p_yes if ans.p_yes is not None else float(ans.answer)
        scores[check] = round(p_yes if expected else 1.0 - p_yes, 4)
        if ans.answer != expected:
            said = "yes" if ans.answer else "no"
            reasons.append(f"{check}: {vlm_name} answered {said}")
    kept = classical.reasons
    if mode == "vlm":
        kept = [r for r in kept if not r.startswith(_REPLACED)]
    reasons = kept + reasons
    return Verdict(passed=not reasons, scores=scores, reasons=reasons,
                   source=f"vlm:{vlm_name}+{classical.source}")


class VLMVerifier:
    name = "vlm"

    def __init__(self, vlm: VLM | None = None, vlm_name: str = "none", embedder_name: str = "classical",
                 device: str = "cpu", dtype: str = "auto", batch_size: int = 8) -> None:
        self._vlm = vlm
        self._vlm_name = vlm_name
        self._opts = {"device": device, "dtype": dtype, "batch_size": batch_size}
        self.classical = ClassicalVerifier(embedder_name=embedder_name, **self._opts)

    def vlm(self) -> VLM:
        if self._vlm is None:
            self._vlm = get_backend("vlm", self._vlm_name, **self._opts)
        return self._vlm

    def verify(self, samples: Sequence[dict[str, Any]], thresholds: VerifySettings | None = None,
               embedder: Embedder | None = None, vlm: VLM | None = None) -> list[Verdict]:
        t = thresholds or VerifySettings()
        model = vlm or self.vlm()
        classical = self.classical.verify(samples, thresholds=t, embedder=embedder)
        asked = [qa for s in samples for qa in questions_for(s)]
        answers = model.ask_yes_no([imgs for imgs, _ in asked], [q for _, q in asked]) if asked else []
        n = len(QUESTIONS)
        name = getattr(model, "name", self._vlm_name)
        return [combine(answers[i * n:(i + 1) * n], c, name, t.vlm_combine)
                for i, c in enumerate(classical)]


@register("verifier", "vlm")
def make_vlm_verifier(device: str = "cpu", dtype: str = "auto", batch_size: int = 8,
                      vlm: str = "none", embedder: str = "classical") -> VLMVerifier:
    return VLMVerifier(vlm_name=vlm, embedder_name=embedder, device=device, dtype=dtype,
                       batch_size=batch_size)

"""The manipulation input never shows the subject it asks for: a target box that holds
only part of the subject (a detector's partial box) is grown to the subject's mask in the
target, and the verifier rejects, with its reason, a manipulation input whose subject is
still visible (classical checks, and the VLM verifier's combination of them)."""
from __future__ import annotations

import numpy as np

from opensubject_tasks.backends.base import YesNo
from opensubject_tasks.backends.classical.verifier import ClassicalVerifier
from opensubject_tasks.backends.registry import get_backend
from opensubject_tasks.backends.verifier_vlm import QUESTIONS, combine
from opensubject_tasks.config import SynthSettings, VerifySettings
from opensubject_tasks.steps.pair_inputs import synthesize_pair

RUNTIME = {"device": "cpu", "dtype": "auto", "batch_size": 4}


def scene(seed: int, x: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with one long striped object (a 150x60 'vehicle') at x."""
    rng = np.random.default_rng(seed)
    img = (rng.integers(90, 140, (240, 360, 1)) * np.ones((1, 1, 3))).astype(np.uint8)
    subject = np.zeros((240, 360), bool)
    subject[100:160, x:x + 150] = True
    stripes = ((np.arange(360) // 6) % 2).astype(bool)[None, :]
    body = np.where(stripes, 1, 0)[..., None] * np.array([200, 30, 30]) + (1 - np.where(stripes, 1, 0)[..., None]) \
        * np.array([240, 210, 40])
    img[subject] = np.broadcast_to(body, (240, 360, 3))[subject]
    return img, subject


def test_a_partial_target_box_is_grown_to_the_whole_subject() -> None:
    ref, ref_subject = scene(1, 60)
    tgt, tgt_subject = scene(2, 150)
    partial = [150.0, 100.0, 200.0, 160.0]          # the detector saw the front third only
    out = synthesize_pair(ref, [60.0, 100.0, 210.0, 160.0], tgt, partial, seed=3, attempt=1,
                          segmenter=get_backend("segmenter", "classical", **RUNTIME),
                          inpainter=get_backend("inpainter", "classical", **RUNTIME),
                          settings=SynthSettings(), category="vehicle")
    filled, found = out.images["manipulation_mask"], out.images["target_mask"]
    assert filled.shape == found.shape == tgt.shape[:2]
    # the filled box covers the subject, not only the partial box
    assert filled[tgt_subject].mean() > 0.98, filled[tgt_subject].mean()
    assert (found & tgt_subject).sum() / tgt_subject.sum() > 0.8
    x0, y0, x1, y1 = out.augment["manipulation_box"]
    assert x1 - x0 > 140 and x1 >= 298
    same = np.abs(out.images["manipulation_input"].astype(int) - tgt.astype(int)).max(axis=2) <= 6
    assert same[tgt_subject].mean() < 0.2            # the subject is gone from the input
    assert (out.images["manipulation_input"][~filled] == tgt[~filled]).all()   # the rest untouched
    verdict = ClassicalVerifier().verify([{**out.images, "category": "vehicle", "tgt_box": partial}],
                                         VerifySettings())[0]
    assert verdict.scores["subject_visible"] <= VerifySettings().max_subject_visible
    assert not any(r.startswith("subject visible") for r in verdict.reasons), verdict.reasons


def test_a_manipulation_input_that_still_shows_the_subject_is_rejected_in_every_verifier() -> None:
    ref, _ = scene(1, 60)
    tgt, tgt_subject = scene(2, 150)
    man = tgt.copy()
    box = np.zeros(tgt.shape[:2], bool)
    box[96:164, 146:204] = True                      # only the partial box was filled
    man[box] = 120
    gen = np.zeros_like(ref)
    gen[ref.shape[0] // 4:, :] = ref[ref.shape[0] // 4:]
    gmask = np.zeros(ref.shape[:2], bool)
    gmask[100:160, 60:210] = True
    sample = {"reference": ref[100:160, 60:210], "mask": np.ones((60, 150), bool), "generation_input": gen,
              "generation_mask": gmask, "manipulation_input": man, "manipulation_mask": box, "target": tgt,
              "target_mask": tgt_subject, "category": "vehicle", "tgt_box": [150.0, 100.0, 200.0, 160.0]}
    t = VerifySettings()
    classical = ClassicalVerifier().verify([sample], t)[0]
    visible = [r for r in classical.reasons if r.startswith("subject visible")]
    assert visible and "of the subject's mask in the target is unchanged" in visible[0], classical.reasons
    assert classical.scores["subject_visible"] > 0.6 and not classical.passed
    # The VLM verifier keeps the check whatever the VLM answers, in either combination mode.
    agreeing = [YesNo(expected, 0.99 if expected else 0.01, "yes" if expected else "no")
                for _, expected, _ in QUESTIONS]
    for mode in ("all", "vlm"):
        merged = combine(agreeing, classical, "any-vlm", mode)
        assert not merged.passed and any(r.startswith("subject visible") for r in merged.reasons), merged.reasons
    # without the subject's mask (a sample synthesized before it was kept) nothing is claimed
    old = {k: v for k, v in sample.items() if k != "target_mask"}
    assert "subject_visible" not in ClassicalVerifier().verify([old], t)[0].scores


BLUE = np.array([30, 60, 220])


class NaiveVLM:
    """Answers as a VLM that cannot tell individuals apart would: any blue-striped vehicle
    (the second individual) it is shown counts as "the vehicle" and as "a second copy";
    the pair's own subject (red and yellow) in the repainted region counts as still there."""

    name = "naive-vlm"

    def __init__(self) -> None:
        self.seen: list[list[np.ndarray]] = []

    @staticmethod
    def shows(image: np.ndarray, colour: np.ndarray) -> bool:
        return bool((np.abs(image.astype(int) - colour).max(axis=-1) < 12).sum() > 20)

    def ask_yes_no(self, images, questions):  # noqa: ANN001, ANN201
        out = []
        for imgs, q in zip(images, questions, strict=True):
            self.seen.append(list(imgs))
            other = any(self.shows(im, BLUE) for im in imgs)
            if "same individual" in q:
                out.append(YesNo(True, 0.9, "yes"))
            elif "still visible" in q:
                own = self.shows(imgs[1], np.array([200, 30, 30]))
                out.append(YesNo(own or other, None, "yes" if own or other else "no"))
            else:
                out.append(YesNo(other, None, "yes" if other else "no"))
        return out


def test_a_second_individual_of_the_category_elsewhere_fails_nothing() -> None:
    """A scene with two vehicles: the sample of the left one is verified by a VLM that
    cannot tell two vehicles apart, because no question shows it the other one; and the
    questions name what was painted in the subject's place."""
    from opensubject_tasks.backends.verifier_vlm import VLMVerifier, questions_for

    ref, _ = scene(1, 20)
    tgt, _ = scene(2, 20)
    other = np.zeros(tgt.shape[:2], bool)
    other[30:80, 230:340] = True                     # the second vehicle, blue and white
    stripes = ((np.arange(360) // 6) % 2).astype(bool)
    tgt[other] = np.where(stripes[None, :, None], BLUE, [235, 235, 235]).repeat(240, 0)[other]
    out = synthesize_pair(ref, [20.0, 100.0, 170.0, 160.0], tgt, [20.0, 100.0, 170.0, 160.0], seed=5, attempt=1,
                          segmenter=get_backend("segmenter", "classical", **RUNTIME),
                          inpainter=get_backend("inpainter", "classical", **RUNTIME),
                          settings=SynthSettings(), category="vehicle")
    sample = {**out.images, "category": "vehicle", "tgt_box": [20.0, 100.0, 170.0, 160.0],
              "replacement": "wooden crate"}
    assert NaiveVLM.shows(sample["manipulation_input"], BLUE)   # the other one is in the frame
    asked = questions_for(sample)
    assert all("vehicle" in q for _, q in asked)
    assert "a wooden crate" in asked[1][1] and "a wooden crate" in asked[2][1]
    assert "background only" in questions_for({**sample, "replacement": None})[1][1]
    vlm = NaiveVLM()
    verdict = VLMVerifier(vlm=vlm).verify([sample], VerifySettings())[0]
    assert vlm.seen and not any(NaiveVLM.shows(im, BLUE) for imgs in vlm.seen for im in imgs)
    assert not [r for r in verdict.reasons if r.startswith("vlm_")], verdict.reasons
    assert verdict.scores["vlm_artifacts"] == 1.0 and verdict.scores["vlm_subject_present"] == 1.0

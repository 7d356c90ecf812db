"""Stage 4: verification, captions and the re-synthesis bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

from opensubject_tasks.backends.base import YesNo
from opensubject_tasks.captions import colour_names, template_caption
from opensubject_tasks.backends.classical.verifier import ClassicalVerifier, seam_score
from opensubject_tasks.backends.registry import get_backend
from opensubject_tasks.backends.verifier_vlm import QUESTIONS, combine
from opensubject_tasks.config import VerifySettings
from opensubject_tasks.errors import ConfigError
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Sample, StageAttempt
from opensubject_tasks.services.common import run_stage
from opensubject_tasks.steps.verdict import sample_seed
from verify_fixtures import add_sample, add_video, make_images, make_sample, prepare_db, store_attempt

SCENES = ("brick", "coffee", "hubble", "grass")


@pytest.fixture(scope="module")
def verifier() -> ClassicalVerifier:
    return get_backend("verifier", "classical")


# -- the classical verifier on samples whose answer is known -------------------------
@pytest.mark.parametrize("scene", SCENES)
def test_faithful_sample_passes(verifier: ClassicalVerifier, scene: str) -> None:
    v = verifier.verify([make_sample(scene=scene)], thresholds=VerifySettings())[0]
    assert v.passed, v.reasons
    assert v.scores["identity"] >= 0.9
    assert v.scores["identity_keypoints"] >= 2.0       # the subject's own pixels, mirrored
    assert v.scores["residual"] <= 0.3 and v.scores["unchanged_in_box"] < 0.5
    assert v.source.startswith("classical:")


@pytest.mark.parametrize("scene", SCENES)
@pytest.mark.parametrize("other", ["astronaut", "coffee", "rocket"])
def test_different_subject_fails_identity(verifier: ClassicalVerifier, scene: str, other: str) -> None:
    v = verifier.verify([make_sample(scene=scene, generation_subject=other)])[0]
    assert not v.passed
    assert any(r.startswith("identity:") for r in v.reasons), v.reasons
    assert not any(r.startswith("residual:") for r in v.reasons), v.reasons  # the box was inpainted
    assert v.scores["identity_keypoints"] < 1.0


@pytest.mark.parametrize("scene", SCENES)
def test_subject_left_in_manipulation_input_fails_residual(verifier: ClassicalVerifier, scene: str) -> None:
    v = verifier.verify([make_sample(scene=scene, keep_subject=True)])[0]
    assert not v.passed
    residual = [r for r in v.reasons if r.startswith("residual:")]
    assert len(residual) == 3, v.reasons   # embedding, keypoints and unchanged pixels all see it
    assert not any(r.startswith("identity:") for r in v.reasons)


@pytest.mark.parametrize("scene", SCENES)
@pytest.mark.parametrize("other", ["astronaut", "coffee", "rocket"])
def test_target_of_another_individual_fails_same_individual(verifier: ClassicalVerifier, scene: str,
                                                           other: str) -> None:
    """A wrongly linked pair: synthesis is faithful to the reference, but the target
    frame shows another individual. Only the reference-vs-target check can see it."""
    v = verifier.verify([make_sample(scene=scene, target_subject=other)])[0]
    assert not v.passed
    assert [r for r in v.reasons if r.startswith("same individual:")], v.reasons
    assert not any(r.startswith("identity:") for r in v.reasons), v.reasons  # the generation input is fine
    good = verifier.verify([make_sample(scene=scene)])[0]
    assert good.scores["same_individual"] >= VerifySettings().same_individual_threshold("classical")
    assert v.scores["same_individual"] < good.scores["same_individual"]


def test_same_individual_needs_a_target_box_and_a_calibrated_embedder(verifier: ClassicalVerifier) -> None:
    v = verifier.verify([make_images()])[0]          # images only: nothing says where the target's subject is
    assert not v.passed and "same individual: no target box to compare the reference with" in v.reasons

    class Uncalibrated:
        name = "hf:/models/some-new-embedder"

        def embed(self, images):
            return np.ones((len(images), 4), np.float32) / 2

    with pytest.raises(ConfigError, match="no threshold for embedder 'hf:/models/some-new-embedder'"):
        verifier.verify([make_sample()], embedder=Uncalibrated())
    t = VerifySettings(same_individual_min={"some-new-embedder": 0.5})   # keyed by the model's name
    assert verifier.verify([make_sample()], thresholds=t, embedder=Uncalibrated())[0].scores[
        "same_individual"] == pytest.approx(1.0)
    assert t.same_individual_threshold("classical") == VerifySettings().same_individual_threshold("classical")


def test_batch_verdicts_follow_input_order(verifier: ClassicalVerifier) -> None:
    samples = [make_sample(), make_sample(generation_subject="rocket"), make_sample(keep_subject=True)]
    assert [v.passed for v in verifier.verify(samples)] == [True, False, False]


def test_seam_and_mask_sanity(verifier: ClassicalVerifier) -> None:
    img = make_sample(scene="coffee")
    box = img["manipulation_mask"]
    flat = img["target"].copy()
    flat[box] = img["target"][~box].mean(axis=0).astype(np.uint8)  # a box pasted flat: a seam
    assert seam_score(flat, box, 2) > 0.6
    assert seam_score(img["manipulation_input"], box, 2) < 0.1      # inpainted smoothly
    v = verifier.verify([{**img, "manipulation_input": flat}])[0]
    assert any(r.startswith("artifact: seam") for r in v.reasons), v.reasons

    broken = img["generation_mask"].copy()
    broken[:, 100:125] = False                                       # cut the subject in two
    broken[5:40, 5:60] = True                                        # and add a stray blob
    v = verifier.verify([{**img, "generation_mask": broken}])[0]
    assert any("fragmented" in r for r in v.reasons), v.reasons

    tiny = np.zeros_like(img["generation_mask"])
    tiny[10:12, 10:12] = True
    v = verifier.verify([{**img, "generation_mask": tiny}])[0]
    assert any(r.startswith("mask: subject covers") for r in v.reasons), v.reasons

    v = verifier.verify([{**img, "manipulation_mask": np.zeros_like(box)}])[0]
    assert not v.passed and any("manipulation mask" in r for r in v.reasons)


# -- captions ------------------------------------------------------------------------
def test_template_caption_names_colour_position_and_scene() -> None:
    ref = np.zeros((60, 60, 3), np.uint8)
    ref[:] = (200, 20, 20)                                 # a red subject
    target = np.full((200, 200, 3), (30, 40, 140), np.uint8)  # a dark blue scene
    box = np.zeros((200, 200), bool)
    box[130:190, 10:70] = True                              # lower left, ~9% of the frame
    cap = template_caption(ref, np.ones((60, 60), bool), target, box, "ball")
    assert cap.source == "template"
    assert cap.short == "a red ball"
    assert "lower left" in cap.long and "medium-sized" in cap.long
    assert "blue" in cap.long and "cool-toned" in cap.long


def test_colour_names() -> None:
    px = np.array([[250, 250, 250], [10, 10, 10], [128, 128, 128], [20, 200, 30], [30, 60, 220],
                   [120, 70, 30]], np.uint8)
    assert list(colour_names(px)) == ["white", "black", "grey", "green", "blue", "brown"]


# -- the VLM verifier ---------------------------------------------------------------
def test_vlm_verifier_records_unparseable_answers_as_failures() -> None:
    v = get_backend("verifier", "vlm")   # with the "none" VLM: it answers nothing
    verdict = v.verify([make_sample()], thresholds=VerifySettings())[0]
    assert not verdict.passed
    unparseable = [r for r in verdict.reasons if "unparseable answer from none" in r]
    assert len(unparseable) == len(QUESTIONS), verdict.reasons
    assert all(verdict.scores[check] == -1.0 for check, _, _ in QUESTIONS)
    assert verdict.scores["identity"] >= 0.9      # the classical scores are kept alongside
    assert verdict.source.startswith("vlm:none+classical")


def test_vlm_answers_combine_with_classical_scores(verifier: ClassicalVerifier) -> None:
    good = verifier.verify([make_sample()])[0]
    bad_identity = verifier.verify([make_sample(generation_subject="rocket")])[0]
    right = [YesNo(True, 0.9, "Yes."), YesNo(False, 0.2, "No."), YesNo(False, None, "no")]
    v = combine(right, good, "qwen")
    assert v.passed and v.scores["vlm_same_individual"] == 0.9 and v.scores["vlm_subject_present"] == 0.8
    assert v.scores["vlm_artifacts"] == 1.0

    wrong = [YesNo(True, 0.9, "Yes"), YesNo(True, 0.7, "Yes, the cat is still there"), YesNo(False, 0.1, "No")]
    v = combine(wrong, good, "qwen")
    assert not v.passed and v.reasons == ["vlm_subject_present: qwen answered yes"]

    # "all": the VLM saying yes does not overrule a classical identity failure; "vlm" does.
    assert not combine(right, bad_identity, "qwen", mode="all").passed
    assert combine(right, bad_identity, "qwen", mode="vlm").passed

    short = combine(right[:1], good, "qwen")               # fewer answers than questions
    assert not short.passed and sum("unparseable" in r for r in short.reasons) == 2


# -- the service: bookkeeping --------------------------------------------------------
@pytest.fixture()
def ctx(embedded_settings) -> Context:
    c = Context.from_settings(embedded_settings)
    prepare_db(c)
    return c


@pytest.fixture()
def any_ctx(service_ctx) -> Context:
    """The embedded services and production's (conftest's service_ctx), with a build."""
    prepare_db(service_ctx)
    return service_ctx


def _row(ctx: Context, sid: str) -> Sample:
    with session_scope(ctx.sessions) as s:
        return s.get(Sample, sid)


def _resynthesize(ctx: Context, sid: str, **variant) -> None:
    """Stand-in for stage 3: store the next attempt's images for a pending sample."""
    assert _row(ctx, sid).state == "pending"
    store_attempt(ctx, sid, make_images(**variant))


def test_verified_sample_gets_captions_and_one_history_entry(ctx: Context) -> None:
    vid, clip = add_video(ctx, "a.mp4")
    sid = add_sample(ctx, vid, clip, 0, make_images())
    res = run_stage(ctx, "verify", sid)
    assert res.status == "ok" and res.next == []
    row = _row(ctx, sid)
    assert row.state == "verified" and row.attempt == 1 and row.reason is None
    assert row.caption_source == "template" and "cat" in row.caption_short and row.caption_long
    assert row.verdict["passed"] is True and row.verdict["scores"]["identity"] >= 0.9
    assert [h["attempt"] for h in row.history] == [1] and row.history[0]["seed"] == row.seed
    assert row.backends["verifier"].startswith("classical") and row.backends["caption"] == "template"

    # Verifying again (a redelivered message) changes nothing.
    again = run_stage(ctx, "verify", sid)
    assert again.details["skipped"] == "already verified"
    assert _row(ctx, sid).history == row.history


def test_failed_attempt_requeues_with_new_seed_then_passes(ctx: Context) -> None:
    vid, clip = add_video(ctx, "a.mp4")
    sid = add_sample(ctx, vid, clip, 0, make_images(generation_subject="astronaut"))
    seed1 = _row(ctx, sid).seed
    res = run_stage(ctx, "verify", sid)
    assert res.status == "ok" and res.next == [("synthesize", sid)]
    row = _row(ctx, sid)
    assert (row.state, row.attempt) == ("pending", 2)
    assert row.seed == sample_seed(sid, 2) != seed1
    assert row.queued_at is not None and row.caption_short is None
    assert row.history[0]["attempt"] == 1 and row.history[0]["seed"] == seed1
    assert any(r.startswith("identity:") for r in row.history[0]["reasons"])

    # A duplicate verify before re-synthesis does nothing (nothing synthesized to verify).
    dup = run_stage(ctx, "verify", sid)
    assert dup.next == [] and "nothing synthesized" in dup.details["skipped"]
    assert len(_row(ctx, sid).history) == 1

    _resynthesize(ctx, sid)                                  # attempt 2 is faithful
    res = run_stage(ctx, "verify", sid)
    row = _row(ctx, sid)
    assert res.next == [] and (row.state, row.attempt) == ("verified", 2)
    assert [h["attempt"] for h in row.history] == [1, 2]
    assert [h["verdict"]["passed"] for h in row.history] == [False, True]


def test_threshold_nobody_can_pass_rejects_after_max_attempts(any_ctx: Context) -> None:
    ctx = any_ctx
    ctx.settings.verify.min_identity = 1.0
    ctx.settings.verify.max_attempts = 3
    vid, clip = add_video(ctx, "a.mp4")
    sid = add_sample(ctx, vid, clip, 0, make_images())
    seeds, results = [], []
    for attempt in (1, 2, 3):
        row = _row(ctx, sid)
        assert (row.state, row.attempt) == ("synthesized", attempt)
        seeds.append(row.seed)
        results.append(run_stage(ctx, "verify", sid))
        if attempt < 3:
            assert results[-1].next == [("synthesize", sid)]
            _resynthesize(ctx, sid)
    assert results[-1].status == "rejected" and results[-1].next == []
    row = _row(ctx, sid)
    assert (row.state, row.attempt) == ("rejected", 3)
    assert len(set(seeds)) == 3 and [h["seed"] for h in row.history] == seeds
    assert [h["attempt"] for h in row.history] == [1, 2, 3]
    for a in (1, 2, 3):
        assert f"attempt {a} (seed {seeds[a - 1]}): identity:" in row.reason
    assert row.reason.startswith("rejected after 3 attempt(s)")
    # A late duplicate changes nothing; the stage attempts say what happened.
    assert run_stage(ctx, "verify", sid).details["skipped"] == "already rejected"
    assert len(_row(ctx, sid).history) == 3
    with session_scope(ctx.sessions) as s:
        statuses = s.scalars(select(StageAttempt.status).where(StageAttempt.entity_id == sid)
                             .order_by(StageAttempt.id)).all()
    assert statuses == ["ok", "ok", "rejected", "ok"]


def test_verifier_failing_only_first_attempt(any_ctx: Context) -> None:
    ctx = any_ctx
    # verify_fixtures (imported above) registers the "fail-first-attempt" verifier.
    ctx.settings.backends.verifier = "fail-first-attempt"
    vid, clip = add_video(ctx, "a.mp4")
    ids = [add_sample(ctx, vid, clip, i, make_images(scene=sc)) for i, sc in enumerate(("brick", "hubble"))]
    for sid in ids:
        assert run_stage(ctx, "verify", sid).next == [("synthesize", sid)]
        assert run_stage(ctx, "verify", sid).details.get("skipped")   # duplicate: no-op
        _resynthesize(ctx, sid, scene="brick")
        assert run_stage(ctx, "verify", sid).next == []
        assert run_stage(ctx, "verify", sid).details.get("skipped")   # duplicate: no-op
    with session_scope(ctx.sessions) as s:
        rows = s.scalars(select(Sample).order_by(Sample.id)).all()
        assert s.scalar(select(func.count()).select_from(Sample)) == 2
    for row in rows:
        assert (row.state, row.attempt) == ("verified", 2)
        assert [h["attempt"] for h in row.history] == [1, 2]
        assert row.history[0]["reasons"][-1] == "forced: the first attempt always fails"
        assert row.history[1]["verdict"]["passed"] is True


def test_vlm_verifier_through_the_service_rejects_with_reason(ctx: Context) -> None:
    ctx.settings.backends.verifier = "vlm"      # and the "none" VLM: nothing can be confirmed
    ctx.settings.verify.max_attempts = 1
    vid, clip = add_video(ctx, "a.mp4")
    sid = add_sample(ctx, vid, clip, 0, make_images())
    res = run_stage(ctx, "verify", sid)
    row = _row(ctx, sid)
    assert res.status == "rejected" and row.state == "rejected"
    assert "vlm_same_individual: unparseable answer from none" in row.reason


def test_wrong_identity_pair_is_rejected_at_once_with_its_reason(any_ctx: Context) -> None:
    """The target frame shows another individual: rejected on attempt 1 of 3, with the
    reason, and not sent back to synthesis (a new seed cannot change the pair)."""
    ctx = any_ctx
    ctx.settings.verify.max_attempts = 3
    vid, clip = add_video(ctx, "a.mp4")
    sid = add_sample(ctx, vid, clip, 0, make_images(target_subject="astronaut"))
    ok = add_sample(ctx, vid, clip, 1, make_images())
    res = run_stage(ctx, "verify", sid)
    row = _row(ctx, sid)
    assert res.status == "rejected" and res.next == [] and (row.state, row.attempt) == ("rejected", 1)
    assert row.reason.startswith("wrong identity, not re-synthesized: rejected after 1 attempt(s)")
    assert "same individual: the target's subject differs from the reference" in row.reason
    assert row.verdict["scores"]["same_individual"] < ctx.settings.verify.same_individual_threshold("classical")
    assert run_stage(ctx, "verify", ok).status == "ok" and _row(ctx, ok).state == "verified"


def test_vlm_is_asked_about_reference_and_target_subject() -> None:
    from opensubject_tasks.backends.verifier_vlm import questions_for
    from verify_fixtures import TGT_BOX

    sample = make_sample(target_subject="rocket")
    asked = questions_for(sample)
    assert [len(imgs) for imgs, _ in asked] == [2, 2, 2]
    (ref, tgt), question = asked[0]
    x0, y0, x1, y1 = (int(v) for v in TGT_BOX)
    assert ref is sample["reference"] and np.array_equal(tgt, sample["target"][y0:y1, x0:x1])
    assert "same individual cat" in question and "yes or no" in question

    class SaysNo:
        name = "scripted-vlm"

        def ask_yes_no(self, images, questions):
            return [YesNo(False, 0.1, "No") for _ in questions]

    verdict = get_backend("verifier", "vlm").verify([make_sample()], vlm=SaysNo())[0]
    assert "vlm_same_individual: scripted-vlm answered no" in verdict.reasons
    from opensubject_tasks.steps.verdict import decide

    d = decide("s", 1, 7, verdict, [], max_attempts=3)
    assert d.state == "rejected" and d.next == [] and d.reason.startswith("wrong identity")


def test_missing_images_fail_the_sample_with_a_reason(ctx: Context) -> None:
    vid, clip = add_video(ctx, "a.mp4")
    sid = add_sample(ctx, vid, clip, 0, make_images())
    ctx.store.delete(_row(ctx, sid).keys["target"])
    res = run_stage(ctx, "verify", sid)
    row = _row(ctx, sid)
    assert res.status == "failed" and row.state == "failed"
    assert "target" in row.reason and "missing" in row.reason


def test_sample_seed_is_deterministic_and_distinct() -> None:
    assert sample_seed("x", 1) == sample_seed("x", 1)
    seeds = {sample_seed(f"s{i}", a) for i in range(50) for a in (1, 2, 3)}
    assert len(seeds) == 150 and all(0 <= s < 2**31 for s in seeds)
    assert sample_seed("x", 1, base_seed=1) != sample_seed("x", 1)


def test_tiny_vlm_answers_are_recorded_parsed_or_not(ctx: Context) -> None:
    """The real transformers code path (a tiny random Qwen2.5-VL): whatever it replies,
    each check is either a parsed probability or recorded as unparseable."""
    ctx.settings.backends.verifier = "vlm"
    ctx.settings.backends.vlm = "tiny"
    ctx.settings.verify.max_attempts = 1
    vid, clip = add_video(ctx, "a.mp4")
    sid = add_sample(ctx, vid, clip, 0, make_images())
    run_stage(ctx, "verify", sid)
    row = _row(ctx, sid)
    assert row.state in ("verified", "rejected") and row.verdict["source"].startswith("vlm:tiny")
    for check, _, _ in QUESTIONS:
        score = row.verdict["scores"][check]
        unparseable = any(r.startswith(f"{check}: unparseable") for r in row.verdict["reasons"])
        assert (score == -1.0) == unparseable and (unparseable or 0.0 <= score <= 1.0)
    if row.state == "verified":
        assert row.caption_short and row.caption_source

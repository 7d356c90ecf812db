"""Model call sites pass whole batches: mining names every class-agnostic identity of a
clip with one VLM call; a video's samples unit gives each model a batch of samples.

No offline VLM can name categories (the tiny models have random weights), so the VLM
and the class-agnostic detector here are scripted: the VLM names what it is shown by
colour and records every call; the embedder is the real classical one."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from sqlalchemy import func, select

from mining_fixtures import gt_clips, seed_video
from opensubject_tasks.backends.base import CategoryList, Detection, Image, YesNo
from opensubject_tasks.backends.registry import get_backend, register
from opensubject_tasks.config import MineSettings, load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.models import Sample, StageAttempt, Video
from opensubject_tasks.services.common import run_stage
from opensubject_tasks.steps.subjects import GENERIC, mine_clip

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


# --- a video's samples in batches -----------------------------------------------------------
CALLS: dict[str, list[int]] = {}   # interface -> items per call, in order


class _Counting:
    """A classical backend that records how many items each call gives it."""

    def __init__(self, interface: str, inner: Any) -> None:
        self.interface, self.inner = interface, inner
        self.name, self.family = f"counting:{inner.name}", getattr(inner, "family", "opencv")

    def segment(self, images, boxes):  # noqa: ANN001, ANN201
        CALLS.setdefault("segmenter", []).append(len(images))
        return self.inner.segment(images, boxes)

    def inpaint(self, images, masks, prompts, seeds, negative_prompts=None):  # noqa: ANN001, ANN201
        CALLS.setdefault("inpainter", []).append(len(images))
        return self.inner.inpaint(images, masks, prompts, seeds, negative_prompts)

    def verify(self, samples, thresholds, embedder=None, vlm=None):  # noqa: ANN001, ANN201
        CALLS.setdefault("verifier", []).append(len(samples))
        return self.inner.verify(samples, thresholds, embedder=embedder, vlm=vlm)


for _interface in ("segmenter", "inpainter", "verifier"):
    register(_interface, "counting")(
        lambda _i=_interface, **opts: _Counting(_i, get_backend(_i, "classical", **opts)))


def _settings(root: Path, batch: int = 1, counting: bool = False) -> Any:
    settings = load_settings(database_url=f"sqlite:///{root / 'db.sqlite'}",
                             store={"kind": "local", "local_root": str(root / "store")})
    settings.synth.batch_samples = batch
    if counting:
        settings.backends.segmenter = settings.backends.inpainter = settings.backends.verifier = "counting"
    return settings


@pytest.fixture(scope="module")
def mined_build(tmp_path_factory: pytest.TempPathFactory, sample_media: Path) -> tuple[Path, str]:
    """A video of the sample media mined once in a fresh embedded build, its samples
    pending: the database file and store folder, which each test copies. Mining reads
    neither the samples' batch size nor the segmenter, inpainter or verifier."""
    root = tmp_path_factory.mktemp("mined")
    ctx = Context.from_settings(_settings(root))
    upgrade(ctx.engine)
    clips = [c for c in gt_clips(sample_media) if c.video == "rocket_dissolve.mp4"]
    vid = seed_video(ctx, clips)
    assert run_stage(ctx, "mine", vid).next == [("samples", vid)]
    ctx.engine.dispose()
    return root, vid


def _mined(tmp_path: Path, mined_build: tuple[Path, str], batch: int,
           counting: bool = False) -> tuple[Context, str]:
    """A copy of the mined build, its samples pending, with the given batch size."""
    root, vid = mined_build
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    return Context.from_settings(_settings(tmp_path, batch, counting)), vid


def _outcome(ctx: Context) -> tuple[dict, dict]:
    with session_scope(ctx.sessions) as s:
        rows = {x.id: (x.state, x.attempt, x.seed, [(h["attempt"], h["reasons"]) for h in x.history or []],
                       x.caption_short, dict(x.keys or {})) for x in s.query(Sample)}
    objects = {k: hashlib.sha256(ctx.store.get_bytes(k)).hexdigest()
               for _, _, _, _, _, keys in rows.values() for k in keys.values()}
    return rows, objects


def test_a_videos_samples_call_each_model_once_per_batch(tmp_path: Path, mined_build: tuple[Path, str]) -> None:
    """The samples unit gives the segmenter, the inpainter and the verifier a whole batch
    per call (the inpainter: every generation canvas and manipulation frame of it), and
    records each sample's attempts exactly once."""
    ctx, vid = _mined(tmp_path, mined_build, batch=4, counting=True)
    with session_scope(ctx.sessions) as s:
        n = s.query(Sample).count()
    assert n > 4, "the batch bound is not exercised"
    CALLS.clear()
    out = run_stage(ctx, "samples", vid)
    assert out.status == "ok" and out.next == [], out
    rows, _ = _outcome(ctx)
    attempts = sum(len(h) for _, _, _, h, _, _ in rows.values())   # verified attempts, re-syntheses included
    # each call carries up to 4 samples; a sample costs 2 inpainter items (generation canvas,
    # manipulation frame) and 1 verifier item; the segmenter gets its reference and its target
    # in one call per batch, plus at most one call per further round of target prompts
    assert all(k <= 8 and k % 2 == 0 for k in CALLS["inpainter"]) and sum(CALLS["inpainter"]) == 2 * attempts
    assert all(k <= 4 for k in CALLS["verifier"]) and sum(CALLS["verifier"]) == attempts
    batches = len(CALLS["inpainter"])
    assert all(k <= 8 for k in CALLS["segmenter"])
    assert batches <= len(CALLS["segmenter"]) <= ctx.settings.synth.target_rounds * batches
    assert batches < attempts   # fewer calls than samples: batched
    with session_scope(ctx.sessions) as s:
        assert all(x.state in ("verified", "rejected") for x in s.query(Sample))
        steps = s.execute(select(StageAttempt.entity_id, StageAttempt.stage, func.count())
                          .where(StageAttempt.entity_type == "sample")
                          .group_by(StageAttempt.entity_id, StageAttempt.stage)).all()
        assert s.get(Video, vid).state in ("done", "rejected")
    per_sample = {(e, st): c for e, st, c in steps}
    for sid, (_, _, _, history, _, _) in rows.items():   # one attempt row per step and attempt
        assert per_sample.get((sid, "verify"), 0) == len(history)
        assert per_sample.get((sid, "synthesize"), 0) == len(history)


def test_batches_give_the_same_samples_as_one_at_a_time(tmp_path: Path, mined_build: tuple[Path, str]) -> None:
    """Per-video batches change how the models are called, not what they make: states,
    attempts, seeds, reasons, captions and every stored image are the same bytes as with
    batches of one."""
    one, vid1 = _mined(tmp_path / "one", mined_build, batch=1)
    many, vid2 = _mined(tmp_path / "many", mined_build, batch=16)
    assert vid1 == vid2
    assert run_stage(one, "samples", vid1).status == "ok"
    assert run_stage(many, "samples", vid2).status == "ok"
    assert _outcome(one) == _outcome(many)


def test_a_samples_unit_cut_short_redoes_nothing_recorded(tmp_path: Path, mined_build: tuple[Path, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An error half way through a video's samples (after some were verified) fails the
    unit; running it again finishes the rest and ends with what an uninterrupted run gives,
    each sample's attempts recorded once."""
    import opensubject_tasks.services.samples as samples_service

    calm, vid = _mined(tmp_path / "calm", mined_build, batch=2)
    assert run_stage(calm, "samples", vid).status == "ok"
    ctx, _ = _mined(tmp_path / "cut", mined_build, batch=2)
    real = samples_service.verify_samples
    seen: list[int] = []

    def dies_on_second_batch(c, ids):  # noqa: ANN001, ANN202
        seen.append(len(ids))
        if len(seen) == 2:
            raise RuntimeError("the GPU fell off the bus")
        return real(c, ids)

    monkeypatch.setattr(samples_service, "verify_samples", dies_on_second_batch)
    with pytest.raises(RuntimeError):
        run_stage(ctx, "samples", vid)
    monkeypatch.setattr(samples_service, "verify_samples", real)
    assert run_stage(ctx, "samples", vid).status == "ok"
    assert _outcome(ctx) == _outcome(calm)
    with session_scope(ctx.sessions) as s:
        cut = s.scalars(select(StageAttempt.status).where(StageAttempt.stage == "verify",
                                                          StageAttempt.status == "error")).all()
        assert len(cut) == seen[1]   # the batch that died: its attempts closed as errors

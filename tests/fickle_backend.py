"""Test-only backends that answer differently on every call, as a sampling VLM or a GPU
detector can: ``fickle`` detector (every box shifted by a few pixels more on each call),
``fickle`` VLM (the same categories in another order on each call, template captions) and
``fickle`` quality scorer (scores drift down a little on each call).

Selected with OPENSUBJECT_BACKENDS__DETECTOR=fickle (and __VLM, __QUALITY); a Celery
worker loads them with ``--include fickle_backend`` (tests/ on PYTHONPATH). Nothing in
the product knows about them.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

from opensubject_tasks.backends.base import CategoryList, Detection, Image, QualityScore
from opensubject_tasks.backends.classical.detector import make_motion_saliency_detector
from opensubject_tasks.backends.classical.quality import make_classical_quality
from opensubject_tasks.backends.classical.vlm import NoVLM
from opensubject_tasks.backends.registry import register

CATEGORIES = ["animal", "person", "vehicle"]


class FickleDetector:
    name = "fickle"

    def __init__(self) -> None:
        self.inner = make_motion_saliency_detector()
        self.calls = itertools.count(1)

    def detect(self, frames: Sequence[Image], categories: Sequence[str]) -> list[list[Detection]]:
        shift = 3.0 * next(self.calls)
        out = []
        for frame, dets in zip(frames, self.inner.detect(frames, categories), strict=True):
            h, w = frame.shape[:2]
            out.append([Detection(box=[min(max(0.0, v + shift), lim) for v, lim in zip(d.box, (w, h, w, h))],
                                  score=d.score, category=d.category, track=d.track) for d in dets])
        return out


class FickleVLM(NoVLM):
    name = "fickle"

    def __init__(self) -> None:
        self.calls = itertools.count(1)

    def list_categories(self, images: Sequence[Image]) -> list[CategoryList]:
        out = []
        for _ in images:
            k = next(self.calls) % len(CATEGORIES)
            cats = CATEGORIES[k:] + CATEGORIES[:k]
            out.append(CategoryList(categories=cats, raw=str(cats)))
        return out


class FickleQuality:
    name = "fickle"

    def __init__(self) -> None:
        self.inner = make_classical_quality()
        self.calls = itertools.count(1)

    def score(self, clips: Sequence[Sequence[Image]]) -> list[QualityScore]:
        drift = 0.02 * next(self.calls)
        return [QualityScore(score=max(0.0, q.score - drift), metrics=q.metrics) for q in self.inner.score(clips)]


@register("detector", "fickle")
def make_fickle_detector(**_: Any) -> FickleDetector:
    return FickleDetector()


@register("vlm", "fickle")
def make_fickle_vlm(**_: Any) -> FickleVLM:
    return FickleVLM()


@register("quality", "fickle")
def make_fickle_quality(**_: Any) -> FickleQuality:
    return FickleQuality()


class SlowQuality:
    """The classical scorer after a pause (OPENSUBJECT_TEST_SLOW_S, default 2 s): keeps a
    curate busy long enough for a second copy of it to arrive while it runs."""

    name = "slow"

    def __init__(self) -> None:
        self.inner = make_classical_quality()

    def score(self, clips: Sequence[Sequence[Image]]) -> list[QualityScore]:
        import os
        import time

        time.sleep(float(os.environ.get("OPENSUBJECT_TEST_SLOW_S", "2")))
        return self.inner.score(clips)


@register("quality", "slow")
def make_slow_quality(**_: Any) -> SlowQuality:
    return SlowQuality()


class FailWideQuality:
    """The classical scorer, except that it raises (an error, not bad input) on frames
    ``OPENSUBJECT_TEST_FAIL_WIDTH`` pixels wide while the file ``OPENSUBJECT_TEST_FAIL_FLAG``
    exists: one video of a build, told apart by its size, fails until the flag is removed."""

    name = "fail_wide"

    def __init__(self) -> None:
        self.inner = make_classical_quality()

    def score(self, clips: Sequence[Sequence[Image]]) -> list[QualityScore]:
        import os

        width = int(os.environ.get("OPENSUBJECT_TEST_FAIL_WIDTH", "0"))
        flag = os.environ.get("OPENSUBJECT_TEST_FAIL_FLAG", "")
        if flag and os.path.exists(flag) and any(f.shape[1] == width for clip in clips for f in clip[:1]):
            raise RuntimeError(f"injected error for {width}-px-wide videos")
        return self.inner.score(clips)


@register("quality", "fail_wide")
def make_fail_wide_quality(**_: Any) -> FailWideQuality:
    return FailWideQuality()


class KillWideQuality:
    """The classical scorer, except that on frames ``OPENSUBJECT_TEST_KILL_WIDTH`` pixels wide
    it kills its own process with SIGKILL, as an out-of-memory kill or a crash in native
    code would: the video that makes every worker die."""

    name = "kill_wide"

    def __init__(self) -> None:
        self.inner = make_classical_quality()

    def score(self, clips: Sequence[Sequence[Image]]) -> list[QualityScore]:
        import os
        import signal

        width = int(os.environ.get("OPENSUBJECT_TEST_KILL_WIDTH", "0"))
        if any(f.shape[1] == width for clip in clips for f in clip[:1]):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.score(clips)


@register("quality", "kill_wide")
def make_kill_wide_quality(**_: Any) -> KillWideQuality:
    return KillWideQuality()

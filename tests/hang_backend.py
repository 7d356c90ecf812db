"""A test-only inpainter that hangs once: loaded into a test's Celery worker with
``celery worker --include hang_backend`` (tests/ on PYTHONPATH) and selected with
``OPENSUBJECT_BACKENDS__INPAINTER=hang_once``.

The first call across all worker processes (decided by atomically creating the file
named by ``OPENSUBJECT_TEST_HANG_ONCE``) sleeps far past any time limit, as a stuck model
call or decode would; every other call is the classical inpainter's. With
``OPENSUBJECT_TEST_HANG_MODE=hard`` it also swallows the soft time limit, as native code
that never returns to Python does, so only the hard limit (the pool process killed) ends
it. Nothing in the product knows about it.
"""
from __future__ import annotations

import os
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from opensubject_tasks.backends.classical.inpainter import make_classical_inpainter
from opensubject_tasks.backends.registry import register

HANG_S = 3600.0


def _hang_once(token: str, call: Any) -> Any:
    """The first call across all worker processes (the one that creates ``token``) hangs;
    every other one is ``call()``."""
    try:
        fd = os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return call()
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        try:
            time.sleep(HANG_S)  # the soft time limit interrupts this sleep
        except SoftTimeLimitExceeded:
            if os.environ.get("OPENSUBJECT_TEST_HANG_MODE") != "hard":
                raise
    raise AssertionError("the stage time limit never fired")


class HangOnceInpainter:
    def __init__(self, inner: Any, token: str) -> None:
        self.inner = inner
        self.token = token

    def inpaint(self, *args: Any, **kwargs: Any) -> Any:
        return _hang_once(self.token, lambda: self.inner.inpaint(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class HangOnceDetector(HangOnceInpainter):
    """The same hang, once, in mining's detector."""

    def detect(self, *args: Any, **kwargs: Any) -> Any:
        return _hang_once(self.token, lambda: self.inner.detect(*args, **kwargs))


@register("detector", "hang_once")
def make_hang_once_detector(**options: Any) -> HangOnceDetector:
    from opensubject_tasks.backends.classical.detector import make_motion_saliency_detector

    return HangOnceDetector(make_motion_saliency_detector(**options), os.environ["OPENSUBJECT_TEST_HANG_ONCE"])


@register("inpainter", "hang_once")
def make_hang_once_inpainter(**options: Any) -> HangOnceInpainter:
    return HangOnceInpainter(make_classical_inpainter(**options), os.environ["OPENSUBJECT_TEST_HANG_ONCE"])


class HangQuality:
    """A quality scorer that never returns: every curate hangs until its soft time limit
    interrupts the sleep, or its hard limit kills the pool process."""

    def score(self, *_args: Any, **_kwargs: Any) -> Any:
        time.sleep(HANG_S)
        raise AssertionError("the stage time limit never fired")


@register("quality", "hang_always")
def make_hang_quality(**_options: Any) -> HangQuality:
    return HangQuality()


class SlowLoadQuality:
    """The classical quality scorer behind a model load that takes
    ``OPENSUBJECT_TEST_LOAD_S`` seconds, as real weights do: every pool process pays it in
    its start-up, before it reports ready."""

    name = "slow_load"

    def __init__(self, load_s: float) -> None:
        from opensubject_tasks.backends.classical.quality import make_classical_quality

        time.sleep(load_s)
        self.inner = make_classical_quality()

    def score(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.score(*args, **kwargs)


@register("quality", "slow_load")
def make_slow_load_quality(**_options: Any) -> SlowLoadQuality:
    return SlowLoadQuality(float(os.environ["OPENSUBJECT_TEST_LOAD_S"]))

"""The tiny models (random weights, real classes), built once per test session into a fresh
cache that the `tiny` backend factories then use, module by module."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from opensubject_tasks.backends.hf import tiny
from opensubject_tasks.backends.registry import clear_cache


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-models")
    tiny.ensure_tiny_models(root)
    return root


@pytest.fixture(scope="module")
def tiny_models(tiny_models_root: Path) -> dict[str, Path]:
    old = os.environ.get("OPENSUBJECT_TINY_CACHE")
    os.environ["OPENSUBJECT_TINY_CACHE"] = str(tiny_models_root)
    clear_cache()
    try:
        yield tiny.ensure_tiny_models()
    finally:
        clear_cache()
        if old is None:
            os.environ.pop("OPENSUBJECT_TINY_CACHE", None)
        else:
            os.environ["OPENSUBJECT_TINY_CACHE"] = old

"""Test inputs that are slow to make and never change unless their code does, kept on disk
between test sessions under ``.cache/tests/`` (git-ignored; ``OPENSUBJECT_TEST_CACHE``
names another folder, ``OPENSUBJECT_TEST_CACHE=off`` makes everything afresh).

An entry's name is a hash of what makes it: the source files of the code that writes it,
its arguments, and the versions of the libraries that encode or draw it (numpy's random
generator, PyAV's libx264, OpenCV, scikit-image's photos). Change any of them and the entry
is made again; old entries stay until someone deletes the folder.

An entry is written into a private folder and renamed into place when complete, so an
interrupted session or two sessions making the same entry at once never leave a half
entry. Tests get copies (``copy_into``), never the cached files themselves.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_VAR = "OPENSUBJECT_TEST_CACHE"
LIBRARIES = ("numpy", "av", "opencv-contrib-python-headless", "scikit-image", "pillow")


def cache_root() -> Path | None:
    where = os.environ.get(CACHE_VAR, "")
    if where.lower() == "off":
        return None
    return Path(where) if where else REPO / ".cache" / "tests"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def key(name: str, sources: Iterable[Path], **args: object) -> str:
    """``name-<hash>`` of the sources' bytes, the arguments and the library versions."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in sources):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(json.dumps(args, sort_keys=True, default=str).encode())
    h.update(json.dumps({d: _version(d) for d in LIBRARIES}).encode())
    return f"{name}-{h.hexdigest()[:20]}"


def cached_folder(entry: str, make: Callable[[Path], object]) -> Path:
    """The folder ``make(folder)`` fills, made once and kept under the cache root."""
    root = cache_root()
    assert root is not None, f"{CACHE_VAR}=off"
    final = root / entry
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".{entry}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        make(work)
        try:
            work.rename(final)
        except OSError:  # another session finished the same entry first: keep theirs
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def copy_into(src: Path, dest: Path, names: Iterable[str] | None = None) -> Path:
    """A copy of the folder ``src`` (or of only the files ``names`` in it) at ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()) if names is None else [src / n for n in names]:
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    return dest


# --- the sample videos ------------------------------------------------------------------------------
def sample_videos(dest: Path, **kw: object) -> Path:
    """``make_samples(dest, **kw)``: the videos and ground_truth.json, copied from the cache
    when made before by the same generator with the same arguments."""
    from opensubject_tasks.testmedia import samples

    if cache_root() is None:
        samples.make_samples(dest, **kw)
        return dest
    made = cached_folder(key("samples", [Path(samples.__file__)], **kw), lambda out: samples.make_samples(out, **kw))
    return copy_into(made, dest)

"""The object-store interface and safe, deterministic keys.

Every key is built with ``safe_key`` so a user-supplied name can never escape its
prefix: ``..`` segments, absolute paths, backslashes, NUL and control characters
are refused with ``UnsafeKey``.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

from opensubject_tasks.errors import UnsafeKey

_MAX_KEY_BYTES = 1024  # S3's limit


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


@runtime_checkable
class ObjectStore(Protocol):
    """Minimal S3-style store. Implementations: LocalStore, MinioStore."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def put_file(self, key: str, path: str | Path, content_type: str = "application/octet-stream") -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: str | Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def stat(self, key: str) -> ObjectInfo: ...
    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def url(self, key: str, expires_s: int | None = None) -> str: ...


# Characters refused anywhere in a key: control (Cc), format (Cf: zero-width and bidi
# overrides that disguise what a key says), surrogates (Cs), line/paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _check_segment(segment: str, key: str) -> None:
    # A segment made only of dots and spaces is refused, also after NFKC folding: '..',
    # '. .', '...' and fullwidth dots ('\uff0e\uff0e') all read as traversal to some
    # filesystem, URL normaliser or downstream tool.
    folded = unicodedata.normalize("NFKC", segment)
    if not folded.strip(". \t"):
        raise UnsafeKey(f"empty, '.' or '..' segment in object key refused: {key!r}")


def check_key(key: str) -> str:
    """Validate a complete key (a trailing '/' marks a prefix); returns it unchanged or raises UnsafeKey."""
    if not isinstance(key, str) or not key:
        raise UnsafeKey("object key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        raise UnsafeKey("object key longer than 1024 bytes")
    if key.startswith("/") or key.startswith("~"):
        raise UnsafeKey(f"absolute object key refused: {key!r}")
    if "\\" in key:
        raise UnsafeKey(f"backslash in object key refused: {key!r}")
    if any(unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in key):
        raise UnsafeKey(f"control character in object key refused: {key!r}")
    parts = key.split("/")
    if parts[-1] == "":  # a prefix such as 'videos/'
        parts = parts[:-1]
    for part in parts:
        _check_segment(part, key)
    return key


def check_object_key(key: str) -> str:
    """A key that names an object: check_key, and no trailing '/'."""
    check_key(key)
    if key.endswith("/"):
        raise UnsafeKey(f"object key must not end with '/': {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: '' (everything) or a safe partial key."""
    if prefix == "":
        return prefix
    return check_key(prefix)


def check_segment(part: str | int) -> str:
    """One path segment (an id): no '/', otherwise as safe as any key."""
    s = str(part)
    if "/" in s:
        raise UnsafeKey(f"'/' in a single key segment refused: {s!r}")
    return check_key(s)


def safe_key(*parts: str | int) -> str:
    """Join parts into a key; each part must be one safe segment (or a safe sub-path)."""
    if not parts:
        raise UnsafeKey("object key needs at least one part")
    for p in parts:
        if not isinstance(p, (str, int)) or isinstance(p, bool):
            raise UnsafeKey(f"key part must be a string or an integer, not {type(p).__name__}")
        if isinstance(p, str) and (p.startswith("/") or p.strip("/") == ""):
            raise UnsafeKey(f"empty or absolute key part refused: {p!r}")
    joined = "/".join(p.strip("/") if isinstance(p, str) else str(p) for p in parts)
    return check_object_key(joined)


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def slug(name: str, max_len: int = 80) -> str:
    """A display-safe single path segment made from a user-supplied name."""
    s = _SAFE_NAME.sub("_", unicodedata.normalize("NFKC", name)).strip("._-")
    return (s[:max_len] or "unnamed")


# Deterministic keys: one obvious place for the layout of the store.
class Keys:
    @staticmethod
    def raw_video(raw_prefix: str, name: str) -> str:
        return safe_key(raw_prefix.strip("/"), slug(name, 200))

    # Ids are single segments, so one entity's keys can never land in another's folder.
    @staticmethod
    def keyframe(video_id: str, clip_id: str, frame: int) -> str:
        return safe_key("videos", check_segment(video_id), "clips", check_segment(clip_id),
                        "frames", f"{int(frame):07d}.jpg")

    @staticmethod
    def frame(video_id: str, clip_id: str, frame: int) -> str:
        """A keyframe at source resolution, lossless (next to its small JPEG)."""
        return safe_key("videos", check_segment(video_id), "clips", check_segment(clip_id),
                        "frames", f"{int(frame):07d}.png")

    @staticmethod
    def sample_file(video_id: str, sample_id: str, attempt: int, name: str) -> str:
        return safe_key("videos", check_segment(video_id), "samples", check_segment(sample_id),
                        f"a{int(attempt)}", name)

    @staticmethod
    def dataset(build_id: str, *rest: str) -> str:
        return safe_key("datasets", slug(build_id), *rest)

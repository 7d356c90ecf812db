"""Where a video comes from: a local path or a key in the object store.

Source URIs recorded in ``videos.source_uri``:

* ``file:///abs/path/video.mp4`` (percent-encoded; plain paths are accepted too)
* ``store://<key>`` — an object in the configured store (``store://<prefix>`` for ingest)
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote_to_bytes, urlsplit

from opensubject_tasks.errors import BadInput, UnsafeKey
from opensubject_tasks.storage.base import ObjectStore, check_object_key, check_prefix

STORE_SCHEME = "store://"
FILE_SCHEME = "file://"


@dataclass(frozen=True)
class Source:
    kind: Literal["file", "store"]
    path: Path | None = None   # kind == "file"
    key: str = ""              # kind == "store": an object key or a listing prefix


def parse_source(source: str) -> Source:
    """Parse a source URI or plain path; raises BadInput for anything else."""
    if not isinstance(source, str) or not source:
        raise BadInput("empty source")
    if "\x00" in source:
        raise BadInput("NUL character in source")
    if source.startswith(STORE_SCHEME):
        key = source[len(STORE_SCHEME):]
        try:
            check_prefix(key)
        except UnsafeKey as exc:
            raise BadInput(f"unsafe store key in source: {exc}") from None
        return Source("store", key=key)
    if source.startswith(FILE_SCHEME):
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise BadInput(f"file URI on another host is not supported: {source!r}")
        return Source("file", path=Path(os.fsdecode(unquote_to_bytes(parts.path))))
    scheme = source.split("://", 1)[0] if "://" in source else ""
    if scheme:
        raise BadInput(f"unsupported source scheme {scheme!r} (use a path, file:// or store://)")
    return Source("file", path=Path(source).expanduser())


def file_uri(path: str | Path) -> str:
    """The file:// URI of a local path (absolute, percent-encoded, any bytes allowed)."""
    return Path(os.path.abspath(path)).as_uri()


def store_uri(key: str) -> str:
    return STORE_SCHEME + check_object_key(key)


@contextlib.contextmanager
def local_copy(store: ObjectStore, source_uri: str, tmp_dir: str | Path | None = None) -> Iterator[Path]:
    """A local file with the source's content for the duration of the block.

    Local files are used in place. Store objects are downloaded to a temporary file
    (keeping the extension, which some demuxers use as a hint) that is always removed.
    A missing source raises BadInput: a registered video whose file is gone cannot be
    processed by retrying.
    """
    src = parse_source(source_uri)
    if src.kind == "file":
        assert src.path is not None
        if not src.path.is_file():
            raise BadInput(f"source file is missing or not a file: {src.path}")
        yield src.path
        return
    key = src.key
    try:
        check_object_key(key)
    except UnsafeKey as exc:
        raise BadInput(f"not an object key: {exc}") from None
    suffix = Path(key).suffix
    suffix = suffix if suffix[1:].isascii() and suffix[1:].isalnum() and len(suffix) <= 10 else ""
    fd, tmp = tempfile.mkstemp(prefix="opensubject-src-", suffix=suffix, dir=tmp_dir)
    os.close(fd)
    try:
        try:
            store.get_file(key, tmp)
        except FileNotFoundError:
            raise BadInput(f"source object is missing: {key}") from None
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)

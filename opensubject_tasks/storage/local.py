"""A directory as an object store (embedded mode).

Objects live at ``<root>/<key>``. A write goes to a temporary file under
``<root>/.incoming/`` and is renamed into place, so a reader sees either the old
object or the complete new one, never a half-written file.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from opensubject_tasks.errors import UnsafeKey
from opensubject_tasks.storage.base import ObjectInfo, check_object_key, check_prefix

STAGING_DIR = ".incoming"  # reserved first segment: temporary files of writes in progress
_CHUNK = 1024 * 1024


@functools.lru_cache(maxsize=65536)
def _md5(path: str, _ino: int, _size: int, _mtime_ns: int) -> str:
    # Cached per (inode, size, mtime): a rewritten file gets a new entry.
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _addressable(key: str) -> bool:
    # Temporary files, and files put there by other means under names no key may
    # have, are not objects.
    if key.startswith(STAGING_DIR + "/"):
        return False
    try:
        check_object_key(key)
    except UnsafeKey:
        return False
    return True


class LocalStore:
    """ObjectStore over a local directory. ETags are the MD5 of the content (as S3 single-part)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._real_root = self.root.resolve()
        self._staging = self.root / STAGING_DIR
        self._staging.mkdir(exist_ok=True)
        self._drop_stale_temp_files()

    def _drop_stale_temp_files(self, older_than_s: float = 24 * 3600) -> None:
        # Left behind only by a process killed mid-write; never part of an object.
        cutoff = time.time() - older_than_s
        for tmp in self._staging.glob("*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- keys -> paths ---------------------------------------------------------
    def _path(self, key: str) -> Path:
        check_object_key(key)
        if key.split("/", 1)[0] == STAGING_DIR:
            raise UnsafeKey(f"object key uses the reserved prefix {STAGING_DIR!r}: {key!r}")
        path = self.root / key
        # A symlink planted inside the root must not lead outside it.
        if not path.resolve().is_relative_to(self._real_root):
            raise UnsafeKey(f"object key resolves outside the store: {key!r}")
        return path

    # -- writes ------------------------------------------------------------------
    def _write_atomic(self, path: Path, fill) -> None:  # noqa: ANN001 - fill(file) writes the content
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._staging / f"{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on one filesystem
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._write_atomic(self._path(key), lambda f: f.write(data))

    def put_file(self, key: str, path: str | Path, content_type: str = "application/octet-stream") -> None:
        target = self._path(key)
        with open(path, "rb") as src:  # opened first: a missing source leaves no trace
            self._write_atomic(target, lambda f: shutil.copyfileobj(src, f, _CHUNK))

    # -- reads -------------------------------------------------------------------
    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"no such object: {key}") from None

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    def get_file(self, key: str, path: str | Path) -> None:
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._open(key) as src:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name[:50]}.", suffix=".part", dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                os.replace(tmp, dest)
            finally:
                Path(tmp).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _info(self, key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(key=key, size=st.st_size, etag=_md5(str(path), st.st_ino, st.st_size, st.st_mtime_ns))

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no such object: {key}")
        return self._info(key, path)

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects whose key starts with prefix (a plain string prefix, as in S3), in key order
        (those after ``start_after`` when given)."""
        check_prefix(prefix)
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root / folder
        if not base.is_dir() or not base.resolve().is_relative_to(self._real_root):
            return
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):  # does not follow symlinked folders
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            if rel == "":
                dirnames[:] = [d for d in dirnames if d != STAGING_DIR]
            for name in filenames:
                key = rel + name
                if key.startswith(prefix) and (not start_after or key > start_after) and _addressable(key) and not os.path.islink(os.path.join(dirpath, name)):
                    keys.append(key)
        for key in sorted(keys):
            try:
                yield self._info(key, self.root / key)
            except FileNotFoundError:  # deleted while listing
                continue

    # -- other -------------------------------------------------------------------
    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing one is not an error (as in S3)."""
        path = self._path(key)
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)

    def url(self, key: str, expires_s: int | None = None) -> str:
        """A file:// URL (local files do not expire; expires_s is accepted for the interface)."""
        return self._path(key).resolve().as_uri()

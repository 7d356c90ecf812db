"""Where an export is written: the object store under ``datasets/<build>/`` or a local
folder. Both sinks take whole files (put, put_file), read one back (get, exists) and
remove a file. Neither lists: the export knows its files from its plan and its manifest
parts, so that finishing an export costs the same however many files it holds."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from opensubject_tasks.storage import Keys, ObjectStore

FILE_MODE, DIR_MODE = 0o644, 0o755   # readable by a training job under another user


# -- sinks ---------------------------------------------------------------------------
class Sink(Protocol):
    root: str
    local_root: str | None                 # absolute folder path of the root, where it has one
    tmp_dir: str | None                    # where shard files are built before put_file
    def put(self, rel: str, data: bytes) -> None: ...
    def put_file(self, rel: str, path: Path) -> None: ...
    def get(self, rel: str) -> bytes: ...
    def exists(self, rel: str) -> bool: ...
    def remove(self, rel: str) -> None: ...
    def clean_temporary(self) -> None: ...


class StoreSink:
    """Writes under ``datasets/<build>/`` in the object store."""

    def __init__(self, store: ObjectStore, build_id: str) -> None:
        self.store, self.build_id = store, build_id
        self.prefix = Keys.dataset(build_id, "x")[:-1]
        self.root = self.prefix
        self.local_root = None          # no file-system path: see export.omnigen2_root
        self.tmp_dir = None

    def put(self, rel: str, data: bytes) -> None:
        self.store.put_bytes(Keys.dataset(self.build_id, rel), data, content_type=_content_type(rel))

    def put_file(self, rel: str, path: Path) -> None:
        self.store.put_file(Keys.dataset(self.build_id, rel), path, content_type=_content_type(rel))

    def get(self, rel: str) -> bytes:
        return self.store.get_bytes(Keys.dataset(self.build_id, rel))

    def exists(self, rel: str) -> bool:
        return self.store.exists(Keys.dataset(self.build_id, rel))

    def remove(self, rel: str) -> None:
        self.store.delete(Keys.dataset(self.build_id, rel))

    def clean_temporary(self) -> None:
        """Nothing to do: an object appears whole or not at all."""


class DirSink:
    """Writes into a local folder; each file appears whole (a temp file in ``.tmp/``,
    renamed into place). Files are 0644 and folders 0755 whatever the umask: a training
    job under another user or in a container must be able to read them."""

    def __init__(self, out_dir: Path) -> None:
        self.out = Path(out_dir)
        self._mkdir(self.out)
        st = self.out.stat()
        if (st.st_mode & DIR_MODE) != DIR_MODE and st.st_uid == os.getuid():
            os.chmod(self.out, DIR_MODE)   # an existing export folder of ours made under a strict umask
        self.root = str(self.out)
        self.local_root = str(self.out.resolve())
        self.tmp_dir = str(self.out / ".tmp")   # same filesystem: a finished file is renamed into place
        self._mkdir(Path(self.tmp_dir))

    def _mkdir(self, folder: Path) -> None:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        for p in missing:   # mkdir honours the umask: open up every folder made here
            os.chmod(p, DIR_MODE)

    def put(self, rel: str, data: bytes) -> None:
        path = self.out / rel
        self._mkdir(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".part", dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, FILE_MODE)   # mkstemp makes 0600
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put_file(self, rel: str, path: Path) -> None:
        dest = self.out / rel
        self._mkdir(dest.parent)
        os.chmod(path, FILE_MODE)
        os.replace(path, dest)

    def get(self, rel: str) -> bytes:
        return (self.out / rel).read_bytes()

    def exists(self, rel: str) -> bool:
        return (self.out / rel).is_file()

    def clean_temporary(self) -> None:
        """Drop what an interrupted export left: ``.tmp/`` and partial files in the root
        (where earlier versions built shards)."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        with os.scandir(self.out) as entries:
            for e in entries:
                if e.name.startswith(".") and e.name.endswith(".part") and e.is_file():
                    os.unlink(e.path)

    def remove(self, rel: str) -> None:
        path = self.out / rel
        path.unlink(missing_ok=True)
        for folder in path.parents:   # numbered image folders left empty go too
            if folder == self.out or not folder.is_relative_to(self.out):
                break
            try:
                folder.rmdir()
            except OSError:
                break


def _content_type(rel: str) -> str:
    return {"tar": "application/x-tar", "json": "application/json", "html": "text/html",
            "png": "image/png", "jpg": "image/jpeg", "parquet": "application/vnd.apache.parquet",
            "jsonl": "application/jsonl"}.get(rel.rsplit(".", 1)[-1], "application/octet-stream")


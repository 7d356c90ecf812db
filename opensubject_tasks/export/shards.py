"""Stage 5: turn verified samples into dataset files. Pure functions: records and bytes
in, bytes and plain dicts out; the service feeds them from the db and the store and
writes the results to a sink (the object store or a local directory).

Everything here is deterministic: the same records give the same bytes (sorted keys,
fixed tar metadata, no timestamps), so a re-export of an unchanged build is
byte-identical and a resumed build exports the same files as an uninterrupted one.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

# Images per sample, in the order they are written to a shard: (name in the sample
# row's keys, whether the exporter requires it).
SHARD_IMAGES = ("reference", "mask", "generation_input", "generation_mask",
                "manipulation_input", "manipulation_mask", "target")
REQUIRED_IMAGES = ("reference", "mask", "generation_input", "manipulation_input", "target")

TAR_MTIME = 0           # fixed member metadata: the bytes depend on content only
TAR_RECORD = tarfile.RECORDSIZE
_BLOCK = tarfile.BLOCKSIZE


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(sample_id: str) -> str:
    """WebDataset groups tar members by the name up to the first dot: no dots in keys."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", sample_id)


def image_ext(store_key: str) -> str:
    ext = store_key.rsplit(".", 1)[-1].lower() if "." in store_key.rsplit("/", 1)[-1] else "png"
    return {"jpeg": "jpg"}.get(ext, ext)


def image_size(data: bytes) -> tuple[int, int]:
    """An encoded image's (width, height), from its header."""
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def dumps(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace variance, UTF-8."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass
class ExportRecord:
    """One verified sample with everything the dataset says about it."""
    sample_id: str
    image_keys: dict[str, str]          # name -> store key
    meta: dict[str, Any]                # the per-sample JSON (captions, boxes, scores, lineage)
    category: str = "object"
    caption_short: str = ""
    caption_long: str = ""
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return sample_key(self.sample_id)


# -- tar shards ----------------------------------------------------------------------
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, TAR_MTIME, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def member_size(name: str, size: int) -> int:
    """Bytes a member takes in a tar: its header(s) plus its data padded to 512."""
    header = len(_tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    return header + -(-size // _BLOCK) * _BLOCK


def tar_size(content_bytes: int) -> int:
    """Size of a finished tar holding members that take ``content_bytes``."""
    return -(-(content_bytes + 2 * _BLOCK) // TAR_RECORD) * TAR_RECORD


def sample_members(record: ExportRecord, images: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """The tar members of one sample: its images and its JSON, named ``<key>.<name>.<ext>``."""
    out = [(f"{record.key}.{name}.{image_ext(record.image_keys[name])}", images[name])
           for name in SHARD_IMAGES if name in images]
    out.append((f"{record.key}.json", dumps(record.meta)))
    return out


class ShardWriter:
    """Writes samples into size-bounded tar shards, in the order given.

    A sample never straddles shards; a new shard starts when the next sample would push
    the current one over ``max_bytes`` or ``max_samples`` (a single sample larger than
    ``max_bytes`` gets a shard of its own). Shards are built in a temporary file (in
    ``tmp_dir``), never in memory; ``sink(name, path)`` receives each finished shard and
    may move the file away; whatever is left is deleted.
    """

    def __init__(self, sink, max_bytes: int, max_samples: int,  # noqa: ANN001 - callable(name, Path)
                 tmp_dir: str | Path | None = None) -> None:
        self.sink, self.max_bytes, self.max_samples = sink, max_bytes, max_samples
        self.tmp_dir = tmp_dir
        self.shards: list[dict[str, Any]] = []
        self._path: Path | None = None
        self._tar: tarfile.TarFile | None = None
        self._content = 0
        self._count = 0

    def add(self, members: Sequence[tuple[str, bytes]]) -> str:
        """Add one sample's members; returns the name of the shard that holds it."""
        size = sum(member_size(n, len(d)) for n, d in members)
        if self._tar is not None and (self._count >= self.max_samples
                                      or tar_size(self._content + size) > self.max_bytes):
            self._close()
        if self._tar is None:
            fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tar.part", dir=self.tmp_dir)
            os.close(fd)
            self._path = Path(tmp)
            self._tar = tarfile.open(self._path, mode="w", format=tarfile.PAX_FORMAT)
            self._content = self._count = 0
        for name, data in members:
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self._content += size
        self._count += 1
        return shard_name(len(self.shards))

    def _close(self) -> None:
        assert self._tar is not None and self._path is not None
        self._tar.close()
        name, path = shard_name(len(self.shards)), self._path
        self._tar = self._path = None
        try:
            size = path.stat().st_size
            self.sink(name, path)
        finally:
            path.unlink(missing_ok=True)
        self.shards.append({"name": name, "samples": self._count, "bytes": size})

    def finish(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (after an error)."""
        if self._tar is not None:
            self._tar.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        self._tar = self._path = None


# The OmniGen2 training layout is its own unit: export/omnigen2.py.


# -- stats ---------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?%?")


def reason_kind(reason: str) -> str:
    """A reason with its numbers blanked, so the same cause counts as one kind."""
    return _NUMBER.sub("#", " ".join(reason.split()))[:300]


def count_reasons(items: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """(stage, reason) pairs -> [{stage, reason, count, example}], most frequent first."""
    counts: Counter[tuple[str, str]] = Counter()
    example: dict[tuple[str, str], str] = {}
    for stage, reason in items:
        if not reason:
            continue
        k = (stage, reason_kind(reason))
        counts[k] += 1
        example.setdefault(k, reason[:300])
    return [{"stage": s, "reason": r, "count": n, "example": example[(s, r)]}
            for (s, r), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def throughput(by_status: Iterable[tuple[str, str, int, float | None]],
               entities: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per stage: attempts by status, busy seconds, and items per busy second, from
    (stage, status, attempts, seconds) counts and each stage's number of entities."""
    per: dict[str, dict[str, Any]] = {}
    for stage, status, n, seconds in by_status:
        st = per.setdefault(stage, {"attempts": 0, "by_status": {}, "seconds": 0.0})
        st["attempts"] += int(n)
        st["by_status"][status] = st["by_status"].get(status, 0) + int(n)
        st["seconds"] += float(seconds or 0.0)
    out = {}
    for stage, st in sorted(per.items()):
        secs = st["seconds"]
        out[stage] = {"attempts": st["attempts"], "entities": int(entities.get(stage, 0)),
                      "by_status": dict(sorted(st["by_status"].items())),
                      "busy_seconds": round(secs, 3),
                      "mean_seconds": round(secs / st["attempts"], 4) if st["attempts"] else 0.0,
                      "per_second": round(st["attempts"] / secs, 3) if secs > 0 else None}
    return out


# -- boxes ---------------------------------------------------------------------------
def _scaled(box: Sequence[float], sx: float, sy: float) -> list[float]:
    return [float(box[0]) * sx, float(box[1]) * sy, float(box[2]) * sx, float(box[3]) * sy]


def image_boxes(meta: dict[str, Any], target_size: tuple[int, int]) -> dict[str, Any]:
    """A sample's boxes in the pixels of the images it ships, with their sizes [w, h]:
    ``tgt_box`` in the exported target's, ``ref_box`` in the reference frame's at the
    resolution the reference crop was cut from (mining's boxes are in keyframe pixels)."""
    boxes = meta["boxes"]
    frames = ((meta.get("lineage") or {}).get("augment") or {}).get("frames") or {}
    kf = boxes.get("target_frame_size")
    if kf:
        sx, sy = target_size[0] / kf[0], target_size[1] / kf[1]
    else:
        sx, sy = (frames.get("target") or {}).get("scale") or (1.0, 1.0)
    ref = frames.get("reference") or {}
    rx, ry = ref.get("scale") or (1.0, 1.0)
    ref_size = ref.get("size") or boxes.get("reference_frame_size")
    return {"tgt_box": _scaled(boxes["target"], sx, sy), "tgt_size": [int(v) for v in target_size],
            "ref_box": _scaled(boxes["reference"], rx, ry),
            "ref_size": [int(v) for v in ref_size] if ref_size else None}

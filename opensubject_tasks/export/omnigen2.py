"""The OmniGen2 training layout of an export: images, JSONL records and a data config.

OmniGen2's training dataset (``omnigen2/dataset/omnigen2_train_dataset.py``) reads a
data-config YAML (``data: [{path, type, ratio}]``); a ``path`` that is a folder means
every ``*.jsonl``/``*.json`` under it; it opens every ``input_images`` /
``output_image`` path *as written*, from the trainer's working directory. So:

* records hold absolute paths (``root`` + the file's path in the export) unless the
  export is configured for relative ones; the YAML lists the JSONL folders the same way;
* the JSONL files and the YAML live in ``omnigen2/``, apart from ``stats.json`` and the
  rest (OmniGen2 globs every ``*.json``/``*.jsonl`` under a folder it is pointed at);
* records have exactly the four keys OmniGen2's own data uses, so they concatenate
  with other OmniGen2 datasets.
* ``ratio``: the released loader requires the key but does not apply it (the
  resampled copies it computes are dropped, and the concatenation uses every record
  of every entry once). Every record is therefore seen once per epoch whatever the
  ratio; listing an entry twice is what doubles its weight there.

The layout is written one export shard at a time, so that a part of the export needs
memory for its own samples only: each shard's records go to
``omnigen2/jsonl/<kind>/part-NNNNNN.jsonl`` and its images to
``Images/{generation,manipulation}/{input_images,output_images}/NNNNNN/<name>``
(one numbered folder per shard, as the released corpus numbers its folders, so no
folder holds millions of files). A file's name is the hash of its bytes, so within a
shard an image is stored once however many records use it: the target frame shared by
a sample's generation and manipulation records (and by a multi-subject record), the
subject image that is both a generation input and a manipulation reference. Every
image lives in the folder of its first role (generation inputs and targets under
``generation/``, scenes to edit under ``manipulation/input_images``); manipulation
records point there. A shard's images are listed in its manifest part, which is how a
later export finds the ones it no longer writes without listing the store.

Multi-subject samples: verified samples of 2-4 different subjects of one clip that
share the target frame (and the shard) make one generation record with one input per
subject.

Pure functions and a small accumulator; the caller hands it image bytes and ``put`` /
``remove`` callables, so the same code writes to a folder or an object store.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import yaml
from PIL import Image

from opensubject_tasks.export.shards import dumps, image_size
from opensubject_tasks.instructions import (
    MAX_SUBJECTS, TASK_GENERATION, TASK_MANIPULATION, generation_instruction,
    manipulation_instruction, region_box, subject_phrase,
)

LAYOUT_DIR = "omnigen2"
DATA_CONFIG = f"{LAYOUT_DIR}/data.yml"
# name -> (folder of the JSONL parts, OmniGen2 task type); the order is the YAML's
JSONL_DIRS = {
    "generation": (f"{LAYOUT_DIR}/jsonl/generation", TASK_GENERATION),
    "generation_multi": (f"{LAYOUT_DIR}/jsonl/generation_multi_subject", TASK_GENERATION),
    "manipulation": (f"{LAYOUT_DIR}/jsonl/manipulation", TASK_MANIPULATION),
}
IMAGE_DIRS = {"generation_input": "Images/generation/input_images",
              "target": "Images/generation/output_images",
              "manipulation_input": "Images/manipulation/input_images"}
Put = Callable[[str, bytes], None]
Remove = Callable[[str], None]


def image_path(role: str, data: bytes, shard: int, ext: str = "png") -> str:
    """Where an image goes: its role's folder, its shard's numbered folder, its content hash."""
    return f"{IMAGE_DIRS[role]}/{shard:06d}/{hashlib.sha256(data).hexdigest()[:40]}.{ext}"


def jsonl_part(name: str, shard: int) -> str:
    """The JSONL file of one kind of record of one shard."""
    return f"{JSONL_DIRS[name][0]}/part-{shard:06d}.jsonl"


def absolute(rel: str, root: str | None) -> str:
    return f"{root.rstrip('/')}/{rel}" if root else rel


@dataclass
class LayoutEntry:
    """One verified sample as the layout sees it (paths relative to the export root)."""
    key: str
    clip_id: str
    target_frame: int
    subject_id: str
    subject_idx: int
    subject: str                        # the phrase naming it in instructions
    description: str                    # the target's long caption
    score: float                        # verification overall, to pick among a subject's samples
    generation_input: str
    manipulation_input: str
    target: str
    generation_instruction: str
    manipulation_instruction: str


def _mask_box(data: bytes) -> list[float] | None:
    with Image.open(io.BytesIO(data)) as im:
        return region_box(np.asarray(im.convert("L")) > 127)


def manipulation_region(meta: dict[str, Any], images: dict[str, bytes]) -> tuple[list[float], tuple[int, int]]:
    """The region to replace, in target pixels, and the target's size: the stored
    manipulation mask's box (as the benchmark takes it), else the synthesis record's."""
    size = image_size(images["target"])
    box = _mask_box(images["manipulation_mask"]) if images.get("manipulation_mask") else None
    augment = (meta.get("lineage") or {}).get("augment") or {}
    if box is None and augment.get("manipulation_box"):
        box = [float(v) for v in augment["manipulation_box"]]
    if box is None:   # the pair's box, scaled from keyframe to target pixels
        b = [float(v) for v in meta["boxes"]["target"]]
        kf = meta["boxes"].get("target_frame_size") or list(size)
        sx, sy = size[0] / kf[0], size[1] / kf[1]
        box = [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]
    return box, size


def replaced_object(meta: dict[str, Any]) -> str | None:
    """What the synthesis asked the inpainter to put where the subject was, if anything."""
    augment = (meta.get("lineage") or {}).get("augment") or {}
    return (augment.get("replacement") or {}).get("object")


class OmniGen2Layout:
    """The layout of one shard of an export: ``add`` per verified sample writes its
    images (once per content), ``finish`` writes the shard's JSONL parts."""

    def __init__(self, root: str | None, shard: int) -> None:
        self.root = root                      # absolute export root for the records, or None
        self.shard = shard
        self.entries: list[LayoutEntry] = []
        self.written: set[str] = set()

    def add(self, record: Any, images: dict[str, bytes], put: Put) -> LayoutEntry:
        """``record``: an ExportRecord; ``images``: its stored images by name."""
        meta = record.meta
        paths = {}
        for role in IMAGE_DIRS:
            rel = image_path(role, images[role], self.shard, _ext(record.image_keys.get(role, "")))
            if rel not in self.written:
                put(rel, images[role])
                self.written.add(rel)
            paths[role] = rel
        subject = subject_phrase(record.caption_short, record.category)
        box, size = manipulation_region(meta, images)
        lineage = meta["lineage"]
        entry = LayoutEntry(
            key=record.key, clip_id=lineage["clip"]["id"], target_frame=int(lineage["frames"]["target"]),
            subject_id=lineage["subject"]["id"], subject_idx=int(lineage["subject"]["idx"]),
            subject=subject, description=record.caption_long,
            score=float(record.scores.get("overall", record.scores.get("identity", 0.0)) or 0.0),
            generation_input=paths["generation_input"], manipulation_input=paths["manipulation_input"],
            target=paths["target"],
            generation_instruction=generation_instruction([subject], record.caption_long),
            manipulation_instruction=manipulation_instruction(subject, box, size, replaced_object(meta),
                                                              record.caption_long))
        self.entries.append(entry)
        return entry

    def finish(self, put: Put, remove: Remove) -> dict[str, str]:
        """Write the shard's JSONL parts (a kind without records has no file: an empty
        JSONL cannot be loaded) and return the multi-subject record of each sample in one."""
        records = training_records(self.entries, self.root)
        for name in JSONL_DIRS:
            if records[name]:
                put(jsonl_part(name, self.shard), b"".join(_line(r) for r in records[name]))
            else:   # an earlier export's part of this shard may have had some
                remove(jsonl_part(name, self.shard))
        return {e.key: multi_subject_key(g) for g in multi_subject_groups(self.entries) for e in g}


def _ext(store_key: str) -> str:
    name = store_key.rsplit("/", 1)[-1]
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else "png"
    return {"jpeg": "jpg"}.get(ext, ext)


def _line(record: dict[str, Any]) -> bytes:
    return dumps(record) + b"\n"


def multi_subject_groups(entries: Sequence[Any]) -> list[list[Any]]:
    """Samples of different subjects of one clip sharing a target frame: 2..MAX_SUBJECTS
    per group (the best-verified sample per subject; subjects in index order). Entries
    are anything with ``clip_id``, ``target_frame``, ``subject_idx``, ``score``, ``key``
    (the benchmark groups its cases with the same rule)."""
    by_frame: dict[tuple[str, int], dict[int, Any]] = {}
    for e in entries:
        per_subject = by_frame.setdefault((e.clip_id, e.target_frame), {})
        best = per_subject.get(e.subject_idx)
        if best is None or (e.score, best.key) > (best.score, e.key):
            per_subject[e.subject_idx] = e
    groups = []
    for _, per_subject in sorted(by_frame.items()):
        members = [per_subject[i] for i in sorted(per_subject)][:MAX_SUBJECTS]
        if len(members) >= 2:
            groups.append(members)
    return groups


def multi_subject_key(group: Sequence[LayoutEntry]) -> str:
    return f"{group[0].clip_id}-f{group[0].target_frame}-multi"


def training_records(entries: Iterable[LayoutEntry], root: str | None) -> dict[str, list[dict[str, Any]]]:
    """The OmniGen2 records of a set of samples: one single-subject generation and one
    manipulation record per sample, one multi-subject generation record per group."""
    entries = sorted(entries, key=lambda e: e.key)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in JSONL_DIRS}
    for e in entries:
        out["generation"].append(_record(TASK_GENERATION, e.generation_instruction,
                                         [e.generation_input], e.target, root))
        # image 1: the scene with the region filled by something else; image 2: the subject
        out["manipulation"].append(_record(TASK_MANIPULATION, e.manipulation_instruction,
                                           [e.manipulation_input, e.generation_input], e.target, root))
    for group in multi_subject_groups(entries):
        instruction = generation_instruction([e.subject for e in group], group[0].description)
        out["generation_multi"].append(_record(TASK_GENERATION, instruction,
                                               [e.generation_input for e in group], group[0].target, root))
    return out


def _record(task: str, instruction: str, inputs: Sequence[str], output: str, root: str | None) -> dict[str, Any]:
    return {"task_type": task, "instruction": instruction,
            "input_images": [absolute(p, root) for p in inputs], "output_image": absolute(output, root)}


def data_config(kinds: Iterable[str], root: str | None) -> bytes:
    """OmniGen2's data-config YAML listing the JSONL folder of each kind of record
    (only kinds with records: OmniGen2 cannot load an empty folder)."""
    data = [{"path": absolute(JSONL_DIRS[name][0], root), "type": JSONL_DIRS[name][1], "ratio": 1.0}
            for name in JSONL_DIRS if name in set(kinds)]
    head = ("# OmniGen2 data config (options/*.yml: data.data_path). Paths are "
            + ("absolute." if root else "relative to the export folder: run the trainer from there.")
            + "\n# ratio: required by OmniGen2's released loader, which does not apply it: every"
            "\n# record of every entry is used once per epoch. List an entry twice to double its weight.\n")
    return (head + yaml.safe_dump({"data": data}, sort_keys=False)).encode()

"""Build the benchmark from a finished build: a held-out split of whole videos.

Layout of a bench directory::

    bench.json            what was built, from which build, counts per split
    held_out_videos.json  the video ids in the bench (the training export must skip them)
    cases.jsonl           one case per line (see ``Case``)
    images/<sample>/      reference.png, mask.png, generation_input.png, generation_mask.png,
                          manipulation_input.png, manipulation_mask.png, target.png

Every verified sample of a held-out video gives one generation case (its subject image
+ instruction -> image; ground truth: the target frame with the subject's box) and one
manipulation case (the scene whose region holds something else + the subject image +
instruction -> image; ground truth: the target, with the region's mask and box).
Verified samples of 2-4 subjects of one clip sharing the target frame also give one
multi-subject generation case (one subject image each), grouped as the export groups
its multi-subject records. Inputs and instructions are exactly the training records'
(``opensubject_tasks.instructions``). Splits follow OSBench: generation is "complex"
(multiple subjects) when it has several subject images, manipulation when its target
frame holds two or more mined subjects.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image
from sqlalchemy import select

from opensubject_tasks.catalogue import SAMPLE_IMAGES
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.lineage import lineage
from opensubject_tasks.db.models import Clip, Pair, Sample, Subject, Video
from opensubject_tasks.errors import BadInput
from opensubject_tasks.export.omnigen2 import multi_subject_groups
from opensubject_tasks.instructions import (
    generation_instruction, manipulation_instruction, region_box, subject_phrase,
)
from opensubject_tasks.storage import slug

BENCH_VERSION = 2   # 2: OmniGen2 instructions and inputs, multi-subject generation cases
HELD_OUT_FILE = "held_out_videos.json"
TASKS = ("generation", "manipulation")
SCENES = ("simple", "complex")
# the axes a case is scored on
AXES = ("identity", "prompt_adherence", "manipulation", "background")
SPLITS = tuple(f"{t}/{s}" for t in TASKS for s in SCENES)
# What each task needs from the sample's stored images.
NEEDS = {
    "generation": ("reference", "generation_input", "target"),
    "manipulation": ("reference", "manipulation_input", "manipulation_mask", "target"),
}


@dataclass
class BenchInfo:
    bench_dir: str
    build_id: str
    share: float
    seed: int
    videos_total: int                       # videos of the build with verified samples
    held_out_videos: list[str]
    cases: int
    splits: dict[str, int]                  # "generation/simple" -> number of cases
    skipped: list[dict[str, str]] = field(default_factory=list)  # sample_id, task, reason
    version: int = BENCH_VERSION
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the held-out split ---------------------------------------------------------------
def video_draw(video_id: str, seed: int) -> float:
    """A fixed pseudo-random number in [0, 1) per (seed, video): the split never depends
    on which other videos exist, so a growing corpus never moves a video across it."""
    digest = hashlib.sha256(f"opensubject-bench:{seed}:{video_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def select_held_out(video_ids: Iterable[str], share: float, seed: int = 0) -> set[str]:
    """The videos that go to the benchmark: those whose draw is below ``share``.

    With two or more videos, at least one is held out and at least one stays for
    training (the lowest / highest draws), so tiny builds still give both sides.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be between 0 and 1 (exclusive), got {share}")
    ids = sorted(set(video_ids))
    draws = {v: video_draw(v, seed) for v in ids}
    held = {v for v in ids if draws[v] < share}
    if len(ids) >= 2:
        if not held:
            held = {min(ids, key=draws.__getitem__)}
        if len(held) == len(ids):
            held.discard(max(ids, key=draws.__getitem__))
    return held


def held_out_videos(bench_dir: str | Path) -> set[str]:
    """Video ids held out by the bench in ``bench_dir``: the training export excludes them."""
    path = Path(bench_dir) / HELD_OUT_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BadInput(f"{bench_dir} is not a bench directory (no {HELD_OUT_FILE})") from exc
    return set(doc["videos"])


# --- cases ----------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    task: str                 # generation | manipulation
    scene: str                # simple | complex
    split: str                # "<task>/<scene>"
    prompt: str               # the instruction, worded as in the training records
    category: str
    box: list[float] | None   # where the subject is in the target (manipulation: the region); None: unknown
    size: list[int]           # [width, height] of the target = the expected output size
    images: dict[str, str]    # reference, input, input_mask (manipulation), target: paths in the bench
    sample_id: str
    video_id: str
    clip_id: str
    subject_id: str
    n_subjects: int           # mined subjects in the target frame
    captions: dict[str, str | None] = field(default_factory=dict)
    box_source: str = ""
    input_images: list[str] = field(default_factory=list)  # the model's inputs, "image 1", "image 2", ...
    members: list[dict[str, Any]] = field(default_factory=list)  # multi-subject: subject_id, reference, box
    task_type: str = ""       # OSBench task type: predictions may also be fullset/<task_type>/<key>.png
    key: str = ""
    instruction_language: str = "en"

    def __post_init__(self) -> None:
        if not self.input_images:   # a bench written before inputs were listed
            self.input_images = [self.images["input"]] + (
                [self.images["reference"]] if self.task == "manipulation" else [])
        self.task_type = self.task_type or osbench_task_type(self.task, self.scene)
        self.key = self.key or self.id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def osbench_task_type(task: str, scene: str) -> str:
    """An OSBench-style task type: the released scorer reads "manipulation" and "single"
    from it."""
    return f"{'single' if scene == 'simple' else 'multiple'}_subject_{task}"


def load_cases(bench_dir: str | Path) -> list[Case]:
    path = Path(bench_dir) / "cases.jsonl"
    if not path.exists():
        raise BadInput(f"{bench_dir} is not a bench directory (no cases.jsonl)")
    return [Case(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def read_image(path: str | Path, mask: bool = False) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127 if mask else np.asarray(im.convert("RGB"))


def _target_box(pair: Pair, clip: Clip, target_wh: tuple[int, int],
                region: np.ndarray | None) -> tuple[list[float], str]:
    """The subject's box in target-image pixels: the manipulation region when stored,
    else the pair's box scaled from keyframe to target size."""
    if region is not None and region.shape[::-1] == target_wh:
        box = region_box(region)
        if box is not None:
            return box, "manipulation_mask"
    kf = next((k for k in (clip.keyframes or []) if k.get("frame") == pair.tgt_frame), None)
    sx = sy = 1.0
    if kf and kf.get("width") and kf.get("height"):
        sx, sy = target_wh[0] / kf["width"], target_wh[1] / kf["height"]
    b = [float(v) for v in pair.tgt_box]
    return [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy], "pair.tgt_box"


def _subjects_in_frame(subjects: list[Subject], frame: int) -> int:
    n = sum(1 for s in subjects if str(frame) in (s.boxes or {}))
    return n if n else len(subjects)  # boxes not keyed by this frame: count the clip's subjects


@dataclass
class _Member:
    clip_id: str
    target_frame: int
    subject_idx: int
    subject_id: str
    subject: str
    score: float
    key: str
    saved: dict[str, str]
    box: list[float]
    common: dict[str, Any]


def _multi_case(group: list[_Member]) -> Case:
    """One generation case from 2-4 subjects sharing a target frame, as the export's
    multi-subject record: one subject image per subject, the shared target."""
    first = group[0]
    return Case(
        id=f"gen-{slug(first.clip_id, 120)}-f{first.target_frame}-multi", task="generation", scene="complex",
        split="generation/complex",
        prompt=generation_instruction([m.subject for m in group], first.common["captions"]["long"]),
        box=first.box, images={"reference": first.saved["reference"], "input": first.saved["generation_input"],
                               "target": first.saved["target"]},
        input_images=[m.saved["generation_input"] for m in group],
        members=[{"subject_id": m.subject_id, "reference": m.saved["reference"], "box": m.box,
                  "sample_id": m.key} for m in group],
        **first.common)


def build_bench(ctx: Context, build_id: str, out_dir: str | Path, *, share: float = 0.2,
                seed: int = 0) -> BenchInfo:
    """Write a bench directory from the verified samples of ``build_id``'s held-out videos.

    Deterministic for (build contents, share, seed); a re-run replaces the directory.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "bench.json").exists():
        raise BadInput(f"{out} exists and is not a bench directory; refusing to overwrite it")
    with session_scope(ctx.sessions) as s:
        rows = s.execute(
            lineage(select(Sample, Pair, Subject, Clip, Video))
            .where(Video.build_id == build_id, Sample.state == "verified")  # as the export selects
            .order_by(Sample.id)).all()
        video_ids = sorted({r[4].id for r in rows})
        if len(video_ids) < 2:
            raise BadInput(f"build {build_id!r} has verified samples from {len(video_ids)} video(s); "
                           "a held-out split needs at least 2 (one for the bench, one for training)")
        held = select_held_out(video_ids, share, seed)
        clip_ids = sorted({r[3].id for r in rows if r[4].id in held})
        clip_subjects: dict[str, list[Subject]] = {c: [] for c in clip_ids}
        for subj in s.scalars(select(Subject).where(Subject.clip_id.in_(clip_ids),
                                                    Subject.state != "rejected")):
            clip_subjects[subj.clip_id].append(subj)
        s.expunge_all()

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    cases: list[Case] = []
    skipped: list[dict[str, str]] = []
    members: list[_Member] = []     # generation cases that may join a multi-subject case
    for sample, pair, subject, clip, video in rows:
        if video.id not in held:
            continue
        keys = sample.keys or {}
        folder = Path("images") / slug(sample.id, 160)
        saved: dict[str, str] = {}
        for name in SAMPLE_IMAGES:
            if not keys.get(name):
                continue
            try:
                data = ctx.store.get_bytes(keys[name])
                with Image.open(io.BytesIO(data)) as im:
                    im = im.convert("L" if name.endswith("mask") else "RGB")
                    (tmp / folder).mkdir(parents=True, exist_ok=True)
                    im.save(tmp / folder / f"{name}.png")
                saved[name] = str(folder / f"{name}.png")
            except (FileNotFoundError, KeyError, OSError, ValueError) as exc:
                skipped.append({"sample_id": sample.id, "task": "*",
                                "reason": f"{name} ({keys[name]}) unreadable: {exc}"})
        if "target" not in saved:
            continue
        target = read_image(tmp / saved["target"])
        target_wh = (target.shape[1], target.shape[0])
        region = read_image(tmp / saved["manipulation_mask"], mask=True) \
            if "manipulation_mask" in saved else None
        box, box_source = _target_box(pair, clip, target_wh, region)
        n_subj = _subjects_in_frame(clip_subjects.get(clip.id, []), pair.tgt_frame)
        phrase = subject_phrase(sample.caption_short, subject.category)
        replaced = (((sample.augment or {}).get("replacement") or {}).get("object"))
        prompts = {"generation": generation_instruction([phrase], sample.caption_long),
                   "manipulation": manipulation_instruction(phrase, box, target_wh, replaced, sample.caption_long)}
        common = dict(category=subject.category, size=list(target_wh), sample_id=sample.id, video_id=video.id,
                      clip_id=clip.id, subject_id=subject.id, n_subjects=n_subj, box_source=box_source,
                      captions={"short": sample.caption_short, "long": sample.caption_long,
                                "source": sample.caption_source})
        for task in TASKS:
            missing = [n for n in NEEDS[task] if n not in saved]
            if missing:
                skipped.append({"sample_id": sample.id, "task": task,
                                "reason": f"no stored {', '.join(missing)}"})
                continue
            images = {"reference": saved["reference"], "target": saved["target"],
                      "input": saved[f"{task}_input"]}
            if task == "manipulation":
                images["input_mask"] = saved["manipulation_mask"]
            if "mask" in saved:
                images["reference_mask"] = saved["mask"]
            # the training records' inputs: the subject image; for manipulation the scene first
            inputs = [saved["generation_input"]] if task == "generation" else \
                [saved["manipulation_input"], saved["generation_input"]]
            # one subject image: a single-subject case; manipulation: complex when others are in the frame
            scene = "complex" if task == "manipulation" and n_subj >= 2 else "simple"
            cases.append(Case(id=f"{task[:3]}-{slug(sample.id, 160)}", task=task, scene=scene,
                              split=f"{task}/{scene}", prompt=prompts[task], box=[round(v, 2) for v in box],
                              images=images, input_images=inputs, **common))
        if "generation_input" in saved:
            members.append(_Member(clip.id, pair.tgt_frame, subject.idx, subject.id, phrase,
                                   float((sample.verdict or {}).get("scores", {}).get("overall", 0.0) or 0.0),
                                   sample.id, saved, [round(v, 2) for v in box], common))
    cases += [_multi_case(g) for g in multi_subject_groups(members)]

    counts = Counter(c.split for c in cases)
    info = BenchInfo(
        bench_dir=str(out.resolve()), build_id=build_id, share=share, seed=seed,
        videos_total=len(video_ids), held_out_videos=sorted(held), cases=len(cases),
        splits={sp: counts.get(sp, 0) for sp in SPLITS}, skipped=skipped,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    with open(tmp / "cases.jsonl", "w") as f:
        for c in cases:
            f.write(json.dumps(c.to_dict(), sort_keys=True) + "\n")
    (tmp / HELD_OUT_FILE).write_text(json.dumps(
        {"build_id": build_id, "share": share, "seed": seed, "videos": sorted(held)}, indent=1))
    (tmp / "bench.json").write_text(json.dumps(info.to_dict(), indent=1))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return info

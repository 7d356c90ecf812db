"""Stage 5 service: export a build's verified samples. One implementation, two sinks:
the object store under ``datasets/<build>/`` (the ``export`` stage) or a local folder
(``export_build_to``, used by ``opensubject export`` and ``opensubject run --out``).

Written under the export root:
  shard-000000.tar ...          WebDataset shards (<key>.<image>.png, <key>.json)
  manifest.parquet              one row per sample
  stats.json                    funnel, rejection reasons, verification, throughput
  report.html                   self-contained report
  Images/{generation,manipulation}/{input_images,output_images}/NNNN/...,
  omnigen2/data.yml, omnigen2/jsonl/*.jsonl         OmniGen2 training layout (stages/omnigen2.py)
Files of an earlier export that this one did not write (shards beyond the new count,
images of samples no longer verified) are removed, so the root always equals one export.
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Build, Clip, Pair, Sample, StageAttempt, Subject, Video
from opensubject_tasks.errors import BadInput
from opensubject_tasks.report import THUMB_NAMES, ReportSample, pick_grid, render_report, thumbnail_uri
from opensubject_tasks.services.common import StageResult, stage
from opensubject_tasks.stages.export import (
    REQUIRED_IMAGES, SHARD_IMAGES, ExportRecord, ShardWriter, count_reasons, dumps, sample_members,
    throughput,
)
from opensubject_tasks.stages.omnigen2 import LayoutEntry, OmniGen2Layout, multi_subject_groups, multi_subject_key
from opensubject_tasks.storage import Keys, ObjectStore

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("sample_id", pa.string()), ("shard", pa.string()),
    ("video_id", pa.string()), ("video_name", pa.string()), ("clip_id", pa.string()),
    ("subject_id", pa.string()), ("pair_id", pa.string()), ("category", pa.string()),
    ("ref_frame", pa.int64()), ("tgt_frame", pa.int64()),
    ("ref_box", pa.list_(pa.float64())), ("tgt_box", pa.list_(pa.float64())),
    ("attempt", pa.int64()), ("seed", pa.int64()),
    ("caption_short", pa.string()), ("caption_long", pa.string()), ("caption_source", pa.string()),
    ("verifier", pa.string()), ("identity", pa.float64()), ("residual", pa.float64()),
    ("artifact", pa.float64()), ("overall", pa.float64()), ("scores_json", pa.string()),
    ("generation_input_image", pa.string()), ("manipulation_input_images", pa.list_(pa.string())),
    ("output_image", pa.string()),
    ("generation_instruction", pa.string()), ("manipulation_instruction", pa.string()),
    ("multi_subject_key", pa.string()),   # the multi-subject record this sample is part of
])
# Files this exporter owns in a local export folder (anything else there is left alone),
# including temporary files an interrupted export left behind.
_OWNED = re.compile(r"^(shard-\d{6}\.tar|manifest\.parquet|stats\.json|report\.html|"
                    r"train_(generation|manipulation)\.jsonl|Images/(generation|manipulation)/"
                    r"(input|output)_images/(\d{4}/)?[^/]+|omnigen2/(data\.yml|jsonl/[^/]+\.jsonl)|"
                    r"((Images|omnigen2)/.*/)?\.[^/]*\.part)$")
FILE_MODE, DIR_MODE = 0o644, 0o755   # readable by a training job under another user
_VERSIONED = ("opensubject-tasks", "numpy", "opencv-contrib-python-headless", "pillow",
              "scikit-image", "torch", "transformers", "diffusers")


# -- sinks ---------------------------------------------------------------------------
class Sink(Protocol):
    root: str
    local_root: str | None                 # absolute folder path of the root, where it has one
    tmp_dir: str | None                    # where shard files are built before put_file
    def put(self, rel: str, data: bytes) -> None: ...
    def put_file(self, rel: str, path: Path) -> None: ...
    def existing(self) -> list[str]: ...
    def remove(self, rel: str) -> None: ...


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

    def existing(self) -> list[str]:
        return [o.key[len(self.prefix):] for o in self.store.list(self.prefix)]

    def remove(self, rel: str) -> None:
        self.store.delete(Keys.dataset(self.build_id, rel))


class DirSink:
    """Writes into a local folder; each file appears whole (temp file + rename). Files
    are 0644 and folders 0755 whatever the umask: a training job under another user
    or in a container must be able to read them."""

    def __init__(self, out_dir: Path) -> None:
        self.out = Path(out_dir)
        self._mkdir(self.out)
        st = self.out.stat()
        if (st.st_mode & DIR_MODE) != DIR_MODE and st.st_uid == os.getuid():
            os.chmod(self.out, DIR_MODE)   # an existing export folder of ours made under a strict umask
        self.root = str(self.out)
        self.local_root = str(self.out.resolve())
        self.tmp_dir = str(self.out)   # same filesystem: a finished shard is renamed into place

    def _mkdir(self, folder: Path) -> None:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        for p in missing:   # mkdir honours the umask: open up every folder made here
            os.chmod(p, DIR_MODE)

    def put(self, rel: str, data: bytes) -> None:
        path = self.out / rel
        self._mkdir(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".part", dir=path.parent)
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

    def existing(self) -> list[str]:
        return sorted(p.relative_to(self.out).as_posix() for p in self.out.rglob("*")
                      if p.is_file() and _OWNED.match(p.relative_to(self.out).as_posix()))

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


# -- result --------------------------------------------------------------------------
@dataclass
class ExportResult:
    build_id: str
    root: str                              # folder or store prefix
    samples: int
    shards: list[str]
    files: list[str] = field(default_factory=list)   # every file written, relative to root
    shard_bytes: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)  # stale files of an earlier export

    def __str__(self) -> str:
        return (f"{self.samples} samples in {len(self.shards)} shard(s) "
                f"({self.shard_bytes / 1e6:.1f} MB), {len(self.files)} files under {self.root}"
                + (f", {len(self.removed)} stale file(s) removed" if self.removed else ""))


# -- reading the build ---------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _frame_size(clip: Clip, frame: int) -> list[int] | None:
    for kf in clip.keyframes or []:
        if isinstance(kf, dict) and kf.get("frame") == frame and kf.get("width"):
            return [kf["width"], kf["height"]]
    return None


def _record(build_id: str, sample: Sample, pair: Pair, subject: Subject, clip: Clip, video: Video,
            versions: dict[str, str]) -> ExportRecord:
    verdict = sample.verdict or {}
    history = sample.history or []
    meta = {
        "id": sample.id,
        "build": build_id,
        "category": subject.category,
        "category_source": subject.category_source,
        "captions": {"short": sample.caption_short, "long": sample.caption_long,
                     "source": sample.caption_source},
        "boxes": {"reference": pair.ref_box, "target": pair.tgt_box, "space": "keyframe pixels",
                  "reference_frame_size": _frame_size(clip, pair.ref_frame),
                  "target_frame_size": _frame_size(clip, pair.tgt_frame),
                  # keyframe pixels -> the exported images' pixels (targets are full frames)
                  "image_scale": {k: v.get("scale") for k, v in ((sample.augment or {}).get("frames") or {}).items()}},
        "scores": {"verify": verdict.get("scores", {}), "pair": pair.scores or {},
                   "clip_quality": clip.score, "category_consensus": subject.consensus},
        "verdict": {"passed": verdict.get("passed"), "source": verdict.get("source"),
                    "reasons": verdict.get("reasons", [])},
        "lineage": {
            "video": {"id": video.id, "name": video.name, "content_hash": video.content_hash},
            "clip": {"id": clip.id, "idx": clip.idx, "start_frame": clip.start_frame,
                     "end_frame": clip.end_frame, "start_s": clip.start_s, "end_s": clip.end_s},
            "subject": {"id": subject.id, "idx": subject.idx},
            "pair": {"id": pair.id},
            "frames": {"reference": pair.ref_frame, "target": pair.tgt_frame},
            "backends": {"mining": subject.backends or {}, "sample": sample.backends or {},
                         "clip_quality": (clip.quality or {}).get("scorer") or (clip.quality or {}).get("backend")},
            "versions": versions,
            "seed": sample.seed,
            "attempt": sample.attempt,
            "attempts": [{"attempt": h.get("attempt"), "seed": h.get("seed"),
                          "passed": (h.get("verdict") or {}).get("passed"),
                          "reasons": h.get("reasons", [])} for h in history],
            "augment": sample.augment,
        },
    }
    return ExportRecord(sample_id=sample.id, image_keys=dict(sample.keys or {}), meta=meta,
                        category=subject.category, caption_short=sample.caption_short or "",
                        caption_long=sample.caption_long or "", scores=dict(verdict.get("scores", {})))


def _chain(stmt):  # noqa: ANN001, ANN202 - select joined from samples up to videos
    return (stmt.join(Pair, Sample.pair_id == Pair.id).join(Subject, Pair.subject_id == Subject.id)
            .join(Clip, Subject.clip_id == Clip.id).join(Video, Clip.video_id == Video.id))


def build_stats(s: Session, build_id: str) -> dict[str, Any]:
    """Funnel, states, rejection reasons, duplicates, verification history and throughput."""
    from opensubject_tasks import readmodel

    in_build = Video.build_id == build_id
    reasons = readmodel.rejection_reasons(s, build_id)
    failed_checks: Counter[str] = Counter()
    verified_at: Counter[str] = Counter()
    verify_attempts = 0
    for st, history, attempt in s.execute(
            _chain(select(Sample.state, Sample.history, Sample.attempt)).where(in_build).order_by(Sample.id)):
        for h in history or []:
            verify_attempts += 1
            for r in h.get("reasons") or []:
                failed_checks[r.split(":", 1)[0]] += 1
        if st == "verified":
            verified_at[str(attempt)] += 1

    attempts = [{"stage": a, "status": b, "duration_s": c, "entity_id": d} for a, b, c, d in s.execute(
        select(StageAttempt.stage, StageAttempt.status, StageAttempt.duration_s, StageAttempt.entity_id)
        .where(StageAttempt.build_id == build_id, StageAttempt.stage != "export",
               StageAttempt.status != "running")
        .order_by(StageAttempt.id))]
    return {
        "build": build_id,
        "funnel": readmodel.funnel(s, build_id),
        "states": readmodel.states(s, build_id),
        "rejections": count_reasons(reasons),
        "duplicates": readmodel.duplicates(s, build_id, limit=1000),
        "verification": {"attempts": verify_attempts,
                         "failed_checks": dict(sorted(failed_checks.items())),
                         "verified_at_attempt": dict(sorted(verified_at.items(), key=lambda kv: int(kv[0])))},
        "throughput": throughput(attempts),
    }


def _load(ctx: Context, build_id: str) -> tuple[list[ExportRecord], dict[str, Any], dict[str, str]]:
    versions = _versions()
    with session_scope(ctx.sessions) as s:
        known = s.get(Build, build_id) is not None or s.scalar(
            select(func.count(Video.id)).where(Video.build_id == build_id))
        if not known:
            raise BadInput(f"build {build_id!r} not found")
        rows = s.execute(_chain(select(Sample, Pair, Subject, Clip, Video))
                         .where(Video.build_id == build_id, Sample.state == "verified")
                         .order_by(Sample.id)).all()
        benches = ctx.settings.export.exclude_bench_dirs
        held_out = _held_out(benches)
        kept = [row for row in rows if row[4].id not in held_out]
        records = [_record(build_id, *row, versions=versions) for row in kept]
        names = {r.sample_id: row[4].name for r, row in zip(records, kept, strict=True)}
        stats = build_stats(s, build_id)
    if benches:
        stats["held_out"] = {"benches": [str(b) for b in benches],
                             "videos": len({row[4].id for row in rows} & held_out),
                             "samples_excluded": len(rows) - len(kept)}
    return records, stats, names


def _held_out(bench_dirs: list[Path]) -> set[str]:
    """Video ids held out by the given benches (a folder that is not a bench: BadInput)."""
    if not bench_dirs:
        return set()
    from opensubject_tasks.bench.build import held_out_videos  # numpy/PIL: only when asked

    return set().union(*(held_out_videos(b) for b in bench_dirs))


# -- the export ----------------------------------------------------------------------
def _manifest_row(r: ExportRecord, shard: str, entry: LayoutEntry | None,
                  multi: dict[str, str]) -> dict[str, Any]:
    lin = r.meta["lineage"]
    return {
        "key": r.key, "sample_id": r.sample_id, "shard": shard,
        "video_id": lin["video"]["id"], "video_name": lin["video"]["name"],
        "clip_id": lin["clip"]["id"], "subject_id": lin["subject"]["id"], "pair_id": lin["pair"]["id"],
        "category": r.category, "ref_frame": lin["frames"]["reference"], "tgt_frame": lin["frames"]["target"],
        "ref_box": [float(x) for x in r.meta["boxes"]["reference"]],
        "tgt_box": [float(x) for x in r.meta["boxes"]["target"]],
        "attempt": lin["attempt"], "seed": lin["seed"],
        "caption_short": r.caption_short, "caption_long": r.caption_long,
        "caption_source": r.meta["captions"]["source"], "verifier": r.meta["verdict"]["source"],
        "identity": r.scores.get("identity"), "residual": r.scores.get("residual"),
        "artifact": r.scores.get("artifact"), "overall": r.scores.get("overall"),
        "scores_json": dumps(r.scores).decode(),
        # the OmniGen2 layout's files (relative to the export root) and instructions
        "generation_input_image": entry.generation_input if entry else None,
        "manipulation_input_images": [entry.manipulation_input, entry.generation_input] if entry else None,
        "output_image": entry.target if entry else None,
        "generation_instruction": entry.generation_instruction if entry else None,
        "manipulation_instruction": entry.manipulation_instruction if entry else None,
        "multi_subject_key": multi.get(r.key),
    }


def _layout_root(cfg: Any, sink: Sink) -> tuple[str | None, str | None]:
    """The absolute root written into OmniGen2 records (None: relative paths), and why
    relative paths were written when absolute ones were asked for."""
    if cfg.omnigen2_paths == "relative":
        return None, None
    root = cfg.omnigen2_root or sink.local_root
    if root is None:
        return None, ("export.omnigen2_root is not set for an object-store export: paths are relative "
                      "to the export root; set it to where training jobs see this folder")
    return root, None


def _export(ctx: Context, build_id: str, sink: Sink) -> ExportResult:
    cfg = ctx.settings.export
    records, stats, video_names = _load(ctx, build_id)
    for r in records:
        missing = [n for n in REQUIRED_IMAGES if not r.image_keys.get(n)]
        if missing:
            raise BadInput(f"verified sample {r.sample_id} has no stored {', '.join(missing)}")
    clashes = [k for k, n in Counter(r.key for r in records).items() if n > 1]
    if clashes:  # keys are ids with unsafe characters replaced: two ids must not meet
        raise BadInput(f"sample ids map to the same dataset key: {', '.join(clashes[:5])}")

    def overall(r: ExportRecord) -> float:
        return float(r.scores.get("overall", r.scores.get("identity", 0.0)))

    grid_keys = set(pick_grid([r.key for r in records], cfg.report_grid, cfg.report_seed))
    worst_keys = [r.key for r in sorted(records, key=lambda r: (overall(r), r.key))[:cfg.report_worst]]
    shown = grid_keys | set(worst_keys)
    cards: dict[str, ReportSample] = {}

    written: list[str] = []

    def put(rel: str, data: bytes) -> None:
        sink.put(rel, data)
        written.append(rel)

    def put_shard(rel: str, path: Path) -> None:
        sink.put_file(rel, path)
        written.append(rel)

    shards = ShardWriter(put_shard, cfg.shard_max_bytes, cfg.shard_max_samples, tmp_dir=sink.tmp_dir)
    root, relative_why = _layout_root(cfg, sink)
    layout = OmniGen2Layout(root) if cfg.omnigen2 else None
    manifest: list[tuple[ExportRecord, str]] = []   # (record, its shard)
    entries: dict[str, LayoutEntry | None] = {}
    try:
        for r in records:
            images = {n: ctx.store.get_bytes(r.image_keys[n]) for n in SHARD_IMAGES if r.image_keys.get(n)}
            shard = shards.add(sample_members(r, images))
            entries[r.key] = layout.add(r, images, put) if layout else None
            manifest.append((r, shard))
            if r.key in shown:
                cards[r.key] = ReportSample(
                    key=r.key, caption_short=r.caption_short, caption_long=r.caption_long,
                    caption_source=r.meta["captions"]["source"] or "", scores=r.scores,
                    attempt=r.meta["lineage"]["attempt"], video=video_names[r.sample_id],
                    thumbs={n: thumbnail_uri(images[n], cfg.report_thumb_px) for n in THUMB_NAMES})
        shard_info = shards.finish()
    finally:
        shards.abort()   # no-op after finish; drops a half-written shard after an error

    multi = {e.key: multi_subject_key(g) for g in multi_subject_groups(
        [e for e in entries.values() if e is not None]) for e in g}
    rows = [_manifest_row(r, shard, entries[r.key], multi) for r, shard in manifest]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), buf, compression="zstd")
    put("manifest.parquet", buf.getvalue())
    training = layout.finish(put) if layout else None
    if training is not None and relative_why:
        training["note"] = relative_why

    shard_bytes = sum(s["bytes"] for s in shard_info)
    stats["export"] = {"samples": len(records), "shards": len(shard_info), "bytes": shard_bytes,
                       "shard_list": shard_info}
    if training is not None:
        stats["export"]["omnigen2"] = training
    secrets = ctx.settings.secrets()
    put("stats.json", _redact(dumps(stats), secrets))
    report = render_report(build_id, stats, [cards[k] for k in sorted(grid_keys)],
                           [cards[k] for k in worst_keys], secrets)
    put("report.html", report.encode("utf-8"))

    keep = set(written)
    removed = [rel for rel in sink.existing() if rel not in keep]
    for rel in removed:
        sink.remove(rel)
    return ExportResult(build_id=build_id, root=sink.root, samples=len(records),
                        shards=[s["name"] for s in shard_info], files=sorted(keep),
                        shard_bytes=shard_bytes, stats=stats, removed=removed)


def _redact(data: bytes, secrets: list[str]) -> bytes:
    """Replace each secret in JSON text, as written and as JSON escapes it."""
    text = data.decode("utf-8")
    for secret in sorted((x for x in secrets if x), key=len, reverse=True):
        for form in (secret, json.dumps(secret, ensure_ascii=False)[1:-1]):
            text = text.replace(form, "[redacted]")
    return text.encode("utf-8")


def export_build_to(ctx: Context, build_id: str, out_dir: Path) -> ExportResult:
    """Export a build from the db and store into a local folder (re-export: no recompute)."""
    return _export(ctx, build_id, DirSink(Path(out_dir)))


@stage("export")
def export_build(ctx: Context, build_id: str) -> StageResult:
    """Export a build into the object store under datasets/<build>/."""
    res = _export(ctx, build_id, StoreSink(ctx.store, build_id))
    return StageResult(status="ok", details={"samples": res.samples, "shards": len(res.shards),
                                             "shard_bytes": res.shard_bytes, "root": res.root,
                                             "removed": len(res.removed)})

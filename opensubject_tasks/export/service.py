"""Stage 5 service: export a build's verified samples, split so that it scales with the
build. One implementation, two sinks: the object store under ``datasets/<build>/`` (the
distributed stages) or a local folder (``export_build_to``: ``opensubject export`` and
``opensubject run --out``). Every step holds at most one shard's samples in memory.

1. ``plan_export``: the shards, ``export.shard_max_samples`` verified samples each in
   sample-id order, recorded in ``export_shards`` (first sample and count), grouped into
   at most ``max_parts`` parts; shards an earlier plan had beyond this one's stay
   recorded (with no samples) until the finish has removed their files;
2. ``export_part`` (one task per part, retried alone): per shard, its tar, the training
   layout's images and JSONL records of its samples, and its manifest part
   (``parts/shard-NNNNNN.parquet``, written last: it lists the shard's images, so the
   next export of the shard removes the ones it no longer writes). A shard's bytes
   depend only on its samples, so a part killed and run again writes byte-identical files;
3. ``finish_export`` (the ``export`` stage): merges the manifest parts into
   ``manifest.parquet`` one part at a time, writes the data config, stats.json (SQL
   aggregates) and report.html, and removes the files of shards no longer planned. It
   lists nothing: the plan says which files are stale.

Written under the export root:
  shard-000000.tar ...            WebDataset shards (<key>.<image>.png, <key>.json)
  parts/shard-000000.parquet ...  manifest part of each shard (same columns as the manifest)
  manifest.parquet                one row per sample, the parts merged
  stats.json                      funnel, rejection reasons, verification, throughput
  report.html                     self-contained report
  Images/{generation,manipulation}/{input_images,output_images}/NNNNNN/...,
  omnigen2/data.yml, omnigen2/jsonl/<kind>/part-NNNNNN.jsonl   OmniGen2 training layout
                                                               (export/omnigen2.py)
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import delete, func, select, update

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import ExportShard
from opensubject_tasks.errors import BadInput
from opensubject_tasks.export.omnigen2 import DATA_CONFIG, JSONL_DIRS, LayoutEntry, OmniGen2Layout, data_config, jsonl_part
from opensubject_tasks.export.query import (
    build_stats, check_build, held_out_summary, image_keys, records_between, shard_starts, _held_out,
)
from opensubject_tasks.export.shards import (
    REQUIRED_IMAGES, SHARD_IMAGES, ExportRecord, ShardWriter, dumps, image_boxes, image_size, sample_members,
    shard_name,
)
from opensubject_tasks.export.sinks import DirSink, Sink, StoreSink
from opensubject_tasks.report import THUMB_NAMES, ReportSample, grid_rank, render_report, thumbnail_uri
from opensubject_tasks.services.common import StageResult, stage, utcnow

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("sample_id", pa.string()), ("shard", pa.string()),
    ("video_id", pa.string()), ("video_name", pa.string()), ("clip_id", pa.string()),
    ("subject_id", pa.string()), ("pair_id", pa.string()), ("category", pa.string()),
    ("ref_frame", pa.int64()), ("tgt_frame", pa.int64()),
    # boxes in the pixels of the shipped images, [w, h] beside them: tgt_box in the target's,
    # ref_box in the reference frame's (at the resolution the reference crop was cut from)
    ("ref_box", pa.list_(pa.float64())), ("ref_size", pa.list_(pa.int64())),
    ("tgt_box", pa.list_(pa.float64())), ("tgt_size", pa.list_(pa.int64())),
    ("attempt", pa.int64()), ("seed", pa.int64()),
    ("caption_short", pa.string()), ("caption_long", pa.string()), ("caption_source", pa.string()),
    ("verifier", pa.string()), ("identity", pa.float64()), ("residual", pa.float64()),
    ("artifact", pa.float64()), ("overall", pa.float64()), ("scores_json", pa.string()),
    ("generation_input_image", pa.string()), ("manipulation_input_images", pa.list_(pa.string())),
    ("output_image", pa.string()),
    ("generation_instruction", pa.string()), ("manipulation_instruction", pa.string()),
    ("multi_subject_key", pa.string()),   # the multi-subject record this sample is part of
])

IMAGE_COLUMNS = ("generation_input_image", "manipulation_input_images", "output_image")


def manifest_part(shard: int) -> str:
    return f"parts/shard-{shard:06d}.parquet"


@dataclass
class ExportResult:
    build_id: str
    root: str                              # folder or store prefix
    samples: int
    shards: list[str]
    files: int = 0                         # files the export holds
    shard_bytes: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    removed: int = 0                       # stale files of an earlier export removed

    def __str__(self) -> str:
        return (f"{self.samples} samples in {len(self.shards)} shard(s) "
                f"({self.shard_bytes / 1e6:.1f} MB), {self.files} files under {self.root}"
                + (f", {self.removed} stale file(s) removed" if self.removed else ""))



# -- 1. plan ---------------------------------------------------------------------------
def part_id(build_id: str, first: int, last: int) -> str:
    """The entity id of a part: the build and its shard range (both ends included)."""
    return f"{build_id}#{first:06d}-{last:06d}"


def parse_part(entity_id: str) -> tuple[str, int, int]:
    build_id, sep, span = entity_id.rpartition("#")
    first, dash, last = span.partition("-")
    if not (sep and dash and first.isdigit() and last.isdigit()):
        raise BadInput(f"not an export part: {entity_id!r} (expected <build>#<first>-<last>)")
    return build_id, int(first), int(last)


def plan_export(ctx: Context, build_id: str, max_parts: int = 1024) -> list[str]:
    """Record the export's shards and return its parts (at most ``max_parts``)."""
    check_build(ctx, build_id)
    per_shard = ctx.settings.export.shard_max_samples
    held_out = _held_out(ctx.settings.export.exclude_bench_dirs)
    with session_scope(ctx.sessions) as s:
        starts, total = shard_starts(s, build_id, held_out, per_shard)
        before = s.scalar(select(func.max(ExportShard.shard)).where(ExportShard.build_id == build_id))
        s.execute(delete(ExportShard).where(ExportShard.build_id == build_id))
        s.add_all([ExportShard(build_id=build_id, shard=k, first_sample=first,
                               samples=min(per_shard, total - k * per_shard))
                   for k, first in enumerate(starts)])
        # an earlier plan's shards beyond this one's: no samples, files for the finish to remove
        s.add_all([ExportShard(build_id=build_id, shard=k, first_sample="", samples=0)
                   for k in range(len(starts), -1 if before is None else before + 1)])
    if not starts:
        return []
    per_part = math.ceil(len(starts) / max(1, max_parts))
    return [part_id(build_id, a, min(a + per_part, len(starts)) - 1) for a in range(0, len(starts), per_part)]


# -- 2. parts --------------------------------------------------------------------------
def write_part(ctx: Context, build_id: str, first: int, last: int, sink: Sink) -> dict[str, int]:
    """Write shards ``first``..``last`` as planned: per shard its tar, its samples' training
    layout and its manifest part; returns counts."""
    cfg = ctx.settings.export
    held_out = _held_out(cfg.exclude_bench_dirs)
    with session_scope(ctx.sessions) as s:
        starts = dict(s.execute(select(ExportShard.shard, ExportShard.first_sample).where(
            ExportShard.build_id == build_id, ExportShard.shard >= first, ExportShard.shard <= last + 1,
            ExportShard.samples > 0)).all())
    if any(k not in starts for k in range(first, last + 1)):
        raise BadInput(f"export of {build_id}: shards {first}-{last} are not planned (plan the export again)")
    root, _ = _layout_root(cfg, sink)
    counts = {"shards": 0, "samples": 0, "bytes": 0, "removed": 0}
    for k in range(first, last + 1):
        records = records_between(ctx, build_id, starts[k], starts.get(k + 1), held_out)
        digest, size, removed = _write_shard(ctx, k, records, root if cfg.omnigen2 else False, sink)
        with session_scope(ctx.sessions) as s:
            s.execute(update(ExportShard).where(ExportShard.build_id == build_id, ExportShard.shard == k)
                      .values(samples=len(records), bytes=size, sha256=digest, written_at=utcnow())
                      .execution_options(synchronize_session=False))
        counts["shards"] += 1
        counts["samples"] += len(records)
        counts["bytes"] += size
        counts["removed"] += removed
    return counts


def _write_shard(ctx: Context, k: int, records: list[ExportRecord], root: str | None | bool,
                 sink: Sink) -> tuple[str, int, int]:
    """One shard's tar (its planned name whatever its size), its samples' layout files
    (``root`` False: none) and its manifest part, written last; the images its previous
    manifest part listed that it no longer writes are removed. Returns the tar's digest
    and size and the number of files removed."""
    name = shard_name(k)
    shard: dict[str, Any] = {}
    before = _listed_images(sink, k)

    def put_shard(_: str, path: Path) -> None:
        shard["sha256"] = _sha256(path)
        shard["bytes"] = path.stat().st_size
        sink.put_file(name, path)

    writer = ShardWriter(put_shard, max_bytes=2**62, max_samples=2**62, tmp_dir=sink.tmp_dir)
    layout = OmniGen2Layout(root, k) if root is not False else None
    done: list[tuple[ExportRecord, LayoutEntry | None, tuple[int, int]]] = []
    try:
        for r in records:
            missing = [n for n in REQUIRED_IMAGES if not r.image_keys.get(n)]
            if missing:
                raise BadInput(f"verified sample {r.sample_id} has no stored {', '.join(missing)}")
            images = {n: ctx.store.get_bytes(r.image_keys[n]) for n in SHARD_IMAGES if r.image_keys.get(n)}
            writer.add(sample_members(r, images))
            entry = layout.add(r, images, sink.put) if layout else None
            done.append((r, entry, image_size(images["target"])))
        writer.finish()
    finally:
        writer.abort()   # drops a half-written shard after an error
    if layout:
        multi = layout.finish(sink.put, sink.remove)
    else:   # no training layout: an earlier export's records of this shard go
        multi = {}
        for kind in JSONL_DIRS:
            sink.remove(jsonl_part(kind, k))
    keys = [r.key for r, _, _ in done]
    if len(set(keys)) != len(keys):  # keys are ids with unsafe characters replaced: two ids must not meet
        raise BadInput(f"sample ids map to the same dataset key: {sorted({x for x in keys if keys.count(x) > 1})[:5]}")
    stale = sorted(before - (layout.written if layout else set()))
    for rel in stale:
        sink.remove(rel)
    rows = [_manifest_row(r, name, entry, multi, size) for r, entry, size in done]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), buf, compression="zstd")
    sink.put(manifest_part(k), buf.getvalue())
    return shard.get("sha256", ""), shard.get("bytes", 0), len(stale)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listed_images(sink: Sink, k: int) -> set[str]:
    """The layout images shard ``k``'s manifest part lists (none if it has none yet)."""
    if not sink.exists(manifest_part(k)):
        return set()
    table = pq.read_table(io.BytesIO(sink.get(manifest_part(k))), columns=list(IMAGE_COLUMNS))
    return _images_of(table)


def _images_of(table: pa.Table) -> set[str]:
    out: set[str] = set()
    for col in IMAGE_COLUMNS:
        for v in table.column(col).to_pylist():
            out.update(x for x in (v if isinstance(v, list) else [v]) if x)
    return out


@stage("export_part")
def export_part(ctx: Context, entity_id: str) -> StageResult:
    """Write one part of a build's export into the object store under datasets/<build>/."""
    build_id, first, last = parse_part(entity_id)
    counts = write_part(ctx, build_id, first, last, StoreSink(ctx.store, build_id))
    return StageResult(details=counts)


# -- 3. finish ---------------------------------------------------------------------------
def _manifest_row(r: ExportRecord, shard: str, entry: LayoutEntry | None,
                  multi: dict[str, str], target_size: tuple[int, int]) -> dict[str, Any]:
    lin = r.meta["lineage"]
    return {
        "key": r.key, "sample_id": r.sample_id, "shard": shard,
        "video_id": lin["video"]["id"], "video_name": lin["video"]["name"],
        "clip_id": lin["clip"]["id"], "subject_id": lin["subject"]["id"], "pair_id": lin["pair"]["id"],
        "category": r.category, "ref_frame": lin["frames"]["reference"], "tgt_frame": lin["frames"]["target"],
        **image_boxes(r.meta, target_size),
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


@dataclass
class _Merged:
    """What the finish keeps while it streams the manifest parts: counts and a few rows."""
    samples: int = 0
    generation: int = 0
    manipulation: int = 0
    multi_by_subjects: Counter = field(default_factory=Counter)
    images: int = 0
    jsonl_kinds: Counter = field(default_factory=Counter)   # kind -> shards with records of it
    renamed: list[tuple[str, str]] = field(default_factory=list)   # (key, id) where they differ
    grid: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    worst: list[tuple[tuple[float, str], dict[str, Any]]] = field(default_factory=list)

    def add(self, table: pa.Table, grid_n: int, worst_n: int, seed: int) -> None:
        rows = table.select(["key", "sample_id", "overall", "identity", "output_image", "multi_subject_key",
                             "caption_short", "caption_long", "caption_source", "scores_json", "attempt",
                             "video_name"]).to_pylist()
        self.samples += len(rows)
        laid_out = sum(1 for r in rows if r["output_image"])
        self.generation += laid_out
        self.manipulation += laid_out
        groups = Counter(r["multi_subject_key"] for r in rows if r["multi_subject_key"])
        self.multi_by_subjects.update(groups.values())
        self.images += len(_images_of(table))
        for kind, n in (("generation", laid_out), ("manipulation", laid_out), ("generation_multi", len(groups))):
            self.jsonl_kinds[kind] += n > 0
        self.renamed += [(r["key"], r["sample_id"]) for r in rows if r["key"] != r["sample_id"]]
        self.grid = sorted(self.grid + [(grid_rank(r["key"], seed), r) for r in rows], key=lambda x: x[0])[:grid_n]

        def badness(r: dict[str, Any]) -> tuple[float, str]:
            score = r["overall"] if r["overall"] is not None else r["identity"]
            return float(score or 0.0), r["key"]
        self.worst = sorted(self.worst + [(badness(r), r) for r in rows], key=lambda x: x[0])[:worst_n]


def finish_export(ctx: Context, build_id: str, sink: Sink) -> ExportResult:
    """The manifest (the parts merged), the training layout's data config, stats and
    report; then the files of shards an earlier export had and this one has not go."""
    cfg = ctx.settings.export
    check_build(ctx, build_id)
    with session_scope(ctx.sessions) as s:
        rows = list(s.scalars(select(ExportShard).where(ExportShard.build_id == build_id)
                              .order_by(ExportShard.shard)))
        stats = build_stats(s, build_id)
    shards = [x for x in rows if x.samples > 0]
    unwritten = [x.shard for x in shards if x.written_at is None]
    if unwritten:
        raise BadInput(f"export of {build_id}: shard(s) {unwritten[:10]} were never written: run their parts")
    # shards to remove: those the plan keeps for that, and those the last finished export
    # into this sink had beyond this one (it may have been planned for another folder)
    stale = {x.shard for x in rows if x.samples == 0} | set(range(len(shards), _exported_shards(sink)))

    merged = _Merged()
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".parquet.part", dir=sink.tmp_dir)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, MANIFEST_SCHEMA, compression="zstd") as writer:
            for x in shards:
                table = pq.read_table(io.BytesIO(sink.get(manifest_part(x.shard))), schema=MANIFEST_SCHEMA)
                writer.write_table(table)
                merged.add(table, cfg.report_grid, cfg.report_worst, cfg.report_seed)
        _check_keys(ctx, merged.renamed)
        sink.put_file("manifest.parquet", Path(tmp))
    finally:
        Path(tmp).unlink(missing_ok=True)

    training = None
    if not cfg.omnigen2:
        sink.remove(DATA_CONFIG)
    else:
        root, relative_why = _layout_root(cfg, sink)
        kinds = [k for k in JSONL_DIRS if merged.jsonl_kinds[k]]
        sink.put(DATA_CONFIG, data_config(kinds, root))
        training = {"generation_single": merged.generation,
                    "generation_multi": sum(merged.multi_by_subjects.values()),
                    "generation_multi_by_subjects": {str(n): c for n, c in sorted(merged.multi_by_subjects.items())},
                    "manipulation": merged.manipulation, "images": merged.images,
                    "paths": "absolute" if root else "relative", "data_config": DATA_CONFIG}
        if relative_why:
            training["note"] = relative_why

    shard_info = [{"name": shard_name(x.shard), "samples": x.samples, "bytes": x.bytes, "sha256": x.sha256}
                  for x in shards]
    shard_bytes = sum(int(x.bytes or 0) for x in shards)
    stats["export"] = {"samples": merged.samples, "shards": len(shards), "bytes": shard_bytes,
                       "shard_list": shard_info}
    if training is not None:
        stats["export"]["omnigen2"] = training
    benches = cfg.exclude_bench_dirs
    if benches:
        stats["held_out"] = held_out_summary(ctx, build_id, benches, _held_out(benches))
    secrets = ctx.settings.secrets()
    sink.put("stats.json", _redact(dumps(stats), secrets))
    grid, worst = _report_cards(ctx, merged)
    sink.put("report.html", render_report(build_id, stats, grid, worst, secrets).encode("utf-8"))

    removed = sum(_remove_shard(sink, k) for k in sorted(stale))
    with session_scope(ctx.sessions) as s:
        s.execute(delete(ExportShard).where(ExportShard.build_id == build_id, ExportShard.samples == 0))
    sink.clean_temporary()
    files = (2 * len(shards) + merged.images + sum(merged.jsonl_kinds.values())
             + 3 + (1 if cfg.omnigen2 else 0))     # manifest, stats, report, data config
    return ExportResult(build_id=build_id, root=sink.root, samples=merged.samples,
                        shards=[shard_name(x.shard) for x in shards], files=files,
                        shard_bytes=shard_bytes, stats=stats, removed=removed)


def _exported_shards(sink: Sink) -> int:
    """How many shards the last finished export into this sink had (0: none known)."""
    if not sink.exists("stats.json"):
        return 0
    try:
        return int(json.loads(sink.get("stats.json"))["export"]["shards"])
    except (ValueError, KeyError, TypeError):
        return 0


def _remove_shard(sink: Sink, k: int) -> int:
    """Remove a shard's files: its layout images (as its manifest part lists them), JSONL
    parts and tar, then the manifest part (last, so a retry still finds the images).
    Returns how many files were there."""
    files = [*sorted(_listed_images(sink, k)), *(jsonl_part(kind, k) for kind in JSONL_DIRS),
             shard_name(k), manifest_part(k)]
    removed = 0
    for rel in files:
        if sink.exists(rel):
            sink.remove(rel)
            removed += 1
    return removed


def _check_keys(ctx: Context, renamed: list[tuple[str, str]]) -> None:
    """Dataset keys are sample ids with unsafe characters replaced: two ids must not meet.
    Only ids that were changed can meet another (within a shard the part checks)."""
    keys = [k for k, _ in renamed]
    clashes = {k for k in keys if keys.count(k) > 1} | set(image_keys(ctx, keys))
    if clashes:
        raise BadInput(f"sample ids map to the same dataset key: {', '.join(sorted(clashes)[:5])}")


def _report_cards(ctx: Context, merged: _Merged) -> tuple[list[ReportSample], list[ReportSample]]:
    """The report's random grid and its worst-scoring samples, with thumbnails read now
    (only for the samples shown)."""
    shown = {r["sample_id"]: r for _, r in merged.grid + merged.worst}
    stored = image_keys(ctx, list(shown))

    def card(r: dict[str, Any]) -> ReportSample:
        keys = stored.get(r["sample_id"], {})
        thumbs = {n: thumbnail_uri(ctx.store.get_bytes(keys[n]), ctx.settings.export.report_thumb_px)
                  for n in THUMB_NAMES if keys.get(n)}
        return ReportSample(key=r["key"], caption_short=r["caption_short"], caption_long=r["caption_long"],
                            caption_source=r["caption_source"] or "", scores=json.loads(r["scores_json"]),
                            attempt=r["attempt"], video=r["video_name"], thumbs=thumbs)

    cards = {sid: card(r) for sid, r in shown.items()}
    grid = sorted((r for _, r in merged.grid), key=lambda r: r["key"])
    return [cards[r["sample_id"]] for r in grid], [cards[r["sample_id"]] for _, r in merged.worst]


def _redact(data: bytes, secrets: list[str]) -> bytes:
    """Replace each secret in JSON text, as written and as JSON escapes it."""
    text = data.decode("utf-8")
    for secret in sorted((x for x in secrets if x), key=len, reverse=True):
        for form in (secret, json.dumps(secret, ensure_ascii=False)[1:-1]):
            text = text.replace(form, "[redacted]")
    return text.encode("utf-8")



# -- the whole export in one process, and the final stage -------------------------------
def export_to_sink(ctx: Context, build_id: str, sink: Sink) -> ExportResult:
    """Plan, every part, finish: the same steps the distributed stages take, in order."""
    removed = 0
    for part in plan_export(ctx, build_id, max_parts=1):
        _, first, last = parse_part(part)
        removed += write_part(ctx, build_id, first, last, sink)["removed"]
    res = finish_export(ctx, build_id, sink)
    res.removed += removed
    return res


def export_build_to(ctx: Context, build_id: str, out_dir: Path) -> ExportResult:
    """Export a build from the db and store into a local folder (re-export: no recompute)."""
    return export_to_sink(ctx, build_id, DirSink(Path(out_dir)))


@stage("export_plan")
def export_plan(ctx: Context, build_id: str) -> StageResult:
    """Plan a build's export into the object store; the result lists its parts."""
    parts = plan_export(ctx, build_id, max_parts=ctx.settings.export.max_parts)
    return StageResult(details={"parts": parts})


@stage("export")
def export_build(ctx: Context, build_id: str) -> StageResult:
    """Finish a build's export into the object store under datasets/<build>/ (its parts
    written): manifest, training layout records, stats and report."""
    res = finish_export(ctx, build_id, StoreSink(ctx.store, build_id))
    return StageResult(status="ok", details={"samples": res.samples, "shards": len(res.shards),
                                             "shard_bytes": res.shard_bytes, "root": res.root,
                                             "removed": res.removed})

"""Stage 5 service: export a build's verified samples, split so that it scales with the
build. One implementation, two sinks: the object store under ``datasets/<build>/`` (the
distributed stages) or a local folder (``export_build_to``: ``opensubject export`` and
``opensubject run --out``).

1. ``plan_export``: the shards, ``export.shard_max_samples`` verified samples each in
   sample-id order, recorded in ``export_shards`` (first sample and count), grouped into
   at most ``max_parts`` parts;
2. ``export_part`` (one task per part, retried alone): writes its shards, the training
   layout's images of their samples and one index per shard (``parts/shard-NNNNNN.jsonl``:
   the manifest rows and layout entries). A shard's bytes depend only on its samples, so a
   part killed and run again writes byte-identical shards;
3. ``finish_export`` (the ``export`` stage): from the indexes, the manifest, the training
   layout's JSONL files and data config, stats.json and report.html; files an earlier
   export left that this one did not write are removed, so the root equals one export.

Written under the export root:
  shard-000000.tar ...          WebDataset shards (<key>.<image>.png, <key>.json)
  parts/shard-000000.jsonl ...  per-shard index the final step reads
  manifest.parquet              one row per sample
  stats.json                    funnel, rejection reasons, verification, throughput
  report.html                   self-contained report
  Images/{generation,manipulation}/{input_images,output_images}/NNNN/...,
  omnigen2/data.yml, omnigen2/jsonl/*.jsonl         OmniGen2 training layout (stages/omnigen2.py)
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import delete, select, update

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import ExportShard
from opensubject_tasks.errors import BadInput
from opensubject_tasks.report import THUMB_NAMES, ReportSample, pick_grid, render_report, thumbnail_uri
from opensubject_tasks.services.common import StageResult, stage, utcnow
from opensubject_tasks.services.export_query import (
    build_stats, check_build, held_out_summary, records_between, shard_starts, _held_out,
)
from opensubject_tasks.services.export_sinks import DirSink, Sink, StoreSink
from opensubject_tasks.stages.export import (
    REQUIRED_IMAGES, SHARD_IMAGES, ExportRecord, ShardWriter, dumps, sample_members, shard_name,
)
from opensubject_tasks.stages.omnigen2 import (
    IMAGE_DIRS, LayoutEntry, OmniGen2Layout, multi_subject_groups, multi_subject_key,
)

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

def index_name(shard: int) -> str:
    return f"parts/shard-{shard:06d}.jsonl"


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
        s.execute(delete(ExportShard).where(ExportShard.build_id == build_id))
        s.add_all([ExportShard(build_id=build_id, shard=k, first_sample=first,
                               samples=min(per_shard, total - k * per_shard))
                   for k, first in enumerate(starts)])
    if not starts:
        return []
    per_part = math.ceil(len(starts) / max(1, max_parts))
    return [part_id(build_id, a, min(a + per_part, len(starts)) - 1) for a in range(0, len(starts), per_part)]


# -- 2. parts --------------------------------------------------------------------------
def _overall(r: ExportRecord) -> float:
    return float(r.scores.get("overall", r.scores.get("identity", 0.0)) or 0.0)


def write_part(ctx: Context, build_id: str, first: int, last: int, sink: Sink) -> dict[str, int]:
    """Write shards ``first``..``last`` as planned, with their samples' training-layout
    images and one index per shard; returns counts."""
    cfg = ctx.settings.export
    held_out = _held_out(cfg.exclude_bench_dirs)
    with session_scope(ctx.sessions) as s:
        planned = list(s.execute(select(ExportShard.shard, ExportShard.first_sample).where(
            ExportShard.build_id == build_id, ExportShard.shard >= first, ExportShard.shard <= last + 1)
            .order_by(ExportShard.shard)).all())
    starts = dict(planned)
    if any(k not in starts for k in range(first, last + 1)):
        raise BadInput(f"export of {build_id}: shards {first}-{last} are not planned (plan the export again)")
    root, _ = _layout_root(cfg, sink)
    layout = OmniGen2Layout(root) if cfg.omnigen2 else None
    counts = {"shards": 0, "samples": 0, "bytes": 0}
    for k in range(first, last + 1):
        records, names = records_between(ctx, build_id, starts[k], starts.get(k + 1), held_out)
        digest, size, index = _write_shard(ctx, k, records, names, layout, sink)
        sink.put(index_name(k), index)
        with session_scope(ctx.sessions) as s:
            s.execute(update(ExportShard).where(ExportShard.build_id == build_id, ExportShard.shard == k)
                      .values(samples=len(records), bytes=size, sha256=digest, written_at=utcnow())
                      .execution_options(synchronize_session=False))
        counts["shards"] += 1
        counts["samples"] += len(records)
        counts["bytes"] += size
    return counts


def _write_shard(ctx: Context, k: int, records: list[ExportRecord], names: dict[str, str],
                 layout: OmniGen2Layout | None, sink: Sink) -> tuple[str, int, bytes]:
    """One shard's tar (its planned name whatever its size), its samples' layout images,
    and its index (returned)."""
    name = shard_name(k)
    shard: dict[str, Any] = {}

    def put_shard(_: str, path: Path) -> None:
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        shard["bytes"] = path.stat().st_size
        sink.put_file(name, path)

    writer = ShardWriter(put_shard, max_bytes=2**62, max_samples=2**62, tmp_dir=sink.tmp_dir)
    lines = []
    try:
        for r in records:
            missing = [n for n in REQUIRED_IMAGES if not r.image_keys.get(n)]
            if missing:
                raise BadInput(f"verified sample {r.sample_id} has no stored {', '.join(missing)}")
            images = {n: ctx.store.get_bytes(r.image_keys[n]) for n in SHARD_IMAGES if r.image_keys.get(n)}
            writer.add(sample_members(r, images))
            entry = layout.add(r, images, sink.put) if layout else None
            lines.append(dumps({"manifest": _manifest_row(r, name, entry, {}),
                                "entry": dataclasses.asdict(entry) if entry else None,
                                "overall": _overall(r), "video": names[r.sample_id],
                                "caption_source": r.meta["captions"]["source"] or "",
                                "attempt": r.meta["lineage"]["attempt"],
                                "thumbs": {n: r.image_keys[n] for n in THUMB_NAMES if r.image_keys.get(n)}}))
        writer.finish()
    finally:
        writer.abort()   # drops a half-written shard after an error
    return shard.get("sha256", ""), shard.get("bytes", 0), b"\n".join(lines) + (b"\n" if lines else b"")


@stage("export_part")
def export_part(ctx: Context, entity_id: str) -> StageResult:
    """Write one part of a build's export into the object store under datasets/<build>/."""
    build_id, first, last = parse_part(entity_id)
    counts = write_part(ctx, build_id, first, last, StoreSink(ctx.store, build_id))
    return StageResult(details=counts)


# -- 3. finish ---------------------------------------------------------------------------
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


def finish_export(ctx: Context, build_id: str, sink: Sink) -> ExportResult:
    """The manifest, the training layout's records, stats and report, from the parts'
    indexes; then the files of an earlier export that this one did not write go."""
    cfg = ctx.settings.export
    check_build(ctx, build_id)
    with session_scope(ctx.sessions) as s:
        shards = list(s.scalars(select(ExportShard).where(ExportShard.build_id == build_id)
                                .order_by(ExportShard.shard)))
        stats = build_stats(s, build_id)
    unwritten = [x.shard for x in shards if x.written_at is None]
    if unwritten:
        raise BadInput(f"export of {build_id}: shard(s) {unwritten[:10]} were never written: run their parts")
    items = [json.loads(line) for x in shards for line in sink.get(index_name(x.shard)).splitlines() if line]
    keys = [it["manifest"]["key"] for it in items]
    clashes = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) != len(keys) else []
    if clashes:  # keys are ids with unsafe characters replaced: two ids must not meet
        raise BadInput(f"sample ids map to the same dataset key: {', '.join(clashes[:5])}")

    written: list[str] = [shard_name(x.shard) for x in shards] + [index_name(x.shard) for x in shards]

    def put(rel: str, data: bytes) -> None:
        sink.put(rel, data)
        written.append(rel)

    entries = [LayoutEntry(**it["entry"]) for it in items if it["entry"]]
    written += sorted({getattr(e, role) for e in entries for role in IMAGE_DIRS})
    multi = {e.key: multi_subject_key(g) for g in multi_subject_groups(entries) for e in g}
    rows = [dict(it["manifest"], multi_subject_key=multi.get(it["manifest"]["key"])) for it in items]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), buf, compression="zstd")
    put("manifest.parquet", buf.getvalue())
    training = None
    if cfg.omnigen2:
        root, relative_why = _layout_root(cfg, sink)
        layout = OmniGen2Layout(root)
        layout.entries = entries
        layout.written = {getattr(e, role) for e in entries for role in IMAGE_DIRS}
        training = layout.finish(put)
        if relative_why:
            training["note"] = relative_why

    shard_info = [{"name": shard_name(x.shard), "samples": x.samples, "bytes": x.bytes, "sha256": x.sha256}
                  for x in shards]
    shard_bytes = sum(int(x.bytes or 0) for x in shards)
    stats["export"] = {"samples": len(items), "shards": len(shards), "bytes": shard_bytes,
                       "shard_list": shard_info}
    if training is not None:
        stats["export"]["omnigen2"] = training
    benches = cfg.exclude_bench_dirs
    if benches:
        stats["held_out"] = held_out_summary(ctx, build_id, benches, _held_out(benches))
    secrets = ctx.settings.secrets()
    put("stats.json", _redact(dumps(stats), secrets))
    grid, worst = _report_cards(ctx, items, cfg)
    put("report.html", render_report(build_id, stats, grid, worst, secrets).encode("utf-8"))

    keep = set(written)
    removed = [rel for rel in sink.existing() if rel not in keep]
    for rel in removed:
        sink.remove(rel)
    return ExportResult(build_id=build_id, root=sink.root, samples=len(items),
                        shards=[shard_name(x.shard) for x in shards], files=sorted(keep),
                        shard_bytes=shard_bytes, stats=stats, removed=removed)


def _report_cards(ctx: Context, items: list[dict[str, Any]], cfg: Any) -> tuple[list[ReportSample], list[ReportSample]]:
    """The report's random grid and its worst-scoring samples, with thumbnails read now
    (only for the samples shown)."""
    by_key = {it["manifest"]["key"]: it for it in items}
    grid_keys = sorted(pick_grid(list(by_key), cfg.report_grid, cfg.report_seed))
    worst_keys = [k for k in sorted(by_key, key=lambda k: (by_key[k]["overall"], k))[:cfg.report_worst]]

    def card(key: str) -> ReportSample:
        it, m = by_key[key], by_key[key]["manifest"]
        thumbs = {n: thumbnail_uri(ctx.store.get_bytes(k), cfg.report_thumb_px) for n, k in it["thumbs"].items()}
        return ReportSample(key=key, caption_short=m["caption_short"], caption_long=m["caption_long"],
                            caption_source=it["caption_source"], scores=json.loads(m["scores_json"]),
                            attempt=it["attempt"], video=it["video"], thumbs=thumbs)

    cards = {k: card(k) for k in set(grid_keys) | set(worst_keys)}
    return [cards[k] for k in grid_keys], [cards[k] for k in worst_keys]


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
    for part in plan_export(ctx, build_id, max_parts=1):
        _, first, last = parse_part(part)
        write_part(ctx, build_id, first, last, sink)
    return finish_export(ctx, build_id, sink)


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
                                             "removed": len(res.removed)})

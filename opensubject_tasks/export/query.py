"""What an export reads from the database: where its shards start, the verified samples
of one shard's range with their lineage, and the build's statistics (aggregated in SQL:
nothing here holds a row per sample of the build)."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import Select, distinct, func, select, text
from sqlalchemy.orm import Session

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.lineage import lineage, lineage_sql
from opensubject_tasks.db.models import Build, Clip, Pair, Sample, StageAttempt, Subject, Video
from opensubject_tasks.errors import BadInput
from opensubject_tasks.export.shards import ExportRecord, count_reasons, throughput

_VERSIONED = ("opensubject-tasks", "numpy", "opencv-contrib-python-headless", "pillow",
              "scikit-image", "torch", "transformers", "diffusers")


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


# Verification history, unnested in SQL: (history entries, their reasons, a reason's check
# name: the text before its first colon) per dialect.
_FROM_SAMPLES = lineage_sql({Sample: "s", Pair: "p", Subject: "su", Clip: "c", Video: "v"})
_HISTORY = {
    "postgresql": (
        "CROSS JOIN LATERAL jsonb_array_elements(CASE jsonb_typeof(s.history) WHEN 'array' "
        "THEN s.history ELSE '[]'::jsonb END) AS h(value)",
        "CROSS JOIN LATERAL jsonb_array_elements_text(CASE jsonb_typeof(h.value->'reasons') WHEN 'array' "
        "THEN h.value->'reasons' ELSE '[]'::jsonb END) AS r(value)",
        "split_part(r.value, ':', 1)", "TRUE"),
    "sqlite": ("JOIN json_each(s.history) AS h", "JOIN json_each(h.value, '$.reasons') AS r",
               "substr(r.value, 1, instr(r.value || ':', ':') - 1)", "r.type = 'text'"),
}


def _verification(s: Session, build_id: str) -> dict[str, Any]:
    """Verification attempts, failed checks by name and the attempt samples verified at."""
    entries, reasons, check, is_text = _HISTORY[s.get_bind().dialect.name]
    where = {"b": build_id}
    attempts = s.execute(text(f"SELECT count(*) {_FROM_SAMPLES} {entries} WHERE v.build_id = :b"), where).scalar()
    failed = s.execute(text(f"SELECT {check} AS check_name, count(*) {_FROM_SAMPLES} {entries} {reasons} "
                            f"WHERE v.build_id = :b AND {is_text} GROUP BY 1 ORDER BY 1"), where).all()
    verified_at = s.execute(lineage(select(Sample.attempt, func.count())).where(
        Video.build_id == build_id, Sample.state == "verified").group_by(Sample.attempt).order_by(Sample.attempt)).all()
    return {"attempts": int(attempts or 0), "failed_checks": {str(k): int(n) for k, n in failed},
            "verified_at_attempt": {str(a): int(n) for a, n in verified_at}}


def _throughput(s: Session, build_id: str) -> dict[str, dict[str, Any]]:
    where = (StageAttempt.build_id == build_id, StageAttempt.status != "running",
             StageAttempt.stage.not_in(("export_plan", "export_part", "export")))
    by_status = s.execute(select(StageAttempt.stage, StageAttempt.status, func.count(), func.sum(StageAttempt.duration_s))
                          .where(*where).group_by(StageAttempt.stage, StageAttempt.status)).all()
    entities = dict(s.execute(select(StageAttempt.stage, func.count(distinct(StageAttempt.entity_id)))
                              .where(*where).group_by(StageAttempt.stage)).all())
    return throughput(by_status, entities)


def build_stats(s: Session, build_id: str) -> dict[str, Any]:
    """Funnel, states, rejection reasons, duplicates, verification history and throughput."""
    from opensubject_tasks import readmodel

    counted = readmodel.counts(s, build_id)
    return {
        "build": build_id,
        "funnel": readmodel.funnel(s, build_id, counted),
        "states": readmodel.states(s, build_id, counted),
        "rejections": count_reasons(readmodel.rejection_reasons(s, build_id)),
        "duplicates": readmodel.duplicates(s, build_id, limit=1000),
        "verification": _verification(s, build_id),
        "throughput": _throughput(s, build_id),
    }


def _held_out(bench_dirs: list[Path]) -> set[str]:
    """Video ids held out by the given benches (a folder that is not a bench: BadInput)."""
    if not bench_dirs:
        return set()
    from opensubject_tasks.bench.build import held_out_videos  # numpy/PIL: only when asked

    return set().union(*(held_out_videos(b) for b in bench_dirs))


def check_build(ctx: Context, build_id: str) -> None:
    with session_scope(ctx.sessions) as s:
        known = s.get(Build, build_id) is not None or s.scalar(
            select(func.count(Video.id)).where(Video.build_id == build_id))
    if not known:
        raise BadInput(f"build {build_id!r} not found")


def verified(build_id: str, held_out: set[str]) -> Any:
    """The build's verified samples, the held-out videos' left out, in id order."""
    q = lineage(select(Sample.id)).where(Video.build_id == build_id, Sample.state == "verified")
    if held_out:
        q = q.where(Video.id.not_in(sorted(held_out)))
    return q.order_by(Sample.id)


def shard_starts(s: Session, build_id: str, held_out: set[str], per_shard: int) -> tuple[list[str], int]:
    """The first sample id of each shard of ``per_shard`` samples, and the sample count:
    one pass of one query over the build's verified samples."""
    ranked = verified(build_id, held_out).add_columns(
        func.row_number().over(order_by=Sample.id).label("rn"),
        func.count().over().label("total")).order_by(None).subquery()
    rows = s.execute(select(ranked.c.id, ranked.c.total).where((ranked.c.rn - 1) % per_shard == 0)
                     .order_by(ranked.c.id)).all()
    return [r.id for r in rows], int(rows[0].total) if rows else 0


def records_between(ctx: Context, build_id: str, first: str, before: str | None,
                    held_out: set[str]) -> list[ExportRecord]:
    """The verified samples from ``first`` up to (not including) ``before``."""
    versions = _versions()
    with session_scope(ctx.sessions) as s:
        return [_record(build_id, *row, versions=versions)
                for row in s.execute(part_rows(build_id, first, before, held_out))]


@hot_query("export part", lambda f: {"build_id": f.build, "first": f.sample_ids[0], "before": f.sample_ids[-1],
                                     "held_out": set(f.video_ids[:3])})
def part_rows(build_id: str, first: str, before: str | None, held_out: set[str]) -> Select:
    """One export part's verified samples with their lineage, in id order."""
    q = lineage(select(Sample, Pair, Subject, Clip, Video)).where(
        Video.build_id == build_id, Sample.state == "verified", Sample.id >= first)
    if before is not None:
        q = q.where(Sample.id < before)
    if held_out:
        q = q.where(Video.id.not_in(sorted(held_out)))
    return q.order_by(Sample.id)


def held_out_summary(ctx: Context, build_id: str, benches: list[Path], held_out: set[str]) -> dict[str, Any]:
    """How many videos and verified samples the benches keep out of the training export."""
    with session_scope(ctx.sessions) as s:
        videos, samples = s.execute(lineage(select(func.count(distinct(Video.id)), func.count(Sample.id))).where(
            Video.build_id == build_id, Sample.state == "verified", Video.id.in_(sorted(held_out)))).one()
    return {"benches": [str(b) for b in benches], "videos": int(videos), "samples_excluded": int(samples)}


def image_keys(ctx: Context, sample_ids: list[str]) -> dict[str, dict[str, str]]:
    """The stored image keys of a few samples (the report's cards)."""
    if not sample_ids:
        return {}
    with session_scope(ctx.sessions) as s:
        return {sid: dict(keys or {}) for sid, keys in s.execute(
            select(Sample.id, Sample.keys).where(Sample.id.in_(sorted(sample_ids))))}

"""What an export reads from the database: the verified samples of a build (all of them,
or one shard's range), with their lineage, and the build's statistics."""
from __future__ import annotations

from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Build, Clip, Pair, Sample, StageAttempt, Subject, Video
from opensubject_tasks.errors import BadInput
from opensubject_tasks.stages.export import ExportRecord, count_reasons, throughput

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
        .where(StageAttempt.build_id == build_id, StageAttempt.stage.not_in(("export_plan", "export_part", "export")),
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
    q = _chain(select(Sample.id)).where(Video.build_id == build_id, Sample.state == "verified")
    if held_out:
        q = q.where(Video.id.not_in(sorted(held_out)))
    return q.order_by(Sample.id)


def shard_starts(s: Session, build_id: str, held_out: set[str], per_shard: int) -> tuple[list[str], int]:
    """The first sample id of each shard of ``per_shard`` samples, and the sample count:
    one query, whatever the size of the build."""
    ranked = verified(build_id, held_out).add_columns(
        func.row_number().over(order_by=Sample.id).label("rn")).order_by(None).subquery()
    starts = list(s.scalars(select(ranked.c.id).where((ranked.c.rn - 1) % per_shard == 0).order_by(ranked.c.id)))
    total = int(s.scalar(select(func.count()).select_from(ranked)) or 0)
    return starts, total


def records_between(ctx: Context, build_id: str, first: str, before: str | None,
                    held_out: set[str]) -> tuple[list[ExportRecord], dict[str, str]]:
    """The verified samples from ``first`` up to (not including) ``before``, and their
    video names."""
    versions = _versions()
    with session_scope(ctx.sessions) as s:
        q = _chain(select(Sample, Pair, Subject, Clip, Video)).where(
            Video.build_id == build_id, Sample.state == "verified", Sample.id >= first)
        if before is not None:
            q = q.where(Sample.id < before)
        if held_out:
            q = q.where(Video.id.not_in(sorted(held_out)))
        rows = s.execute(q.order_by(Sample.id)).all()
        records = [_record(build_id, *row, versions=versions) for row in rows]
    return records, {r.sample_id: row[4].name for r, row in zip(records, rows, strict=True)}


def held_out_summary(ctx: Context, build_id: str, benches: list[Path], held_out: set[str]) -> dict[str, Any]:
    """How many videos and verified samples the benches keep out of the training export."""
    with session_scope(ctx.sessions) as s:
        rows = s.execute(_chain(select(Sample.id)).add_columns(Video.id)
                         .where(Video.build_id == build_id, Sample.state == "verified")).all()
    ids = [r[1] for r in rows]
    return {"benches": [str(b) for b in benches], "videos": len(set(ids) & held_out),
            "samples_excluded": sum(1 for v in ids if v in held_out)}

"""What the dataset dashboard shows, as one JSON-ready document (count queries only, so
it stays fast on a large database)."""
from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from opensubject_tasks import readmodel
from opensubject_tasks.catalogue import VIDEO_TERMINAL
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Build, Sample, StageAttempt, Video
from opensubject_tasks.storage import make_store

THUMB_EXPIRY_S = 300          # presigned thumbnail links live five minutes
THUMB_NAMES = ("reference", "generation_input", "manipulation_input", "target")
# Browsers reach the store under another name than the services do (compose: minio:9000
# inside, localhost:9000 outside); links are signed for that name.
PUBLIC_ENDPOINT_ENV = "OPENSUBJECT_DASHBOARD_STORE_ENDPOINT"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _by(s: Any, col: Any, where: Any = None) -> dict[str, int]:
    q = select(col, func.count()).group_by(col)
    if where is not None:
        q = q.where(where)
    return {str(k): int(v) for k, v in s.execute(q).all()}


def _url_store(ctx: Context) -> Any:
    public = os.environ.get(PUBLIC_ENDPOINT_ENV)
    if public and ctx.settings.store.kind == "minio":
        return make_store(ctx.settings.store.model_copy(update={"endpoint": public}))
    return ctx.store


def summary(ctx: Context, build_id: str | None = None, recent: int = 12,
            failures: int = 50) -> dict[str, Any]:
    """Funnel, failures by reason, attempts and retries per stage, recent samples (with
    short-lived thumbnail links) and per-build progress; ``build_id`` narrows to one build."""
    vb = Video.build_id == build_id if build_id else None
    sb = Sample.build_id == build_id if build_id else None
    ab = StageAttempt.build_id == build_id if build_id else None
    with session_scope(ctx.sessions) as s:
        def count(q: Any) -> int:
            return int(s.scalar(q) or 0)

        funnel = readmodel.funnel(s, build_id)
        samples = readmodel.states(s, build_id)["samples"]
        duplicates = readmodel.duplicates(s, build_id, limit=failures)

        failed_videos = s.execute(
            select(Video.id, Video.name, Video.state, Video.reason, Video.updated_at)
            .where(Video.state.in_(("failed", "rejected")), *([vb] if vb is not None else []))
            .order_by(Video.updated_at.desc()).limit(failures)).all()
        by_reason: dict[str, dict[str, Any]] = {}
        for vid, name, state, reason, _ in failed_videos:
            last = s.execute(select(StageAttempt.stage, StageAttempt.error)
                             .where(StageAttempt.entity_type == "video", StageAttempt.entity_id == vid,
                                    StageAttempt.status != "ok")
                             .order_by(StageAttempt.id.desc()).limit(1)).first()
            key = reason or "(no reason recorded)"
            group = by_reason.setdefault(key, {"reason": key, "state": state, "count": 0, "videos": []})
            group["count"] += 1
            group["videos"].append({"id": vid, "name": name, "stage": last.stage if last else None,
                                    "error": (last.error or "")[:2000] if last else None})
        sample_reasons = [
            {"reason": r or "(no reason recorded)", "state": st, "count": int(n)}
            for r, st, n in s.execute(
                select(Sample.reason, Sample.state, func.count())
                .where(Sample.state.in_(("rejected", "failed")), *([sb] if sb is not None else []))
                .group_by(Sample.reason, Sample.state).order_by(func.count().desc()).limit(failures)).all()
        ]

        attempts: dict[str, dict[str, Any]] = {}
        aq = select(StageAttempt.stage, StageAttempt.status, func.count()).group_by(
            StageAttempt.stage, StageAttempt.status)
        rq = select(StageAttempt.stage, func.count()).where(StageAttempt.attempt > 1).group_by(StageAttempt.stage)
        if ab is not None:
            aq, rq = aq.where(ab), rq.where(ab)
        for stage, status, n in s.execute(aq).all():
            attempts.setdefault(stage, {"statuses": {}, "retries": 0})["statuses"][status] = int(n)
        for stage, n in s.execute(rq).all():
            attempts.setdefault(stage, {"statuses": {}, "retries": 0})["retries"] = int(n)
        resynthesized = count(select(func.count()).select_from(Sample).where(
            Sample.attempt > 1, *([sb] if sb is not None else [])))

        recent_rows = list(s.scalars(
            select(Sample).where(Sample.state.in_(("synthesized", "verified", "rejected")),
                                 *([sb] if sb is not None else []))
            .order_by(Sample.updated_at.desc(), Sample.id).limit(recent)))

        build_rows = list(s.scalars(select(Build).order_by(Build.created_at.desc()).limit(20)))
        builds = []
        for b in build_rows:
            v = _by(s, Video.state, Video.build_id == b.id)
            sm = _by(s, Sample.state, Sample.build_id == b.id)
            total = sum(v.values())
            finished = sum(n for st, n in v.items() if st in VIDEO_TERMINAL)
            builds.append({"id": b.id, "state": b.state, "profile": b.profile,
                           "created_at": _iso(b.created_at), "updated_at": _iso(b.updated_at),
                           "videos": v, "samples": sm, "videos_total": total, "videos_finished": finished,
                           "progress": round(finished / total, 3) if total else 0.0})

    url_store = _url_store(ctx)
    expiry = min(THUMB_EXPIRY_S, ctx.settings.store.presign_expiry_s)
    recent_samples = []
    for row in recent_rows:
        keys = row.keys or {}
        thumbs = {}
        for name in THUMB_NAMES:
            if keys.get(name):
                try:
                    thumbs[name] = url_store.url(keys[name], expires_s=expiry)
                except Exception:  # noqa: BLE001 - a missing link must not break the page
                    thumbs[name] = None
        recent_samples.append({"id": row.id, "state": row.state, "attempt": row.attempt,
                               "caption": row.caption_short, "reason": row.reason,
                               "updated_at": _iso(row.updated_at), "thumbnails": thumbs})

    return {
        "build": build_id,
        "funnel": [{"stage": k, "label": readmodel.FUNNEL[k], "count": v} for k, v in funnel.items()],
        "duplicates": duplicates,
        "samples_by_state": samples,
        "failures": sorted(by_reason.values(), key=lambda g: -g["count"]),
        "sample_rejections": sample_reasons,
        "attempts": attempts,
        "resynthesized_samples": resynthesized,
        "recent_samples": recent_samples,
        "thumbnail_expiry_s": expiry,
        "builds": builds,
    }

"""What the dataset dashboard shows, as one JSON-ready document.

Counts (funnel, states, attempts, rejection reasons) are the build's kept counts
(readmodel.counts: a few dozen rows on PostgreSQL whatever the build holds); the lists are
scoped to the build and limited, through an index on the build. Without a build named, the page shows the
most recent build. The builds list names the most recent ``BUILDS_LISTED`` builds and
counts the states of those still running and of the one shown; a finished build's
counts are its own page (one click), so old builds cost nothing on every load.
"""
from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select

from opensubject_tasks import readmodel
from opensubject_tasks.catalogue import VIDEO_TERMINAL
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.models import Sample, StageAttempt, Video
from opensubject_tasks.storage import make_store

BUILDS_LISTED = 10
THUMB_EXPIRY_S = 300          # presigned thumbnail links live five minutes
THUMB_NAMES = ("reference", "generation_input", "manipulation_input", "target")
# Browsers reach the store under another name than the services do (compose: minio:9000
# inside, localhost:9000 outside); links are signed for that name.
PUBLIC_ENDPOINT_ENV = "OPENSUBJECT_DASHBOARD_STORE_ENDPOINT"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _url_store(ctx: Context) -> Any:
    public = os.environ.get(PUBLIC_ENDPOINT_ENV)
    if public and ctx.settings.store.kind == "minio":
        return make_store(ctx.settings.store.model_copy(update={"endpoint": public}))
    return ctx.store


@hot_query("dashboard load", lambda f: {"build_id": f.build, "limit": 50})
def failed_videos_of(build_id: str | None, limit: int) -> Select:
    """The build's most recently failed or rejected videos."""
    vb = [Video.build_id == build_id] if build_id else []
    return (select(Video.id, Video.name, Video.state, Video.reason, Video.updated_at)
            .where(Video.state.in_(("failed", "rejected")), *vb).order_by(Video.updated_at.desc()).limit(limit))


@hot_query("dashboard load", lambda f: {"video_id": f.video})
def last_failed_attempt(video_id: str) -> Select:
    """Where a failed video last failed."""
    return (select(StageAttempt.stage, StageAttempt.error)
            .where(StageAttempt.entity_type == "video", StageAttempt.entity_id == video_id,
                   StageAttempt.status != "ok")
            .order_by(StageAttempt.id.desc()).limit(1))


@hot_query("dashboard load", lambda f: {"build_id": f.build, "limit": 12})
def recent_samples_of(build_id: str | None, limit: int) -> Select:
    """The build's most recently changed samples that have images."""
    sb = [Sample.build_id == build_id] if build_id else []
    return (select(Sample).where(Sample.state.in_(("synthesized", "verified", "rejected")), *sb)
            .order_by(Sample.updated_at.desc(), Sample.id.desc()).limit(limit))


def summary(ctx: Context, build_id: str | None = None, recent: int = 12,
            failures: int = 50) -> dict[str, Any]:
    """Funnel, failures by reason, attempts and retries per stage, recent samples (with
    short-lived thumbnail links) of one build (the most recent one when none is named),
    and the progress of the most recent builds."""
    with session_scope(ctx.sessions) as s:
        build_rows = list(s.scalars(readmodel.recent_builds(BUILDS_LISTED)))
        if build_id is None and build_rows:
            build_id = build_rows[0].id

        counted = readmodel.counts(s, build_id)
        funnel = readmodel.funnel(s, build_id, counted)
        samples = readmodel.by_key(counted, "samples")
        duplicates = readmodel.duplicates(s, build_id, limit=failures)

        failed_videos = s.execute(failed_videos_of(build_id, failures)).all()
        by_reason: dict[str, dict[str, Any]] = {}
        for vid, name, state, reason, _ in failed_videos:
            last = s.execute(last_failed_attempt(vid)).first()
            key = reason or "(no reason recorded)"
            group = by_reason.setdefault(key, {"reason": key, "state": state, "count": 0, "videos": []})
            group["count"] += 1
            group["videos"].append({"id": vid, "name": name, "stage": last.stage if last else None,
                                    "error": (last.error or "")[:2000] if last else None})
        sample_reasons = sorted(
            ({"reason": r or "(no reason recorded)", "state": kind.split(":", 1)[1], "count": n}
             for (kind, r), n in counted.items() if kind.startswith("sample_reason:")),
            key=lambda g: (-g["count"], g["state"], g["reason"]))[:failures]

        attempts: dict[str, dict[str, Any]] = {}
        for (kind, status), n in sorted(counted.items()):
            if kind.startswith("attempts:"):
                a = attempts.setdefault(kind.split(":", 1)[1], {"statuses": {}, "retries": 0})
                a["statuses"][status] = n
        for (kind, _), n in counted.items():
            if kind.startswith("retries:"):
                attempts[kind.split(":", 1)[1]]["retries"] += n
        resynthesized = counted.get(("resynthesized", ""), 0)

        recent_rows = list(s.scalars(recent_samples_of(build_id, recent)))

        # videos and samples by state of the running builds and the one shown: their kept
        # counts
        listed = [b.id for b in build_rows if b.state == "running" or b.id == build_id]
        v_by: dict[str, dict[str, int]] = {}
        s_by: dict[str, dict[str, int]] = {}
        for b in listed:
            c = counted if b == build_id else readmodel.counts(s, b)
            v_by[b], s_by[b] = readmodel.by_key(c, "videos"), readmodel.by_key(c, "samples")
        builds = []
        for b in build_rows:
            doc: dict[str, Any] = {"id": b.id, "state": b.state, "profile": b.profile,
                                   "created_at": _iso(b.created_at), "updated_at": _iso(b.updated_at),
                                   "counted": b.id in v_by}
            if b.id in v_by:
                v, sm = v_by[b.id], s_by[b.id]
                total = sum(v.values())
                finished = sum(n for st, n in v.items() if st in VIDEO_TERMINAL)
                doc.update({"videos": dict(sorted(v.items())), "samples": dict(sorted(sm.items())),
                            "videos_total": total, "videos_finished": finished,
                            "progress": round(finished / total, 3) if total else 0.0})
            builds.append(doc)

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

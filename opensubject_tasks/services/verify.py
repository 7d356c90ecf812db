"""Stage 4 service: verify synthesized samples (one, or a batch of one video's samples with
each model called once) and record each outcome.

Pass -> captions, state ``verified``. Fail below ``max_attempts`` -> attempt + 1, a new
seed, state ``pending`` and a follow-up ``synthesize`` (re-queued, not retried in
place). Fail at ``max_attempts`` -> ``rejected`` with every attempt's reasons.
Every attempt leaves exactly one entry in ``samples.history``: a redelivered or
repeated verify of the same attempt changes nothing.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select

from opensubject_tasks.catalogue import SAMPLE_IMAGES, SAMPLE_MASKS, SAMPLE_OPTIONAL, SAMPLE_TERMINAL
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.lineage import lineage
from opensubject_tasks.db.models import Pair, Sample, Subject
from opensubject_tasks.errors import BadInput
from opensubject_tasks.services.common import StageResult, one_sample, stage, utcnow
from opensubject_tasks.steps.verdict import VerifyOutcome, decide, verify_and_caption_batch
from opensubject_tasks.storage import ObjectStore


def decode_image(data: bytes, is_mask: bool) -> np.ndarray:
    """PNG/JPEG bytes -> RGB uint8 (H, W, 3), or a bool mask (H, W) for mask images."""
    with Image.open(io.BytesIO(data)) as im:
        if is_mask:
            return np.asarray(im.convert("L")) > 127
        return np.asarray(im.convert("RGB"))


def load_sample_images(store: ObjectStore, keys: dict[str, str], sample_id: str) -> dict[str, np.ndarray]:
    missing = [n for n in SAMPLE_IMAGES if not keys.get(n) and n not in SAMPLE_OPTIONAL]
    if missing:
        raise BadInput(f"sample {sample_id} has no stored {', '.join(missing)}")
    images: dict[str, np.ndarray] = {}
    for name in (n for n in SAMPLE_IMAGES if keys.get(n)):
        try:
            data = store.get_bytes(keys[name])
        except (FileNotFoundError, KeyError) as exc:
            raise BadInput(f"sample {sample_id}: object {keys[name]} ({name}) is missing") from exc
        try:
            images[name] = decode_image(data, name in SAMPLE_MASKS)
        except (OSError, ValueError) as exc:
            raise BadInput(f"sample {sample_id}: {name} is not a readable image ({exc})") from exc
    return images


def _skip(why: str) -> StageResult:
    return StageResult(status="ok", details={"skipped": why})


def _in_image(box: list[float] | None, frame: dict[str, Any] | None) -> list[float] | None:
    if not box or not frame or not frame.get("scale"):
        return box
    sx, sy = frame["scale"]
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


@dataclass
class _Job:
    sample_id: str
    attempt: int
    seed: int
    keys: dict[str, str]
    history: list[dict[str, Any]]
    meta: dict[str, Any]


@stage("verify")
def verify_sample(ctx: Context, sample_id: str) -> StageResult:
    return one_sample(verify_samples, ctx, sample_id)


def verify_samples(ctx: Context, sample_ids: list[str]) -> dict[str, StageResult | BadInput]:
    """Verify and caption the current attempt of each sample, each model called once for
    the batch; record each outcome on its sample. Returns each sample's outcome."""
    outcomes: dict[str, StageResult | BadInput] = {}
    jobs, images = [], []
    for sid in sample_ids:
        try:
            job = _job(ctx, sid)
            if isinstance(job, StageResult):
                outcomes[sid] = job
                continue
            images.append(load_sample_images(ctx.store, job.keys, sid))
            jobs.append(job)
        except BadInput as exc:
            outcomes[sid] = exc
    settings = ctx.settings
    uses_vlm = settings.backends.verifier == "vlm"
    has_vlm = settings.backends.vlm != "none"
    results = verify_and_caption_batch(
        images, [j.meta for j in jobs], ctx.backend("verifier"), settings.verify,
        embedder=ctx.backend("embedder"),
        vlm=ctx.backend("vlm") if uses_vlm else None,
        caption_vlm=ctx.backend("vlm") if has_vlm else None,
    ) if jobs else []
    for job, outcome in zip(jobs, results, strict=True):
        outcomes[job.sample_id] = _record(ctx, job, outcome)
    return outcomes


def _job(ctx: Context, sample_id: str) -> _Job | StageResult:
    with session_scope(ctx.sessions) as s:
        row = s.get(Sample, sample_id)
        if row is None:
            raise BadInput(f"sample {sample_id} does not exist")
        state, attempt, seed = row.state, row.attempt, row.seed
        keys, history = dict(row.keys or {}), list(row.history or [])
        found = s.execute(
            lineage(select(Pair, Subject), Pair, Subject).where(Pair.id == row.pair_id)
        ).first()
        if found is None:
            raise BadInput(f"sample {sample_id}: its pair {row.pair_id} does not exist")
        pair, subject = found
        # boxes in the synthesized images' pixels: targets are full frames, mining's boxes
        # keyframe pixels (services/synthesize.py records the scale)
        frames = (row.augment or {}).get("frames") or {}
        meta: dict[str, Any] = {"id": sample_id, "attempt": attempt, "seed": seed,
                                "category": subject.category,
                                "ref_box": _in_image(pair.ref_box, frames.get("reference")),
                                "tgt_box": _in_image(pair.tgt_box, frames.get("target")),
                                # what now fills the subject's place (None: background)
                                "replacement": ((row.augment or {}).get("replacement") or {}).get("object")}
    if state in SAMPLE_TERMINAL:
        return _skip(f"already {state}")
    if state != "synthesized":
        return _skip(f"state {state}: nothing synthesized to verify")
    if any(h.get("attempt") == attempt for h in history):
        return _skip(f"attempt {attempt} already verified")
    return _Job(sample_id, attempt, seed, keys, history, meta)


def _record(ctx: Context, job: _Job, outcome: VerifyOutcome) -> StageResult:
    settings = ctx.settings
    sample_id, attempt = job.sample_id, job.attempt
    decision = decide(sample_id, attempt, job.seed, outcome.verdict, job.history,
                      settings.verify.max_attempts, settings.synth.base_seed)
    with session_scope(ctx.sessions) as s:
        row = s.get(Sample, sample_id, with_for_update=True)
        # Someone else recorded this attempt while we were verifying: keep theirs.
        if (row is None or row.state != "synthesized" or row.attempt != attempt
                or any(h.get("attempt") == attempt for h in (row.history or []))):
            return _skip("attempt recorded concurrently")
        entry = dict(decision.history_entry, at=utcnow().isoformat())
        row.history = [*(row.history or []), entry]   # new list: JSON columns track assignment
        row.verdict = decision.history_entry["verdict"]
        row.backends = {**(row.backends or {}), "verifier": outcome.verdict.source}
        row.state, row.attempt, row.seed = decision.state, decision.attempt, decision.seed
        if decision.state == "verified":
            cap = outcome.caption
            row.caption_short, row.caption_long, row.caption_source = cap.short, cap.long, cap.source
            row.backends = {**row.backends, "caption": cap.source}
            row.reason = None
        elif decision.state == "pending":
            row.queued_at = utcnow()
            row.reason = None
        else:
            row.reason = decision.reason[:2000]

    details = {"attempt": attempt, "passed": outcome.verdict.passed, "state": decision.state,
               "scores": outcome.verdict.scores}
    if decision.state == "rejected":
        return StageResult(status="rejected", reason=decision.reason, details=details)
    return StageResult(status="ok", next=decision.next, details=details)

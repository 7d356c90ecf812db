"""Stage 4: verify a synthesized sample, caption it, and decide what happens next.

Pure functions: images and metadata in, a verdict, captions and a decision out. The
service (services/verify.py) loads rows and objects and writes the outcome.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from opensubject_tasks.backends.base import VLM, Caption, Embedder, Verdict, Verifier
from opensubject_tasks.captions import template_caption
from opensubject_tasks.catalogue import SAMPLE_IMAGES, retry
from opensubject_tasks.config import VerifySettings
from opensubject_tasks.geometry import as_mask, mask_box


def sample_seed(sample_id: str, attempt: int, base_seed: int = 0) -> int:
    """The synthesis seed of a sample's attempt: a fixed function of (base, id, attempt),
    so a re-run reproduces it and every re-synthesis draws a new one. Fits 31 bits."""
    digest = hashlib.sha256(f"{base_seed}:{sample_id}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF


@dataclass
class VerifyOutcome:
    verdict: Verdict
    caption: Caption | None = None  # only for a passed sample


@dataclass
class Decision:
    state: str                       # verified | pending (re-synthesis) | rejected
    attempt: int                     # the sample's attempt after this decision
    seed: int                        # the seed for that attempt
    history_entry: dict[str, Any]
    reason: str | None = None
    next: list[tuple[str, str]] = field(default_factory=list)


def caption_samples(images: list[dict[str, np.ndarray]], metas: list[dict[str, Any]],
                    vlm: VLM | None = None) -> list[Caption]:
    """Short and long captions of each target: from the VLM when one is configured (one
    call for the batch), otherwise (or where it returns nothing) template captions marked
    as such."""
    box_masks = [as_mask(im.get("manipulation_mask")) for im in images]
    categories = [str(m.get("category") or "object") for m in metas]
    caps: list[Caption | None] = [None] * len(images)
    if vlm is not None and getattr(vlm, "name", "none") != "none" and images:
        hints = [{"category": c, "box": mask_box(bm) if bm is not None else None}   # in the target's pixels
                 for c, bm in zip(categories, box_masks, strict=True)]
        answered = vlm.caption([im["target"] for im in images], hints)
        caps = [c if c.short.strip() and c.long.strip() else None for c in answered]
    return [cap or template_caption(im["reference"], as_mask(im.get("mask")), im["target"], bm, cat)
            for cap, im, bm, cat in zip(caps, images, box_masks, categories, strict=True)]


def caption_sample(images: dict[str, np.ndarray], meta: dict[str, Any], vlm: VLM | None = None) -> Caption:
    return caption_samples([images], [meta], vlm)[0]


def verify_and_caption_batch(images: list[dict[str, np.ndarray]], metas: list[dict[str, Any]],
                             verifier: Verifier, thresholds: VerifySettings, embedder: Embedder | None = None,
                             vlm: VLM | None = None, caption_vlm: VLM | None = None) -> list[VerifyOutcome]:
    """Verify a batch of samples (one verifier call: its models see the whole batch) and
    caption those that passed (one captioning call). ``metas`` carry id, attempt, seed,
    category and boxes (verifiers may use them, e.g. the category in VLM questions)."""
    samples = [{k: im[k] for k in SAMPLE_IMAGES if k in im} | dict(meta) for im, meta in zip(images, metas, strict=True)]
    verdicts = verifier.verify(samples, thresholds, embedder=embedder, vlm=vlm) if samples else []
    passed = [i for i, v in enumerate(verdicts) if v.passed]
    caps = caption_samples([images[i] for i in passed], [metas[i] for i in passed], caption_vlm)
    caption_of = dict(zip(passed, caps, strict=True))
    return [VerifyOutcome(verdict=v, caption=caption_of.get(i)) for i, v in enumerate(verdicts)]


def verify_and_caption(images: dict[str, np.ndarray], meta: dict[str, Any], verifier: Verifier,
                       thresholds: VerifySettings, embedder: Embedder | None = None,
                       vlm: VLM | None = None, caption_vlm: VLM | None = None) -> VerifyOutcome:
    """``verify_and_caption_batch`` for one sample."""
    return verify_and_caption_batch([images], [meta], verifier, thresholds, embedder, vlm, caption_vlm)[0]


def verdict_dict(v: Verdict) -> dict[str, Any]:
    return asdict(v)


def rejection_summary(history: Sequence[dict[str, Any]]) -> str:
    """One line naming every attempt's reasons, for a sample rejected at max_attempts."""
    parts = [f"attempt {h['attempt']} (seed {h['seed']}): " + ("; ".join(h.get("reasons") or [])
                                                                or "failed without a reason")
             for h in history]
    return f"rejected after {len(history)} attempt(s): " + " | ".join(parts)


def shows_two_individuals(reason: str) -> bool:
    """A failure of the pair itself, not of what synthesis made of it: the reference and
    the target are two individuals (by the embedding, or the VLM said so). A new seed
    cannot change that, so such a sample is not re-synthesized."""
    return reason.startswith("same individual: the target's subject differs") or (
        reason.startswith("vlm_same_individual:") and reason.endswith(" answered no"))


def decide(sample_id: str, attempt: int, seed: int, verdict: Verdict,
           history: Sequence[dict[str, Any]], max_attempts: int, base_seed: int = 0) -> Decision:
    """Verified, re-synthesize with a new seed, or reject once max_attempts have failed
    (at once when the pair shows two individuals)."""
    entry = {"attempt": attempt, "seed": seed, "verdict": verdict_dict(verdict),
             "reasons": list(verdict.reasons)}
    if verdict.passed:
        return Decision("verified", attempt, seed, entry)
    if any(shows_two_individuals(r) for r in verdict.reasons):
        return Decision("rejected", attempt, seed, entry,
                        reason="wrong identity, not re-synthesized: " + rejection_summary([*history, entry]))
    if attempt < max_attempts:
        nxt = attempt + 1
        return Decision("pending", nxt, sample_seed(sample_id, nxt, base_seed), entry,
                        next=retry("verify", sample_id))
    return Decision("rejected", attempt, seed, entry, reason=rejection_summary([*history, entry]))

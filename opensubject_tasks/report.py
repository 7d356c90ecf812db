"""A self-contained HTML report of one build: one file, no external resources.

Stage funnel as an inline SVG bar chart, rejection reasons, verification attempts,
throughput per stage, a grid of randomly chosen verified samples (seeded, so the
same build gives the same report) and the worst-scoring verified samples, each with
its captions and inline base64 thumbnails. Every text taken from data is escaped, and
any configured secret is replaced before it reaches the page.
"""
from __future__ import annotations

import hashlib

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image

from opensubject_tasks.readmodel import FUNNEL

FUNNEL_ORDER = tuple(FUNNEL)
THUMB_NAMES = ("reference", "generation_input", "manipulation_input", "target")
REDACTED = "[redacted]"


@dataclass
class ReportSample:
    key: str
    caption_short: str
    caption_long: str
    caption_source: str
    scores: dict[str, float]
    attempt: int
    video: str
    thumbs: dict[str, str] = field(default_factory=dict)  # image name -> data: URI


def thumbnail_uri(data: bytes, max_side: int) -> str:
    """A small JPEG data URI of an image (deterministic for the same input bytes)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80, optimize=False, progressive=False)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Text:
    """Escapes text for HTML after removing secrets."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self.secrets = sorted((s for s in secrets if s), key=len, reverse=True)

    def clean(self, value: Any) -> str:
        s = str(value)
        for secret in self.secrets:
            s = s.replace(secret, REDACTED)
        return s

    def __call__(self, value: Any) -> str:
        return html.escape(self.clean(value), quote=True)


def funnel_svg(funnel: dict[str, int], width: int = 640) -> str:
    """Horizontal bars, one per funnel step, widths relative to the largest count."""
    rows = [(k, int(funnel.get(k, 0))) for k in FUNNEL_ORDER if k in funnel]
    top = max([n for _, n in rows] + [1])
    bar_h, gap, label_w, count_w = 26, 8, 90, 70
    height = len(rows) * (bar_h + gap) + gap
    span = width - label_w - count_w
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="funnel" role="img" '
             f'aria-label="stage funnel" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">']
    for i, (name, n) in enumerate(rows):
        y = gap + i * (bar_h + gap)
        w = max(1, round(span * n / top)) if n else 0
        colour = "#c0392b" if name == "rejected" else "#2e86c1" if name != "verified" else "#27ae60"
        parts.append(
            f'<g class="step" data-step="{name}" data-count="{n}"><title>{html.escape(FUNNEL[name])}</title>'
            f'<text x="{label_w - 8}" y="{y + bar_h * 0.7:.1f}" text-anchor="end">{name}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w}" height="{bar_h}" fill="{colour}" rx="3"/>'
            f'<text x="{label_w + w + 6}" y="{y + bar_h * 0.7:.1f}">{n}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], t: _Text, cls: str) -> str:
    if not rows:
        return '<p class="empty">none</p>'
    th = "".join(f"<th>{t(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{t(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _card(s: ReportSample, t: _Text) -> str:
    imgs = "".join(f'<figure><img src="{s.thumbs[n]}" alt="{t(n)}"><figcaption>{t(n.replace("_", " "))}'
                   f"</figcaption></figure>" for n in THUMB_NAMES if n in s.thumbs)
    shown = ("overall", "identity", "identity_keypoints", "residual", "artifact")
    score = " · ".join(f"{k} {s.scores[k]:.2f}" for k in shown if k in s.scores)
    return (f'<div class="card" data-key="{t(s.key)}"><div class="imgs">{imgs}</div>'
            f'<p class="short">{t(s.caption_short)}</p><p class="long">{t(s.caption_long)}</p>'
            f'<p class="meta">{t(s.key)} · {t(s.video)} · attempt {s.attempt} · captions: '
            f"{t(s.caption_source)}</p><p class=\"scores\">{t(score)}</p></div>")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin:0 0 16px}
table{border-collapse:collapse;font-size:14px;background:#fff}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
svg text{font-size:13px;font-family:inherit;fill:#222}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.imgs{display:flex;gap:4px;flex-wrap:wrap}
figure{margin:0;text-align:center}figure img{height:72px;border:1px solid #eee}
figcaption{font-size:10px;color:#777}
.short{font-weight:600;margin:6px 0 2px}.long{margin:0 0 4px;font-size:13px}
.meta,.scores{font-size:11px;color:#666;margin:2px 0;word-break:break-all}
.empty{color:#888}
"""


def render_report(build_id: str, stats: dict[str, Any], grid: Sequence[ReportSample],
                  worst: Sequence[ReportSample], secrets: Sequence[str] = ()) -> str:
    """The whole report as one HTML string."""
    t = _Text(secrets)
    funnel = stats.get("funnel", {})
    reasons = [(r["stage"], r["reason"], r["count"], r["example"]) for r in stats.get("rejections", [])]
    ver = stats.get("verification", {})
    checks = sorted(ver.get("failed_checks", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    attempts = sorted(ver.get("verified_at_attempt", {}).items(), key=lambda kv: int(kv[0]))
    thr = [(stage, v["attempts"], v["entities"], ", ".join(f"{k} {n}" for k, n in v["by_status"].items()),
            f"{v['busy_seconds']:.1f}", f"{v['mean_seconds']:.3f}",
            "" if v["per_second"] is None else f"{v['per_second']:.2f}")
           for stage, v in stats.get("throughput", {}).items()]
    exp = stats.get("export", {})
    og = exp.get("omnigen2") or {}
    training = [(k.replace("_", " "), og[k]) for k in ("generation_single", "generation_multi", "manipulation")
                if k in og]
    training += [(f"generation with {n} subjects", c) for n, c in og.get("generation_multi_by_subjects", {}).items()]
    body = [
        f"<h1>OpenSubject build {t(build_id)}</h1>",
        f'<p class="sub">{exp.get("samples", 0)} verified samples in {exp.get("shards", 0)} shard(s)'
        f' · {exp.get("bytes", 0) / 1e6:.1f} MB of shards</p>',
        "<h2>Stage funnel</h2>", funnel_svg(funnel),
        "<h2>Training samples (OmniGen2 layout)</h2>",
        _table(("kind", "samples"), training, t, "training")
        + (f'<p class="sub">{t(og["note"])}</p>' if og.get("note") else ""),
        "<h2>Duplicate inputs</h2>",
        _table(("input file", "byte-identical copy of"),
               [(d["name"], d["copy_of"]) for d in stats.get("duplicates", [])], t, "duplicates"),
        "<h2>Rejection reasons</h2>",
        _table(("stage", "reason", "count", "example"), reasons, t, "reasons"),
        "<h2>Verification</h2>",
        _table(("failed check", "count (all attempts)"), checks, t, "checks"),
        _table(("verified at attempt", "samples"), attempts, t, "attempts"),
        "<h2>Throughput</h2>",
        _table(("stage", "attempts", "entities", "attempts by status", "busy s", "mean s", "entities per busy s"), thr, t,
               "throughput"),
        f"<h2>Random verified samples ({len(grid)})</h2>",
        '<div class="grid" id="grid">' + "".join(_card(s, t) for s in grid) + "</div>"
        if grid else '<p class="empty">no verified samples</p>',
        f"<h2>Worst-scoring verified samples ({len(worst)})</h2>",
        '<div class="grid" id="worst">' + "".join(_card(s, t) for s in worst) + "</div>"
        if worst else '<p class="empty">no verified samples</p>',
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>OpenSubject build {t(build_id)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def grid_rank(key: str, seed: int) -> str:
    """A sample's rank for the report's random grid, which shows the keys of smallest
    rank: a reproducible random choice made one key at a time (no list of every key)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
"""The dataset dashboard: an HTML page and its JSON API (a FastAPI app).

Whoever mounts it passes ``authenticate``, a FastAPI dependency that returns the user or
raises ``HTTPException(401)``; every route depends on it. Airflow's plugin passes one
that validates Airflow's own login token (plugins/opensubject_plugin.py).
"""
from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

from fastapi import Depends, FastAPI, Query
from fastapi.responses import HTMLResponse

from opensubject_tasks.context import Context


def create_app(authenticate: Callable[..., Any], context: Callable[[], Context] | None = None) -> FastAPI:
    """The dashboard app; ``context`` gives the Context to read (default: from the environment)."""
    from opensubject_tasks.dashboard.data import summary

    def ctx() -> Context:
        if context is not None:
            return context()
        from opensubject_tasks.orchestrate import context as env_context

        return env_context()

    app = FastAPI(title="OpenSubject dataset", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/api/summary")
    def api_summary(build: str | None = Query(None, max_length=64),
                    user: Any = Depends(authenticate)) -> dict[str, Any]:
        return summary(ctx(), build or None)

    @app.get("/", response_class=HTMLResponse)
    def page(build: str | None = Query(None, max_length=64), user: Any = Depends(authenticate)) -> str:
        return render(summary(ctx(), build or None))

    return app


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#1d2733}
h1{font-size:20px;margin:0 0 12px} h2{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #e3e8ee;padding:4px 8px;
text-align:left;vertical-align:top} th{background:#f5f7fa}
.bar{background:#4a90d9;height:14px;display:inline-block;vertical-align:middle}
.prog{background:#e3e8ee;width:160px;height:10px;display:inline-block}.prog>span{background:#3bb273;
height:10px;display:block} pre{white-space:pre-wrap;max-height:8em;overflow:auto;margin:0;font-size:12px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #e3e8ee;padding:6px;width:340px}
.card img{width:160px;height:120px;object-fit:contain;background:#f5f7fa} .muted{color:#6b7785}
"""


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(doc: dict[str, Any]) -> str:
    """The page (server-rendered, no script; every value escaped)."""
    e = escape
    top = max([f["count"] for f in doc["funnel"]] + [1])
    funnel = _table(["step", "what it counts", "count", ""], [
        [e(f["stage"]), e(f["label"]), str(f["count"]),
         f'<span class="bar" style="width:{int(300 * f["count"] / top)}px"></span>']
        for f in doc["funnel"]], "nothing yet")
    duplicates = _table(["input file", "byte-identical copy of", "video id"], [
        [e(d["name"]), e(d["copy_of"]), e(d["video_id"])] for d in doc["duplicates"]], "no duplicate input")
    failures = _table(["reason", "state", "videos", "video", "stage", "error"], [
        [e(g["reason"]), e(g["state"]), str(g["count"]), e(f'{v["name"]} ({v["id"]})'), e(v["stage"] or ""),
         f'<pre>{e(v["error"] or "")}</pre>']
        for g in doc["failures"] for v in g["videos"][:5]], "no failed or rejected video")
    rejections = _table(["reason", "state", "samples"], [
        [e(r["reason"]), e(r["state"]), str(r["count"])] for r in doc["sample_rejections"]],
        "no rejected sample")
    attempts = _table(["stage", "attempts by status", "retries"], [
        [e(stage), e(", ".join(f"{k}: {v}" for k, v in sorted(a["statuses"].items()))), str(a["retries"])]
        for stage, a in sorted(doc["attempts"].items())], "no attempt recorded")
    builds = _table(["build", "state", "profile", "progress", "videos", "samples"], [
        [f'<a href="?build={e(b["id"])}">{e(b["id"])}</a>', e(b["state"]), e(b["profile"]),
         (f'<span class="prog"><span style="width:{int(100 * b["progress"])}%"></span></span> '
          f'{b["videos_finished"]}/{b["videos_total"]}') if b["counted"] else '<span class="muted">its page</span>',
         e(", ".join(f"{k}: {v}" for k, v in sorted(b.get("videos", {}).items()))),
         e(", ".join(f"{k}: {v}" for k, v in sorted(b.get("samples", {}).items())))]
        for b in doc["builds"]], "no build yet")
    cards = "".join(
        '<div class="card">'
        + "".join(f'<img alt="{e(n)}" title="{e(n)}" src="{e(u)}">' for n, u in s["thumbnails"].items() if u)
        + f'<div>{e(s["id"])}</div><div class="muted">{e(s["state"])}, attempt {s["attempt"]}'
        + (f' &middot; {e(s["caption"])}' if s["caption"] else "")
        + (f' &middot; {e(s["reason"])}' if s["reason"] else "") + "</div></div>"
        for s in doc["recent_samples"]) or '<p class="muted">no sample yet</p>'
    scope = f' &middot; build {e(doc["build"])} (<a href="?">latest</a>)' if doc["build"] else ""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>OpenSubject dataset</title>'
            f'<style>{_CSS}</style></head><body><h1>OpenSubject dataset{scope}</h1>'
            f'<h2 id="funnel">Stage funnel</h2>{funnel}'
            f'<h2 id="duplicates">Duplicate inputs</h2>{duplicates}'
            f'<h2 id="failures">Failures by reason</h2>{failures}'
            f'<h2 id="rejections">Rejected samples by reason</h2>{rejections}'
            f'<h2 id="attempts">Attempts and retries</h2>{attempts}'
            f'<p class="muted">{doc["resynthesized_samples"]} sample(s) re-synthesized at least once</p>'
            f'<h2 id="builds">Builds</h2>{builds}'
            f'<h2 id="recent">Recent samples</h2><p class="muted">thumbnail links expire after '
            f'{doc["thumbnail_expiry_s"]} s</p><div class="grid">{cards}</div></body></html>')

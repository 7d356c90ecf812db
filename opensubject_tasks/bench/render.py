"""The scores of a bench written for people: summary.csv, summary.md and worst.html (the
worst cases with their images and the judge's reasons)."""
from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from opensubject_tasks.bench import metrics as M
from opensubject_tasks.bench.build import AXES, SCENES, SPLITS, TASKS, read_image


_COLUMNS = ("group", "cases", "scored", "unscored", "missing", "pf", "sc", "overall",
            "identity_classical", "identity_judge", "prompt_adherence_classical", "prompt_adherence_judge",
            "manipulation_classical", "manipulation_judge", "background_classical", "background_judge",
            "psnr", "ssim")


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [(sp, summary["splits"][sp]) for sp in SPLITS]
    groups += [(t, summary["tasks"][t]) for t in TASKS] + [(s, summary["scenes"][s]) for s in SCENES]
    rows = []
    for g, st in groups:
        row = {"group": g, **{k: st[k] for k in ("cases", "scored", "unscored", "missing", "pf", "sc",
                                                 "overall", "psnr", "ssim")}}
        for ax in AXES:
            for kind in ("classical", "judge"):
                row[f"{ax}_{kind}"] = st["axes"][ax][kind]
        rows.append(row)
    c = summary["counts"]
    rows.append({"group": "overall", "cases": c["cases"], "scored": c["scored"], "unscored": c["unscored"],
                 "missing": c["missing"], "pf": summary["pf"], "sc": summary["sc"],
                 "overall": summary["overall"]})
    return rows


def write_csv(path: Path, summary: dict[str, Any]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_COLUMNS)
        w.writeheader()
        for row in _rows(summary):
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in _COLUMNS})


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def markdown(summary: dict[str, Any]) -> str:
    lab = summary["labels"]
    lines = [f"# Benchmark scores: {summary['name']}", "",
             f"Overall (mean of {len(summary['overall_splits'])} splits): **{_fmt(summary['overall'])}**"
             f" · PF {_fmt(summary['pf'])} · SC {_fmt(summary['sc'])}", "",
             f"* Scored by: {lab['mode']}", f"* PF: {lab['pf']}", f"* SC: {lab['sc']}",
             f"* Judge: {summary['judge']['backend']} (rubric {summary['judge']['rubric_version']}); "
             f"unscored judge replies: {summary['counts']['judge_unscored'] or 'none asked'}",
             f"* Cases: {summary['counts']['cases']}, scored {summary['counts']['scored']}, "
             f"unscored {summary['counts']['unscored']}, missing predictions {summary['counts']['missing']} "
             + ("(left out of the means)" if summary.get("missing_policy") == "skip" else "(missing counts as 0)"),
             "",
             "| group | cases | unscored | missing | PF | SC | overall | identity | prompt | manipulation "
             "| background | PSNR | SSIM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def ax(row: dict[str, Any], name: str) -> str:
        c, j = row.get(f"{name}_classical"), row.get(f"{name}_judge")
        return _fmt(c) + (f" / j {_fmt(j)}" if j is not None else "")

    for row in _rows(summary):
        lines.append(f"| {row['group']} | {row['cases']} | {row['unscored']} | {row['missing']} | "
                     f"{_fmt(row['pf'])} | {_fmt(row['sc'])} | {_fmt(row['overall'])} | "
                     + " | ".join(ax(row, a) for a in AXES) + f" | {_fmt(row.get('psnr'))} | {_fmt(row.get('ssim'))} |")
    lines += ["", "Axis columns: classical value on 0-10, then the judge's (`j`) where it scored.", ""]
    return "\n".join(lines)


# --- worst cases page ---------------------------------------------------------------------
def _thumb(img: np.ndarray, box: list[float] | None = None, side: int = 192) -> str:
    im = Image.fromarray(img if img.dtype == np.uint8 else img.astype(np.uint8) * 255).convert("RGB")
    if box is not None:
        ImageDraw.Draw(im).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(255, 40, 40),
                                     width=max(1, im.width // 160))
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def worst_html(bench: Path, records: list[dict[str, Any]], summary: dict[str, Any], n: int) -> str:
    """The n lowest-scoring cases plus the unscored ones, with inline thumbnails."""
    scored = sorted((r for r in records if r["overall"] is not None), key=lambda r: (r["overall"], r["id"]))
    unscored = [r for r in records if r["overall"] is None]
    esc = html.escape

    def card(r: dict[str, Any]) -> str:
        imgs = []
        for label, rel in (("reference", r["images"]["reference"]), ("input", r["images"]["input"])):
            imgs.append((label, _thumb(read_image(bench / rel))))
        if r.get("prediction") and r["status"] != "missing":
            imgs.append(("output", _thumb(M.resize_to(read_image(r["prediction"]), *r["size"]), r["box"])))
        imgs.append(("ground truth", _thumb(read_image(bench / r["images"]["target"]), r["box"])))
        figs = "".join(f'<figure><img src="{src}" alt="{esc(lbl)}"><figcaption>{esc(lbl)}</figcaption></figure>'
                       for lbl, src in imgs)
        judge = "".join(
            f"<li>judge <b>{esc(ax)}</b>: "
            + (f"unscored ({esc(res['error'] or '')}); last reply: <code>{esc(repr(res['raw'][-1][:300]))}</code>"
               if res["score"] is None else f"{esc(_fmt(res['score']))} — {esc(res['rationale'][:300])}")
            + "</li>" for ax, res in r["judge"].items())
        return (f'<section><h3>{esc(r["id"])} · {esc(r["split"])} · overall {esc(_fmt(r["overall"]))} '
                f'(PF {esc(_fmt(r["pf"]))} [{esc(r["pf_source"])}], SC {esc(_fmt(r["sc"]))} '
                f'[{esc(r["sc_source"])}])</h3><p>{esc(r["prompt"])}</p>'
                + (f'<p class="warn">{esc(r["missing"])}</p>' if r.get("missing") else "")
                + f'<div class="row">{figs}</div><ul>{judge}</ul></section>')

    body = "".join(card(r) for r in scored[:n])
    body_u = "".join(card(r) for r in unscored[:n])
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Worst cases: "
        f"{esc(summary['name'])}</title><style>body{{font-family:sans-serif;margin:1.5em}}"
        "figure{display:inline-block;margin:0 .5em .5em 0}figcaption{font-size:.8em;text-align:center}"
        "section{border-top:1px solid #ccc;padding:.5em 0}.warn{color:#b00}code{font-size:.8em}</style>"
        f"</head><body><h1>Worst cases: {esc(summary['name'])}</h1>"
        f"<p>Overall {esc(_fmt(summary['overall']))}; scored by {esc(summary['labels']['mode'])}. "
        f"The red box is where the ground truth has the subject.</p>"
        f"<h2>Lowest scores</h2>{body or '<p>none</p>'}"
        f"<h2>Unscored ({len(unscored)})</h2>{body_u or '<p>none</p>'}</body></html>")


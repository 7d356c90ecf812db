"""Score a model's outputs on a bench: per-case JSON, summary tables, worst cases.

Per case the paper's two figures (OSBench): PF, prompt following (generation: prompt
adherence; manipulation: manipulation fidelity) and SC, consistency (generation:
identity fidelity; manipulation: background consistency), both 0-10, and the case
score sqrt(PF * SC). A split averages its scored cases; the overall score averages
the four splits (generation/manipulation x simple/complex).

PF and SC come from the VLM judge when one is configured. Without one they come from
the classical metrics mapped to 0-10, and every output says so. Classical metrics
always run and the judge is always asked; a judge reply that cannot be read leaves
the field unscored (with the raw reply), never filled in.
"""
from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from opensubject_tasks.bench import metrics as M
from opensubject_tasks.bench.build import AXES, SCENES, SPLITS, TASKS, Case, load_cases, read_image
from opensubject_tasks.bench.judge import Judge, JudgeItem, load_rubric
from opensubject_tasks.bench.predictions import find_predictions, prediction_for
from opensubject_tasks.bench.render import markdown, worst_html, write_csv
from opensubject_tasks.config import Settings
from opensubject_tasks.context import Context
from opensubject_tasks.errors import BadInput

PROTOCOLS = ("opensubject", "osbench")
# Which judge axes each task asks, and which of them are PF and SC.
JUDGE_AXES = {"generation": ("prompt_adherence", "identity"),
              "manipulation": ("manipulation", "background")}
PF_SC = {"generation": ("prompt_adherence", "identity"),
         "manipulation": ("manipulation", "background")}
CHUNK = 16            # cases held in memory at once
CALIBRATION_PAIRS = 64
REGION_CONTEXT = 0.5  # "fits the scene": the box grown by half its size on every side


@dataclass
class ScoringContext:
    """What scoring needs from a Context: settings and the configured backends (it
    touches no database and no store). A full ``Context`` works as well."""
    settings: Settings
    backend = Context.backend


@dataclass
class Calibration:
    """Similarities this embedder gives unrelated content on this bench (medians over
    pairs of cases from different videos, or different subjects when the bench holds
    one video): the 0 points of the 0-10 maps."""
    identity: float = 0.0   # reference vs another case's subject box
    region: float = 0.0     # grown box vs another case's grown box
    image: float = 0.0      # target vs another case's target
    pairs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"identity": round(self.identity, 4), "region": round(self.region, 4),
                "image": round(self.image, 4), "pairs": self.pairs,
                "note": "" if self.pairs else "a single subject: chance level taken as 0"}


def _load(bench: Path, case: Case) -> dict[str, np.ndarray]:
    imgs = {k: read_image(bench / v, mask=k.endswith("mask")) for k, v in case.images.items()}
    w, h = case.size
    imgs["input"] = M.resize_to(imgs["input"], w, h)
    if "input_mask" in imgs and imgs["input_mask"].shape != (h, w):
        imgs["input_mask"] = np.asarray(Image.fromarray(imgs["input_mask"]).resize((w, h))) > 0
    return imgs


def calibrate(embedder: Any, bench: Path, cases: list[Case]) -> Calibration:
    by_sample: dict[str, Case] = {}
    for c in cases:
        by_sample.setdefault(c.sample_id, c)
    uniq = sorted(by_sample.values(), key=lambda c: c.sample_id)

    def unrelated_pairs(key: str) -> list[tuple[Case, Case]]:
        found = []
        for k in range(1, len(uniq)):  # i with i+1, then i with i+2, ... (deterministic)
            for i, a in enumerate(uniq):
                b = uniq[(i + k) % len(uniq)]
                if getattr(a, key) != getattr(b, key):
                    found.append((a, b))
                    if len(found) == CALIBRATION_PAIRS:
                        return found
        return found

    # unrelated = other videos; a bench of one video falls back to its other subjects
    pairs = unrelated_pairs("video_id") or unrelated_pairs("subject_id")
    if not pairs:
        return Calibration()
    cache: dict[str, dict[str, np.ndarray]] = {}

    def get(c: Case) -> dict[str, np.ndarray]:
        if c.sample_id not in cache:
            cache[c.sample_id] = _load(bench, c)
        return cache[c.sample_id]

    ident, region, image = [], [], []
    for a, b in pairs:
        ia, ib = get(a), get(b)
        ident.append(M.image_similarity(embedder, ia["reference"], M.crop(ib["target"], b.box)))
        ga = M.expand_box(a.box, REGION_CONTEXT, *a.size)
        gb = M.expand_box(b.box, REGION_CONTEXT, *b.size)
        region.append(M.image_similarity(embedder, M.crop(ia["target"], ga), M.crop(ib["target"], gb)))
        image.append(M.image_similarity(embedder, ia["target"], ib["target"]))
    return Calibration(statistics.median(ident), statistics.median(region),
                       statistics.median(image), len(pairs))


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(float(v), nd)


def classical_metrics(embedder: Any, case: Case, imgs: dict[str, np.ndarray], out: np.ndarray,
                      cal: Calibration, bench: Path | None = None) -> dict[str, Any]:
    """Every classical measure of one case, raw and mapped to 0-10. A multi-subject case's
    identity is the mean over its subjects, each at its own box."""
    if case.members and bench is not None:
        found = [M.identity_similarity(embedder, out, read_image(bench / m["reference"]), m["box"])
                 for m in case.members]
        sim, where = float(np.mean([f[0] for f in found])), [f[1] for f in found]
    else:
        sim, where = M.identity_similarity(embedder, out, imgs["reference"], case.box)
    m: dict[str, Any] = {"identity_sim": _r(sim), "identity_box": where,
                         "identity10": _r(M.similarity_score10(sim, cal.identity))}
    clip = M.text_image_score(embedder, [out], [case.prompt])
    m["prompt_clip"] = _r(clip[0]) if clip else None
    m["prompt_clip10"] = _r(10 * clip[0]) if clip else None
    if case.task == "generation":
        gt = M.image_similarity(embedder, out, imgs["target"])
        m["gt_sim"], m["gt10"] = _r(gt), _r(M.similarity_score10(gt, cal.image))
    else:
        fit = M.region_fit_similarity(embedder, out, imgs["target"], case.box, REGION_CONTEXT)
        m["fit_sim"], m["fit10"] = _r(fit), _r(M.similarity_score10(fit, cal.region))
        # holds the reference subject AND fits the scene: either one failing fails the edit
        m["manipulation10"] = _r(M.overall(m["identity10"], m["fit10"]))
        bg = M.background_consistency(out, imgs["input"], imgs["input_mask"])
        m["psnr"], m["ssim"] = _r(bg["psnr"], 3), _r(bg["ssim"])
        m["background10"] = _r(bg["score10"])
    return m


def classical_axes(case: Case, m: dict[str, Any]) -> dict[str, tuple[float | None, str]]:
    """The four axes on 0-10 from classical metrics, each with the measure behind it."""
    prompt = (m["prompt_clip10"], "clip-text") if m.get("prompt_clip10") is not None else \
        ((m["gt10"], "gt-similarity") if case.task == "generation" else (None, "n/a"))
    axes = {"identity": (m["identity10"], "embedding"), "prompt_adherence": prompt}
    if case.task == "manipulation":
        axes["manipulation"] = (m["manipulation10"], "embedding")
        axes["background"] = (m["background10"], "psnr+ssim")
    return axes


def _judge_items(case: Case, imgs: dict[str, np.ndarray], out: np.ndarray) -> JudgeItem:
    box = "[" + ", ".join(str(int(round(v))) for v in case.box) + "]"
    return JudgeItem(images={"output": out, "reference": imgs["reference"], "input": imgs["input"]},
                     fields={"prompt": case.prompt, "category": case.category, "box": box})


def score_bench(ctx: Context | ScoringContext, bench_dir: str | Path, predictions_dir: str | Path,
                out_dir: str | Path, *, name: str | None = None, scorer: str = "auto",
                judge_attempts: int | None = None, worst: int = 20, protocol: str = "opensubject",
                missing: str | None = None, rubric: str | Path | None = None) -> dict[str, Any]:
    """Score ``predictions_dir`` (one ``<case id>.png`` per case, or OSBench's
    ``fullset/<task_type>/<key>.png``) against the bench.

    ``protocol``: "opensubject" (this project's four axes, below) or "osbench" (the
    released OSBench scorer's images, order, prompts and JSON replies: bench/osbench.py).
    ``scorer``: "judge" (PF/SC from the VLM judge), "classical" (from classical metrics
    mapped to 0-10) or "auto" (judge when a VLM other than "none" is configured).
    ``missing``: a missing prediction scores 0 ("zero", this protocol's default) or is
    left out ("skip", the osbench protocol's default, as the released scorer does).
    ``judge_attempts``: tries per judge question (default 3; osbench: 10, as released).
    Writes cases/<id>.json, summary.json, summary.csv, summary.md and worst.html.
    """
    bench, preds, out = Path(bench_dir), Path(predictions_dir), Path(out_dir)
    if not preds.is_dir():
        raise BadInput(f"predictions folder not found: {preds}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "osbench":
        from opensubject_tasks.bench.osbench import score_osbench

        return score_osbench(ctx.backend("vlm"), bench, find_predictions(preds), out, name=name or preds.name,
                             missing=missing or "skip", rubric_file=rubric,
                             **({"judge_attempts": judge_attempts} if judge_attempts else {}))
    judge_attempts = judge_attempts or 3
    if scorer not in ("auto", "judge", "classical"):
        raise ValueError(f"scorer must be auto, judge or classical, got {scorer!r}")
    if (missing or "zero") not in ("zero", "skip"):
        raise ValueError(f"missing must be zero or skip, got {missing!r}")
    skip_missing = missing == "skip"
    cases = load_cases(bench)
    if any(c.box is None for c in cases):
        raise BadInput(f"{bench} has cases without a subject box (an imported OSBench): "
                       "score it with --protocol osbench")
    vlm_name = ctx.settings.backends.vlm
    use_judge = scorer == "judge" or (scorer == "auto" and vlm_name != "none")
    embedder = ctx.backend("embedder")
    judge = Judge(ctx.backend("vlm"), load_rubric(Path(rubric)) if rubric else None, max_attempts=judge_attempts)
    cal = calibrate(embedder, bench, cases)
    found = find_predictions(preds)
    shutil.rmtree(out / "cases", ignore_errors=True)  # no stale case files from an earlier run
    (out / "cases").mkdir(parents=True)

    records: list[dict[str, Any]] = []
    for start in range(0, len(cases), CHUNK):
        chunk = cases[start:start + CHUNK]
        loaded: list[tuple[Case, dict[str, np.ndarray], np.ndarray | None, dict[str, Any]]] = []
        for case in chunk:
            rec: dict[str, Any] = {"id": case.id, "task": case.task, "scene": case.scene,
                                   "split": case.split, "prompt": case.prompt, "box": case.box,
                                   "category": case.category, "size": case.size,
                                   "images": case.images}
            imgs = _load(bench, case)
            path = prediction_for(case, found)
            output = None
            if path is None:
                rec["missing"] = "no prediction file"
            else:
                rec["prediction"] = str(path)
                try:
                    raw = read_image(path)
                    output = M.resize_to(raw, *case.size)
                    rec["resized_from"] = None if raw.shape == output.shape else [raw.shape[1], raw.shape[0]]
                except (OSError, ValueError) as exc:
                    rec["missing"] = f"unreadable prediction: {exc}"
            loaded.append((case, imgs, output, rec))
        # The judge goes axis by axis over the chunk so a VLM backend can batch.
        judged: dict[tuple[int, str], Any] = {}
        for task in TASKS:
            idx = [i for i, (c, _, o, _) in enumerate(loaded) if c.task == task and o is not None]
            if not idx:
                continue
            items = [_judge_items(loaded[i][0], loaded[i][1], loaded[i][2]) for i in idx]
            for axis in JUDGE_AXES[task]:
                for i, res in zip(idx, judge.score(axis, items), strict=True):
                    judged[(i, axis)] = res
        for i, (case, imgs, output, rec) in enumerate(loaded):
            records.append(_finish(case, imgs, output, rec, embedder, cal, judged, i, use_judge, bench,
                                   skip_missing))
            (out / "cases" / f"{case.id}.json").write_text(json.dumps(records[-1], indent=1))

    summary = summarize(records)
    summary.update({
        "name": name or preds.name, "bench": str(bench.resolve()),
        "predictions": str(preds.resolve()),
        "scorer": "judge" if use_judge else "classical",
        "protocol": "opensubject", "missing_policy": "skip" if skip_missing else "zero",
        "judge": {"backend": judge.name, "rubric_version": judge.rubric.version,
                  "max_attempts": judge_attempts},
        "embedder": getattr(embedder, "name", type(embedder).__name__),
        "calibration": cal.to_dict(),
        "labels": labels(use_judge, records),
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_csv(out / "summary.csv", summary)
    (out / "summary.md").write_text(markdown(summary))
    (out / "worst.html").write_text(worst_html(bench, records, summary, worst))
    return summary


def _finish(case: Case, imgs: dict[str, np.ndarray], output: np.ndarray | None, rec: dict[str, Any],
            embedder: Any, cal: Calibration, judged: dict[tuple[int, str], Any], i: int,
            use_judge: bool, bench: Path | None = None, skip_missing: bool = False) -> dict[str, Any]:
    pf_axis, sc_axis = PF_SC[case.task]
    if output is None:
        # No output is a failed case: 0, counted apart as "missing" (not a judge score);
        # or, asked to skip it (as the released OSBench scorer does), left out of the means.
        zero = None if skip_missing else 0.0
        rec.update(status="missing", pf=zero, sc=zero, overall=zero, pf_source="missing",
                   sc_source="missing", classical={}, judge={}, axes={})
        return rec
    m = classical_metrics(embedder, case, imgs, output, cal, bench)
    jd = {axis: judged[(i, axis)].to_dict() for axis in JUDGE_AXES[case.task]}
    axes_c = classical_axes(case, m)
    axes: dict[str, dict[str, Any]] = {}
    for axis in AXES:
        entry: dict[str, Any] = {}
        if axis in axes_c and axes_c[axis][0] is not None:
            entry["classical"], entry["classical_source"] = axes_c[axis][0], axes_c[axis][1]
        if axis in jd:
            entry["judge"] = jd[axis]["score"]
        if entry:
            axes[axis] = entry
    if use_judge:
        pf, sc = jd[pf_axis]["score"], jd[sc_axis]["score"]
        pf_src = sc_src = "judge"
    else:
        pf, pf_src = axes_c.get(pf_axis, (None, "n/a"))
        sc, sc_src = axes_c.get(sc_axis, (None, "n/a"))
        pf_src, sc_src = f"classical:{pf_src}", f"classical:{sc_src}"
    score = M.overall(pf, sc)
    rec.update(status="scored" if score is not None else "unscored", pf=_r(pf), sc=_r(sc),
               overall=_r(score), pf_source=pf_src, sc_source=sc_src, classical=m, judge=jd, axes=axes)
    return rec


# --- aggregation ------------------------------------------------------------------------
def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 4) if vals else None


def _group_stats(recs: list[dict[str, Any]]) -> dict[str, Any]:
    counted = [r for r in recs if r["overall"] is not None]  # scored, and missing as 0 (unless skipped)
    axes = {}
    for axis in AXES:
        axes[axis] = {kind: _mean(r["axes"].get(axis, {}).get(kind) for r in recs)
                      for kind in ("classical", "judge")}
    return {
        "cases": len(recs), "scored": sum(r["status"] == "scored" for r in recs),
        "unscored": sum(r["status"] == "unscored" for r in recs),
        "missing": sum(r["status"] == "missing" for r in recs),
        "pf": _mean(r["pf"] for r in counted), "sc": _mean(r["sc"] for r in counted),
        "overall": _mean(r["overall"] for r in counted),
        "axes": axes,
        "psnr": _mean(r["classical"].get("psnr") for r in recs),
        "ssim": _mean(r["classical"].get("ssim") for r in recs),
        "judge_unscored": {ax: sum(1 for r in recs if ax in r["judge"] and r["judge"][ax]["score"] is None)
                           for ax in AXES if any(ax in r["judge"] for r in recs)},
    }


def _combine(splits: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """A task or scene row: counts added, scores averaged over its splits (as the headline)."""
    parts = [splits[n] for n in names]
    row = {k: sum(p[k] for p in parts) for k in ("cases", "scored", "unscored", "missing")}
    for k in ("pf", "sc", "overall", "psnr", "ssim"):
        row[k] = _mean(p[k] for p in parts)
    row["axes"] = {ax: {kind: _mean(p["axes"][ax][kind] for p in parts) for kind in ("classical", "judge")}
                   for ax in AXES}
    row["splits"] = [n for n in names if splits[n]["overall"] is not None]
    return row


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    splits = {sp: _group_stats([r for r in records if r["split"] == sp]) for sp in SPLITS}
    present = [sp for sp in SPLITS if splits[sp]["overall"] is not None]
    judge_unscored: dict[str, int] = {}
    for r in records:
        for ax, res in r["judge"].items():
            judge_unscored[ax] = judge_unscored.get(ax, 0) + (res["score"] is None)
    return {
        "overall": _mean(splits[sp]["overall"] for sp in present),
        "overall_splits": present,
        "pf": _mean(splits[sp]["pf"] for sp in present),
        "sc": _mean(splits[sp]["sc"] for sp in present),
        "splits": splits,
        "tasks": {t: _combine(splits, [f"{t}/{s}" for s in SCENES]) for t in TASKS},
        "scenes": {s: _combine(splits, [f"{t}/{s}" for t in TASKS]) for s in SCENES},
        "counts": {"cases": len(records),
                   "scored": sum(r["status"] == "scored" for r in records),
                   "unscored": sum(r["status"] == "unscored" for r in records),
                   "missing": sum(r["status"] == "missing" for r in records),
                   "judge_unscored": judge_unscored,
                   "judge_asked": {ax: sum(ax in r["judge"] for r in records) for ax in judge_unscored}},
    }


def labels(use_judge: bool, records: list[dict[str, Any]]) -> dict[str, str]:
    if use_judge:
        return {"pf": "VLM judge: prompt adherence (generation), manipulation fidelity (manipulation)",
                "sc": "VLM judge: identity fidelity (generation), background consistency (manipulation)",
                "mode": "judge"}
    gen_pf = sorted({r["pf_source"] for r in records if r["task"] == "generation" and r["status"] != "missing"})
    return {"pf": "classical metrics mapped to 0-10 (no VLM judge): generation "
                  f"{'/'.join(gen_pf) or 'n/a'}, manipulation sqrt(embedding identity x region fit)",
            "sc": "classical metrics mapped to 0-10 (no VLM judge): generation embedding identity "
                  "at the target box, manipulation masked PSNR+SSIM outside the region",
            "mode": "classical (not comparable with judge-scored numbers)"}

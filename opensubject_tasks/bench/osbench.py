"""The released OSBench benchmark: import it, and score the way its released scorer does.

Import (``opensubject bench import-osbench PATH --out DIR``): the benchmark as released
is a Hugging Face dataset saved with ``datasets`` (``key``, ``task_type``,
``instruction``, ``instruction_language``, ``input_images``, ``output_image``). Cases in
another language than ``language`` (English, as the released statistics report) are
left out and counted. A task type containing "manipulation" is a manipulation case, one
containing "single" a single-subject case (the released scorer's own rule).

Scoring (``bench score --protocol osbench``), as the released scorer does it:

* the released prompts verbatim (osbench_rubrics.yaml), sent as one user message with the
  text before the images, no system line, a 1400-token reply cap; an unreadable reply
  is asked again with the same prompt, up to 10 tries;
* inputs larger than 1024x1024 pixels are scaled down to that area, every input to a
  multiple of 16 per side; the output is resized to the first input's size; then every
  image is turned upright by its EXIF orientation; every image goes to the judge as a
  JPEG (PIL's quality 75);
* prompt following (PF): generation sees the inputs, the ground truth and the output;
  manipulation sees the ground truth and the output. Consistency (SC): ground truth
  and output for both;
* the judge replies with a JSON object ``{"score": 0-10, "reasoning": ...}``; a case
  scores sqrt(PF * SC); a task type averages its cases; the overall figure averages
  the task types.

Deliberate differences: a reply that still cannot be read stays *unscored* (kept,
counted, left out of the means) where the released scorer substitutes a random number;
docs/benchmark.md lists every difference and tests/test_osbench.py checks that list.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from opensubject_tasks.bench.build import HELD_OUT_FILE, Case, load_cases
from opensubject_tasks.bench.judge import Judge, JudgeItem, Parsed, load_rubric
from opensubject_tasks.errors import BadInput
from opensubject_tasks.storage import slug

RUBRIC_FILE = Path(__file__).with_name("osbench_rubrics.yaml")
MAX_INPUT_PIXELS = 1024 * 1024
JPEG_QUALITY = 75   # PIL's default, which the released scorer's encoder uses
AXES = {"generation": ("pf_generation", "sc_generation"), "manipulation": ("pf_manipulation", "sc_manipulation")}
MISSING = ("skip", "zero")
CHUNK = 16
MAX_TRIES = 10      # the released scorer's tries per case


# --- import ---------------------------------------------------------------------------
def task_of(task_type: str) -> tuple[str, str]:
    """(task, scene) of an OSBench task type, by the released scorer's substring rule."""
    return ("manipulation" if "manipulation" in task_type else "generation",
            "simple" if "single" in task_type else "complex")


def _rgb(value: Any, what: str) -> Image.Image:
    """Upright RGB: its EXIF orientation applied (as ``datasets`` does when it decodes the
    released rows, so the released scorer sees them upright too)."""
    if isinstance(value, Image.Image):
        im = value
    elif isinstance(value, dict) and value.get("bytes"):
        im = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, (str, os.PathLike)) and Path(value).is_file():
        im = Image.open(value)
    else:
        raise BadInput(f"{what} is not an image ({type(value).__name__})")
    return ImageOps.exif_transpose(im).convert("RGB")


def import_osbench(src: str | Path, out_dir: str | Path, *, language: str = "en") -> dict[str, Any]:
    """Write a bench directory from a released OSBench dataset folder."""
    try:
        import datasets
    except ImportError as exc:  # a runtime dependency; say what is missing
        raise BadInput("reading OSBench needs the `datasets` package (pip install datasets)") from exc
    src, out = Path(src), Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "bench.json").exists():
        raise BadInput(f"{out} exists and is not a bench directory; refusing to overwrite it")
    try:
        data = datasets.load_from_disk(str(src))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise BadInput(f"{src} is not a dataset saved with `datasets` ({exc})") from None
    splits = list(data.values()) if isinstance(data, datasets.DatasetDict) else [data]
    need = {"key", "task_type", "instruction", "instruction_language", "input_images", "output_image"}
    for split in splits:
        missing = need - set(split.column_names)
        if missing:
            raise BadInput(f"{src} is not OSBench: no column(s) {', '.join(sorted(missing))}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    cases: list[Case] = []
    languages: Counter[str] = Counter()
    for split in splits:
        for row in split:
            languages[row["instruction_language"]] += 1
            if row["instruction_language"] != language:
                continue
            task, scene = task_of(row["task_type"])
            cid = slug(f"{row['task_type']}-{row['key']}", 200)
            folder = Path("images") / slug(row["task_type"], 80) / slug(str(row["key"]), 120)
            (tmp / folder).mkdir(parents=True, exist_ok=True)
            inputs = []
            for i, im in enumerate(row["input_images"] or []):
                _rgb(im, f"case {cid} input {i + 1}").save(tmp / folder / f"input_{i + 1}.png")
                inputs.append(str(folder / f"input_{i + 1}.png"))
            if not inputs:
                raise BadInput(f"case {cid} has no input image")
            target = _rgb(row["output_image"], f"case {cid} output image")
            target.save(tmp / folder / "target.png")
            images = {"input": inputs[0], "reference": inputs[-1], "target": str(folder / "target.png")}
            cases.append(Case(id=cid, task=task, scene=scene, split=f"{task}/{scene}",
                              prompt=row["instruction"], category="", box=None, size=list(target.size),
                              images=images, sample_id=str(row["key"]), video_id="", clip_id="",
                              subject_id="", n_subjects=len(inputs) if task == "generation" else 0,
                              input_images=inputs, task_type=row["task_type"], key=str(row["key"]),
                              instruction_language=row["instruction_language"], box_source="osbench"))
    if not cases:
        raise BadInput(f"{src} holds no case in language {language!r} (languages: {dict(languages)})")
    counts = Counter(c.split for c in cases)
    info = {"source": "osbench", "dataset": str(src.resolve()), "language": language,
            "cases": len(cases), "splits": dict(sorted(counts.items())),
            "task_types": dict(sorted(Counter(c.task_type for c in cases).items())),
            "skipped_other_languages": {k: v for k, v in sorted(languages.items()) if k != language},
            "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with open(tmp / "cases.jsonl", "w") as f:
        for c in cases:
            f.write(json.dumps(c.to_dict(), sort_keys=True) + "\n")
    (tmp / "bench.json").write_text(json.dumps(info, indent=1))
    (tmp / HELD_OUT_FILE).write_text(json.dumps({"source": "osbench", "videos": []}))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return info


# --- the judge's view -------------------------------------------------------------------
def scorer_size(size: tuple[int, int]) -> tuple[int, int]:
    """An input's size as the released scorer resizes it: down to 1024x1024 pixels of
    area if larger, then each side down to a multiple of 16."""
    w, h = size
    if w * h > MAX_INPUT_PIXELS:
        r = math.sqrt(MAX_INPUT_PIXELS / (w * h))
        w, h = int(w * r), int(h * r)
    return w // 16 * 16, h // 16 * 16


def _as_sent(im: Image.Image) -> np.ndarray:
    """What the judge sees of an image: its JPEG encoding (quality 75), decoded."""
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _upright(im: Image.Image) -> Image.Image:
    # what the released scorer's load_image does to every image it sends, last
    return ImageOps.exif_transpose(im).convert("RGB")


def judge_images(bench: Path, case: Case, output: Path) -> dict[str, Any]:
    """The images as the released scorer sends them, in its order of steps: inputs
    resized, the output converted and resized to the first input's size, and only then
    each one turned upright by its EXIF orientation (so an output carrying an orientation
    tag is resized before it is turned, as there)."""
    inputs = []
    for rel in case.input_images:
        with Image.open(bench / rel) as im:
            inputs.append(im.resize(scorer_size(im.size)))
    with Image.open(bench / case.images["target"]) as gt, Image.open(output) as out:
        return {"inputs": [_as_sent(_upright(im)) for im in inputs], "ground_truth": _as_sent(_upright(gt)),
                "output": _as_sent(_upright(out.convert("RGB").resize(inputs[0].size)))}


# --- the reply ------------------------------------------------------------------------
_INTEGER = re.compile(r"\s*(\d+)\s*")


def parse_json_reply(text: str | None) -> Parsed:
    """A ``{"score": 0-10, "reasoning": "..."}`` object (text around it is ignored, as by
    the released parser), or a reply that is a bare integer from 0 to 10. Anything else,
    or a score outside 0-10, is unreadable: no score is made up."""
    raw = (text or "").strip()
    if not raw:
        return Parsed(None, "", "empty reply")
    bare = _INTEGER.fullmatch(raw)
    if bare:
        value = int(bare.group(1))
        return Parsed(float(value), "", None) if 0 <= value <= 10 else \
            Parsed(None, "", f"score {value} outside 0..10")
    start, end = raw.find("{"), raw.rfind("}")
    if start < 0 or end <= start:
        return Parsed(None, raw[:1000], "no JSON object in reply")
    try:
        obj = json.loads(raw[start:end + 1].replace("\n", " "))
    except json.JSONDecodeError as exc:
        return Parsed(None, raw[:1000], f"reply is not valid JSON ({exc.msg})")
    if not isinstance(obj, dict) or "score" not in obj:
        return Parsed(None, raw[:1000], "JSON reply has no score")
    value, reasoning = obj["score"], str(obj.get("reasoning") or "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return Parsed(None, reasoning, f"score is not a number: {value!r}")
    if not 0 <= value <= 10:
        return Parsed(None, reasoning, f"score {value:g} outside 0..10")
    return Parsed(float(value), reasoning, None)


# --- scoring ---------------------------------------------------------------------------
def score_osbench(vlm: Any, bench_dir: str | Path, predictions: dict[str, Path], out_dir: str | Path, *,
                  name: str, missing: str = "skip", judge_attempts: int = MAX_TRIES,
                  rubric_file: str | Path | None = None) -> dict[str, Any]:
    """Score predictions of a bench under the released scorer's protocol; writes
    cases/<id>.json and summary.json/.md (and returns the summary)."""
    from opensubject_tasks.bench.predictions import prediction_for

    if missing not in MISSING:
        raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
    bench, out = Path(bench_dir), Path(out_dir)
    cases = load_cases(bench)
    judge = Judge(vlm, load_rubric(Path(rubric_file) if rubric_file else RUBRIC_FILE),
                  max_attempts=judge_attempts, parse=parse_json_reply)
    shutil.rmtree(out / "cases", ignore_errors=True)
    (out / "cases").mkdir(parents=True)
    records: list[dict[str, Any]] = []
    for start in range(0, len(cases), CHUNK):   # a chunk's images in memory; the judge batches them
        chunk = cases[start:start + CHUNK]
        recs, items = [], []
        for case in chunk:
            rec: dict[str, Any] = {"id": case.id, "key": case.key, "task_type": case.task_type,
                                   "task": case.task, "split": case.split, "instruction": case.prompt,
                                   "instruction_language": case.instruction_language}
            path = prediction_for(case, predictions)
            item = None
            if path is None:
                rec["missing"] = "no prediction file"
            else:
                rec["prediction"] = str(path)
                try:
                    item = JudgeItem(images=judge_images(bench, case, path), fields={"instruction": case.prompt})
                except (OSError, ValueError) as exc:
                    rec["missing"] = f"unreadable prediction: {exc}"
            recs.append(rec)
            items.append(item)
        judged: dict[tuple[int, str], Any] = {}
        for task, axes in AXES.items():
            idx = [i for i, (c, it) in enumerate(zip(chunk, items, strict=True)) if c.task == task and it]
            for axis in axes if idx else ():
                for i, res in zip(idx, judge.score(axis, [items[i] for i in idx]), strict=True):
                    judged[(i, axis)] = res
        for i, (case, rec) in enumerate(zip(chunk, recs, strict=True)):
            if items[i] is None:
                zero = missing == "zero"
                rec.update(status="missing", pf=0.0 if zero else None, sc=0.0 if zero else None,
                           overall=0.0 if zero else None, judge={})
            else:
                pf, sc = (judged[(i, axis)] for axis in AXES[case.task])
                score = math.sqrt(pf.score * sc.score) if pf.scored and sc.scored else None
                rec.update(status="scored" if score is not None else "unscored", pf=pf.score, sc=sc.score,
                           overall=None if score is None else round(score, 6),
                           judge={"prompt_following": pf.to_dict(), "consistency": sc.to_dict()})
            records.append(rec)
            (out / "cases" / f"{case.id}.json").write_text(json.dumps(rec, indent=1))
    summary = summarize_osbench(records)
    summary.update({"name": name, "protocol": "osbench", "bench": str(bench.resolve()), "missing_policy": missing,
                    "judge": {"backend": judge.name, "rubric_version": judge.rubric.version,
                              "max_attempts": judge_attempts}})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown_osbench(summary))
    return summary


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def summarize_osbench(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task type: mean PF, SC and sqrt(PF*SC) over its counted cases (scored, and
    missing ones when they count as 0); overall: the mean over task types."""
    per: dict[str, dict[str, Any]] = {}
    for tt in sorted({r["task_type"] for r in records}):
        recs = [r for r in records if r["task_type"] == tt]
        counted = [r for r in recs if r["overall"] is not None]
        per[tt] = {"cases": len(recs), "scored": sum(r["status"] == "scored" for r in recs),
                   "unscored": sum(r["status"] == "unscored" for r in recs),
                   "missing": sum(r["status"] == "missing" for r in recs),
                   "pf": _mean([r["pf"] for r in counted]), "sc": _mean([r["sc"] for r in counted]),
                   "overall": _mean([r["overall"] for r in counted])}
    present = [v for v in per.values() if v["overall"] is not None]
    return {"task_types": per,
            "pf": _mean([v["pf"] for v in present]), "sc": _mean([v["sc"] for v in present]),
            "overall": _mean([v["overall"] for v in present]),
            "counts": {k: sum(v[k] for v in per.values()) for k in ("cases", "scored", "unscored", "missing")}}


def markdown_osbench(summary: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

    c = summary["counts"]
    lines = [f"# OSBench protocol scores: {summary['name']}", "",
             f"Overall (mean of task types): **{f(summary['overall'])}** · PF {f(summary['pf'])} · "
             f"SC {f(summary['sc'])}", "",
             f"* Judge: {summary['judge']['backend']} (rubric {summary['judge']['rubric_version']})",
             f"* Cases: {c['cases']}, scored {c['scored']}, unscored {c['unscored']} (left out of the means), "
             f"missing predictions {c['missing']} ({'left out' if summary['missing_policy'] == 'skip' else 'scored 0'})",
             "", "| task type | cases | scored | unscored | missing | PF | SC | overall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for tt, v in summary["task_types"].items():
        lines.append(f"| {tt} | {v['cases']} | {v['scored']} | {v['unscored']} | {v['missing']} | "
                     f"{f(v['pf'])} | {f(v['sc'])} | {f(v['overall'])} |")
    return "\n".join(lines) + "\n"


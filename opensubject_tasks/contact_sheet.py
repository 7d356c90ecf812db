"""A contact sheet of synthesized samples: one row per sample with its reference,
mask, generation input, manipulation input and target, labelled, as one PNG."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import select

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.lineage import lineage
from opensubject_tasks.db.models import Sample, Subject

COLUMNS = (("reference", "reference"), ("mask", "mask"), ("generation_input", "generation input"),
           ("manipulation_input", "manipulation input"), ("target", "target"))
CELL = 200       # cell side in pixels
LABEL_H = 18     # height of a label strip
BACKGROUND = (245, 245, 245)


def _fit(image: np.ndarray, side: int = CELL) -> np.ndarray:
    """The image scaled to fit a side x side cell, centred on the sheet's background."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    h, w = image.shape[:2]
    scale = side / max(h, w)
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    cell = np.full((side, side, 3), BACKGROUND, np.uint8)
    y, x = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    cell[y:y + small.shape[0], x:x + small.shape[1]] = small
    return cell


def _label(width: int, text: str, bold: bool = False) -> np.ndarray:
    strip = np.full((LABEL_H, width, 3), BACKGROUND, np.uint8)
    cv2.putText(strip, text, (4, LABEL_H - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (20, 20, 20),
                2 if bold else 1, cv2.LINE_AA)
    return strip


def _load(ctx: Context, key: str | None) -> np.ndarray:
    if key:
        try:
            img = cv2.imdecode(np.frombuffer(ctx.store.get_bytes(key), np.uint8), cv2.IMREAD_COLOR)
            if img is not None:
                return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        except FileNotFoundError:
            pass
    missing = np.full((CELL, CELL, 3), 200, np.uint8)
    cv2.putText(missing, "missing", (60, CELL // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (90, 90, 90), 1)
    return missing


def write_contact_sheet(ctx: Context, out_png: Path, limit: int = 8) -> Path:
    """Write a PNG grid of up to ``limit`` synthesized or verified samples (verified
    first, then by id) and return its path. With no such sample the sheet says so."""
    out_png = Path(out_png)
    with session_scope(ctx.sessions) as s:
        rows = s.execute(
            lineage(select(Sample.id, Sample.state, Sample.attempt, Sample.keys, Subject.category), Sample, Subject)
            .where(Sample.state.in_(("synthesized", "verified")))
            .order_by((Sample.state != "verified"), Sample.id).limit(max(0, limit))).all()
    width = CELL * len(COLUMNS)
    parts = [np.concatenate([_label(CELL, title, bold=True) for _, title in COLUMNS], axis=1)]
    for sample_id, state, attempt, keys, category in rows:
        keys = keys or {}
        cells = [_fit(_load(ctx, keys.get(name))) for name, _ in COLUMNS]
        parts.append(_label(width, f"{sample_id}  |  {category}  |  {state}, attempt {attempt}"))
        parts.append(np.concatenate(cells, axis=1))
    if not rows:
        parts.append(_label(width, "no synthesized sample yet"))
    return _write_png(parts, out_png)


def write_training_sheet(export_dir: Path, out_png: Path, kinds: tuple[str, ...] = (
        "generation_multi_subject", "manipulation")) -> Path:
    """A sheet of training records as OmniGen2 reads them from an export: for the first
    record of each JSONL named in ``kinds`` (omnigen2/jsonl/<kind>.jsonl), its input
    images, its output image and its instruction."""
    import json
    import textwrap

    export_dir = Path(export_dir)
    parts = []
    width = CELL * 4
    for kind in kinds:
        path = export_dir / "omnigen2" / "jsonl" / f"{kind}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        if not lines:
            parts.append(_label(width, f"{kind}: no record"))
            continue
        rec = json.loads(lines[0])
        images = [*rec["input_images"], rec["output_image"]]
        titles = [f"input image {i}" for i in range(1, len(rec["input_images"]) + 1)] + ["output (target)"]
        cells = []
        for p, title in zip(images, titles, strict=True):
            img = cv2.imread(str(p if Path(p).is_absolute() else export_dir / p))
            cell = _fit(cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if img is not None else
                        np.full((CELL, CELL, 3), 200, np.uint8))
            cells.append(np.concatenate([_label(CELL, title, bold=True), cell], axis=0))
        row = np.concatenate(cells, axis=1)
        pad = width - row.shape[1]
        if pad > 0:
            row = np.concatenate([row, np.full((row.shape[0], pad, 3), BACKGROUND, np.uint8)], axis=1)
        parts.append(_label(width, f"{kind} ({rec['task_type']})", bold=True))
        parts += [_label(width, line) for line in textwrap.wrap(rec["instruction"], width // 9)[:5]]
        parts.append(row[:, :width])
    return _write_png(parts, out_png)


def _write_png(parts: list[np.ndarray], out_png: Path | str) -> Path:
    """Stack the sheet's rows and write them as one PNG."""
    sheet = np.concatenate(parts, axis=0)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    out_png.write_bytes(buf.tobytes())
    return out_png

"""Where a model's predictions for a bench are: ``<case id>.png`` files at the top of a
folder, or OSBench's released layout ``fullset/<task_type>/<key>.png``."""
from __future__ import annotations

from pathlib import Path

from opensubject_tasks.bench.build import Case

PREDICTION_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def find_predictions(pred_dir: Path) -> dict[str, Path]:
    """Prediction files by name: ``<case id>.png`` at the top, and OSBench's layout
    ``fullset/<task_type>/<key>.png`` under the name ``<task_type>/<key>``."""
    found: dict[str, Path] = {}
    for p in sorted(pred_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in PREDICTION_EXTS:
            found.setdefault(p.stem, p)
    fullset = pred_dir / "fullset"
    if fullset.is_dir():
        for p in sorted(fullset.glob("*/*")):
            if p.is_file() and p.suffix.lower() in PREDICTION_EXTS:
                found.setdefault(f"{p.parent.name}/{p.stem}", p)
    return found


def prediction_for(case: Case, found: dict[str, Path]) -> Path | None:
    return found.get(case.id) or found.get(f"{case.task_type}/{case.key}")

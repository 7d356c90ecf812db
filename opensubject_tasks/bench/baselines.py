"""Reference predictions that check the scorers: their scores are known in advance.

* ``copy-input``: returns the case's input image unchanged. Manipulation: the
  background is perfect and the region stays empty (poor fidelity). Generation: the
  subject is not where the ground truth has it (poor identity there).
* ``paste-reference``: the reference subject crop pasted into the input at the target
  box. Identity fidelity is high on both tasks; the background is untouched.
* ``ground-truth``: the target itself, the upper bound the classical scores reach
  (PF and SC near 10, up to what differs between the input and the target outside
  the region).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from opensubject_tasks.bench.build import Case, load_cases, read_image
from opensubject_tasks.bench.metrics import clamp_box, resize_to


def copy_input(case: Case, bench: Path) -> np.ndarray:
    w, h = case.size
    return resize_to(read_image(bench / case.images["input"]), w, h)


def paste_reference(case: Case, bench: Path) -> np.ndarray:
    """Each subject's reference crop pasted at its box (a multi-subject case: all of them)."""
    out = copy_input(case, bench).copy()
    for ref_path, box in ([(m["reference"], m["box"]) for m in case.members]
                          or [(case.images["reference"], case.box)]):
        x0, y0, x1, y1 = clamp_box(box, out.shape[1], out.shape[0])
        out[y0:y1, x0:x1] = resize_to(read_image(bench / ref_path), x1 - x0, y1 - y0)
    return out


def ground_truth(case: Case, bench: Path) -> np.ndarray:
    return read_image(bench / case.images["target"])


BASELINES: dict[str, Callable[[Case, Path], np.ndarray]] = {
    "copy-input": copy_input,
    "paste-reference": paste_reference,
    "ground-truth": ground_truth,
}


def run_baseline(name: str, bench_dir: str | Path, out_dir: str | Path) -> int:
    """Write one ``<case id>.png`` per case into ``out_dir``; returns the number written."""
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    bench, out = Path(bench_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make = BASELINES[name]
    cases = load_cases(bench)
    for case in cases:
        Image.fromarray(make(case, bench)).save(out / f"{case.id}.png")
    return len(cases)

"""Throughput against batch size for each model backend (tiny models on the CPU by default).

    .venv/bin/python perf/bench_batch.py [--sizes 1 2 4 8 16] [--items 16]
        [--profile tiny|gpu] [--device cpu] [--write docs/models.md]

Each backend gets the same ``--items`` frames (640x360 photos shipped with
scikit-image) at each batch size: one warm-up call, then the best of ``--repeat``
timed calls. Prints a Markdown table of items per second; ``--write`` puts it into
the given document between the ``bench_batch`` markers.
"""
from __future__ import annotations

import argparse
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

from opensubject_tasks.backends.registry import clear_cache, get_backend
from opensubject_tasks.config import load_settings
from opensubject_tasks.testmedia.samples import BACKGROUNDS, photo

START, END = "<!-- bench_batch:start -->", "<!-- bench_batch:end -->"


def frames(n: int) -> list[np.ndarray]:
    return [cv2.resize(photo(BACKGROUNDS[i % len(BACKGROUNDS)]), (640, 360), interpolation=cv2.INTER_AREA)
            for i in range(n)]


def calls(images: list[np.ndarray]) -> dict[str, Callable[[Any], Any]]:
    h, w = images[0].shape[:2]
    box = [w * 0.3, h * 0.25, w * 0.7, h * 0.8]
    mask = np.zeros((h, w), bool)
    mask[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = True
    n = len(images)
    return {
        "vlm (list_categories)": lambda b: b.list_categories(images),
        "detector": lambda b: b.detect(images, ["person", "cat", "cup"]),
        "segmenter": lambda b: b.segment(images, [box] * n),
        "inpainter": lambda b: b.inpaint(images, [mask] * n, ["background"] * n, list(range(n))),
        "embedder": lambda b: b.embed(images),
        "quality": lambda b: b.score([[im] for im in images]),
    }


def measure(profile: str, device: str, sizes: list[int], items: int, repeat: int,
            config: Path | None = None) -> dict[str, dict[int, float]]:
    settings = load_settings(config, profile=profile)
    b = settings.backends
    images = frames(items)
    table: dict[str, dict[int, float]] = {}
    for label, call in calls(images).items():
        interface = label.split()[0]
        table[label] = {}
        for size in sizes:
            clear_cache()
            options = {"device": device, "dtype": b.dtype, **b.options.get(interface, {}), "batch_size": size}
            backend = get_backend(interface, getattr(b, interface), **options)
            call(backend)
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                call(backend)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            table[label][size] = items / best
            print(f"{label:<22} batch {size:>3}: {items / best:8.1f} items/s", flush=True)
    clear_cache()
    return table


def markdown(table: dict[str, dict[int, float]], sizes: list[int], note: str) -> str:
    head = "| backend | " + " | ".join(f"batch {s}" for s in sizes) + " |"
    rule = "|---|" + "---:|" * len(sizes)
    rows = [f"| {k} | " + " | ".join(f"{v[s]:.1f}" for s in sizes) + " |" for k, v in table.items()]
    return "\n".join([note, "", head, rule, *rows])


def write_into(doc: Path, text: str) -> None:
    body = doc.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{doc} has no {START} ... {END} section")
    doc.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END),
                          lambda _: f"{START}\n{text}\n{END}", body, flags=re.S))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=("tiny", "gpu"), default="tiny")
    ap.add_argument("--config", type=Path, help="YAML settings (model paths under backends.options)")
    ap.add_argument("--device", default=None, help="default: cpu for tiny, cuda for gpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--write", type=Path, help="document to put the table into")
    args = ap.parse_args()
    device = args.device or ("cpu" if args.profile == "tiny" else "cuda")
    table = measure(args.profile, device, args.sizes, args.items, args.repeat, args.config)
    note = (f"Items per second, {args.items} frames of 640x360, profile `{args.profile}` on {device} "
            f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)); "
            f"`python perf/bench_batch.py --profile {args.profile}`.")
    text = markdown(table, args.sizes, note)
    print(text)
    if args.write:
        write_into(args.write, text)


if __name__ == "__main__":
    main()

"""Smoke run of every model backend on the sample videos: throughput and peak GPU memory.

    .venv/bin/python perf/gpu_smoke.py [--config opensubject.yaml] [--frames 8]
                                             [--profile gpu|tiny] [--json OUT.json]

On a machine with CUDA it runs the `hf` backends (the `gpu` profile) with the models
named in the config (backends.options.<interface>.model, local directories or Hub ids
already in the cache); a model that is not there is reported with the command that
fetches it, and the run goes on with the others. Without CUDA it runs the `tiny`
profile on the CPU and says so: those numbers only show that the code paths work.

Per backend it prints load seconds, items per second (after one warm-up call) and
peak GPU memory (torch.cuda.max_memory_allocated), then the memory all loaded
models hold together.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import av
import numpy as np
import torch

from opensubject_tasks.backends.registry import clear_cache, get_backend
from opensubject_tasks.config import load_settings
from opensubject_tasks.errors import ModelNotAvailable
from opensubject_tasks.testmedia.samples import make_samples

INTERFACES = ("vlm", "detector", "segmenter", "inpainter", "embedder", "quality")


def sample_frames(media: Path, per_video: int) -> list[dict[str, Any]]:
    """Evenly spaced frames of each sample video with their ground-truth subjects."""
    truth = json.loads((media / "ground_truth.json").read_text())
    out = []
    for video in truth["videos"]:
        if video.get("bad"):
            continue
        wanted = {int(i) for i in np.linspace(0, video["frames"] - 1, per_video)}
        with av.open(str(media / video["file"])) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i not in wanted:
                    continue
                subjects = [(s["category"], s["boxes"][str(i)]) for s in video["subjects"]
                            if str(i) in s["boxes"]]
                out.append({"image": frame.to_ndarray(format="rgb24"), "subjects": subjects})
    return out


def box_mask(shape: tuple[int, ...], box: list[float]) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask[max(0, y0):y1, max(0, x0):x1] = True
    return mask


def workloads(frames: list[dict[str, Any]]) -> dict[str, tuple[int, Callable[[Any], Any]]]:
    """(items, call) per interface; each call is what a stage asks of that backend."""
    images = [f["image"] for f in frames]
    with_subject = [f for f in frames if f["subjects"]] or frames[:1]
    cats = sorted({c for f in frames for c, _ in f["subjects"]}) or ["object"]
    boxes = [f["subjects"][0][1] if f["subjects"] else [0, 0, 32, 32] for f in with_subject]
    subj_images = [f["image"] for f in with_subject]
    masks = [box_mask(im.shape, b) for im, b in zip(subj_images, boxes, strict=True)]
    clips = [images[i:i + 4] for i in range(0, len(images), 4)]
    return {
        "vlm": (3 * len(images), lambda b: (
            b.list_categories(images),
            b.ask_yes_no([[im] for im in images], [f"Is there a {cats[0]}?"] * len(images)),
            b.caption(images, [{}] * len(images)))),
        "detector": (len(images), lambda b: b.detect(images, cats)),
        "segmenter": (len(subj_images), lambda b: b.segment(subj_images, boxes)),
        "inpainter": (len(subj_images), lambda b: b.inpaint(
            subj_images, masks, ["the background behind it"] * len(masks), list(range(len(masks))))),
        "embedder": (len(images), lambda b: b.embed(images)),
        "quality": (len(images), lambda b: b.score(clips)),
    }


def run(profile: str, config: Path | None, per_video: int) -> list[dict[str, Any]]:
    cuda = torch.cuda.is_available()
    settings = load_settings(config, profile=profile)
    b = settings.backends
    # The gpu profile runs on the GPU unless the config names a device; tiny runs on the CPU.
    device = "cpu" if profile == "tiny" else ("cuda" if b.device == "cpu" else b.device)
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        make_samples(Path(tmp))
        frames = sample_frames(Path(tmp), per_video)
    print(f"{len(frames)} frames from the sample videos; profile {profile}, device {device}, "
          f"dtype {b.dtype}, batch size {b.batch_size}")
    rows = []
    for interface, (items, call) in workloads(frames).items():
        row: dict[str, Any] = {"backend": interface, "name": getattr(b, interface), "items": items}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            options = {"device": device, "dtype": b.dtype, "batch_size": b.batch_size,
                       **b.options.get(interface, {})}
            backend = get_backend(interface, getattr(b, interface), **options)
            row["load_s"] = time.perf_counter() - t0
            call(backend)  # warm-up: kernels, caches, allocator
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            call(backend)
            if cuda:
                torch.cuda.synchronize()
            row["seconds"] = time.perf_counter() - t0
            row["items_per_s"] = items / row["seconds"]
            row["model"] = getattr(backend, "name", "")
        except ModelNotAvailable as exc:
            row["error"] = f"model not available: {exc}"
        except Exception as exc:  # noqa: BLE001 - a smoke run reports every backend
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        if cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
    if cuda:
        rows.append({"backend": "all loaded", "name": "", "items": 0,
                     "peak_gib": torch.cuda.memory_allocated() / 2**30})
    clear_cache()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'backend':<11} {'load s':>7} {'items':>6} {'items/s':>9} {'peak GiB':>9}  model / error")
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-".rjust(int(fmt.split(".")[0]))

    for r in rows:
        tail = r.get("error") or r.get("model", "")
        print(f"{r['backend']:<11} {cell(r, 'load_s', '7.1f')} {r['items']:>6} "
              f"{cell(r, 'items_per_s', '9.2f')} {cell(r, 'peak_gib', '9.2f')}  {tail}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, help="YAML settings (model paths under backends.options)")
    ap.add_argument("--profile", choices=("gpu", "tiny"), help="default: gpu with CUDA, else tiny")
    ap.add_argument("--frames", type=int, default=8, help="frames taken from each sample video")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    profile = args.profile or ("gpu" if torch.cuda.is_available() else "tiny")
    if not torch.cuda.is_available():
        print("No CUDA device here: running the tiny profile (tiny random models on the CPU); "
              "the figures below show the code paths work, not GPU throughput.")
        profile = "tiny"
    rows = run(profile, args.config, args.frames)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of stage 4 (classical verification + captions) and stage 5 (export).

    .venv/bin/python perf/bench_verify_export.py [--samples 40] [--size 512]

Samples are built like the test fixtures (real photographs, OpenCV in/outpainting),
scaled to --size pixels, stored in a local store with an SQLite db; then every sample
is verified through the service (one stage call each, as the runner does) and the
build is exported to a folder twice (the second run shows a re-export's cost).
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from verify_fixtures import add_sample, add_video, make_images, prepare_db  # noqa: E402

from opensubject_tasks.backends.registry import get_backend  # noqa: E402
from opensubject_tasks.config import load_settings  # noqa: E402
from opensubject_tasks.context import Context  # noqa: E402
from opensubject_tasks.services.common import run_stage  # noqa: E402
from opensubject_tasks.export.service import export_build_to  # noqa: E402

SCENES = ("brick", "coffee", "hubble", "grass")


def scaled(images: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    out = {}
    for k, v in images.items():
        f = size / 256
        h, w = int(round(v.shape[0] * f)), int(round(v.shape[1] * f))
        if v.dtype == bool:
            out[k] = cv2.resize(v.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        else:
            out[k] = cv2.resize(v, (w, h), interpolation=cv2.INTER_CUBIC)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ve-"))
    settings = load_settings(database_url=f"sqlite:///{tmp / 'db.sqlite'}",
                             store={"kind": "local", "local_root": str(tmp / "store")},
                             export={"shard_max_samples": 16})
    ctx = Context.from_settings(settings)
    prepare_db(ctx)
    vid, clip = add_video(ctx, "bench.mp4")
    variants = [dict(scene=s) for s in SCENES] + [dict(generation_subject="rocket"), dict(keep_subject=True)]
    ids = [add_sample(ctx, vid, clip, i, scaled(make_images(**variants[i % len(variants)]), args.size),
                      scale=args.size / 256) for i in range(args.samples)]
    get_backend("verifier", "classical").verify([scaled(make_images(), args.size)])  # warm up

    t0 = time.perf_counter()
    ctx.settings.verify.max_attempts = 1
    states = [run_stage(ctx, "verify", sid).details.get("state") for sid in ids]
    t_verify = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = export_build_to(ctx, "b1", tmp / "dataset")
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_build_to(ctx, "b1", tmp / "dataset")
    t_reexport = time.perf_counter() - t0

    mb = res.shard_bytes / 1e6
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"samples {args.samples} at {args.size}px: verified {states.count('verified')}, "
          f"rejected {states.count('rejected')}")
    print(f"verify (service, classical): {t_verify:.2f} s total, {1000 * t_verify / len(ids):.0f} ms/sample")
    print(f"export: {res.samples} samples, {len(res.shards)} shards, {mb:.1f} MB of shards, "
          f"{res.files} files: {t_export:.2f} s ({res.samples / t_export:.1f} samples/s); "
          f"re-export {t_reexport:.2f} s")
    print(f"peak RSS {peak_mb:.0f} MB; output in {tmp}")


if __name__ == "__main__":
    main()

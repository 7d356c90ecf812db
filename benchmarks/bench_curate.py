"""Curation speed next to bare decoding and PySceneDetect's CLI, on the same files.

    .venv/bin/python benchmarks/bench_curate.py [VIDEO ...] [--size 1280x720] [--runs 3]

Makes the sample media at the given size (default 720p) plus one long file that
joins all of them (so that start-up costs do not dominate), adds any videos given
on the command line, and prints for each file:

* bare decode fps: PyAV, threaded, frames decoded and dropped (no conversion);
* curate fps: probe + the one decode pass + shot detection + clips + keyframes
  (converted and JPEG-encoded) + quality scores, i.e. the curate stage without the
  database and store writes;
* PySceneDetect CLI fps: ``scenedetect -i FILE`` (its default detector), timed as a
  subprocess, end to end;
* shot precision/recall (±2 frames, dissolves included) where ground truth exists,
  for our detector and for PySceneDetect's default detector alone.

Each timing is the best of ``--runs`` runs. Speeds depend on what else the machine
is doing: run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from opensubject_tasks.backends.classical.quality import ClassicalQuality  # noqa: E402
from opensubject_tasks.config import CurateSettings  # noqa: E402
from opensubject_tasks.media.decode import DecodeStats, iter_frames  # noqa: E402
from opensubject_tasks.media.probe import probe_video  # noqa: E402
from opensubject_tasks.media.samples import encode, make_samples  # noqa: E402
from opensubject_tasks.media.shots import ShotDetector, ShotScore, score_cuts  # noqa: E402
from opensubject_tasks.stages.curate import curate_frames  # noqa: E402


def bare_decode(path: Path) -> tuple[int, float]:
    t = time.perf_counter()
    n = 0
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for _ in c.decode(s):
            n += 1
    return n, time.perf_counter() - t


def curate(path: Path, s: CurateSettings) -> tuple[int, float, list[int]]:
    """Returns frames, seconds and the cuts found."""
    jpeg = [cv2.IMWRITE_JPEG_QUALITY, s.keyframe_quality]

    def on_clip(clip) -> None:  # noqa: ANN001
        for k in clip.keyframes:
            cv2.imencode(".jpg", cv2.cvtColor(k.image, cv2.COLOR_RGB2BGR), jpeg)

    t = time.perf_counter()
    probe = probe_video(path, s)
    out = curate_frames(iter_frames(path, probe, s, DecodeStats()), probe, s, ClassicalQuality(), on_clip)
    dt = time.perf_counter() - t
    return out.frames, dt, out.cuts


def default_detector_cuts(path: Path, s: CurateSettings) -> list[int]:
    probe = probe_video(path, s)
    det = ShotDetector(probe.fps, "adaptive", gradual_detector=None)
    cuts: list[int] = []
    for fr in iter_frames(path, probe, s):
        cuts += det.process(fr.index, fr.small)
    return cuts + det.finish()


def scenedetect_cli(path: Path) -> float:
    exe = Path(sys.executable).with_name("scenedetect")
    t = time.perf_counter()
    subprocess.run([str(exe), "-q", "-i", str(path)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def join_videos(gt: dict, media: Path, out: Path) -> dict:
    """One long file made of all sample videos in turn; each join is a hard cut."""
    frames, cuts, gradual = [], [], []
    for v in gt["videos"]:
        off = len(frames)
        if off:
            cuts.append(off)
        cuts += [c + off for c in v["cuts"]]
        gradual += [[a + off, b + off] for a, b in v["gradual"]]
        with av.open(str(media / v["file"])) as c:
            frames += [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    w, h = gt["size"]
    encode(out, iter(frames), (w, h))
    return {"file": out.name, "frames": len(frames), "cuts": cuts, "gradual": gradual}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="*", type=Path)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-samples", action="store_true", help="only the videos given")
    ap.add_argument("--keep", type=Path, help="keep the generated media in this folder")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.lower().split("x"))
    s = CurateSettings()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-curate-"))
    files: list[tuple[Path, dict | None]] = []
    if not args.no_samples:
        media = work / f"samples_{w}x{h}"
        gt_path = media / "ground_truth.json"
        if not gt_path.exists():
            print(f"making sample media at {w}x{h} in {media} ...", file=sys.stderr)
            make_samples(media, seed=args.seed, size=(w, h))
        gt = json.loads(gt_path.read_text())
        joined = media / "all_joined.mp4"
        joined_gt = media / "all_joined.json"
        if not joined_gt.exists():
            joined_gt.write_text(json.dumps(join_videos(gt, media, joined)))
        files.append((joined, json.loads(joined_gt.read_text())))
        files += [(media / v["file"], v) for v in gt["videos"]]
    files += [(p, None) for p in args.videos]

    rows = []
    tot = {"frames": 0, "bare": 0.0, "ours": 0.0, "cli": 0.0}
    ours_score, base_score = ShotScore(0, 0, 0), ShotScore(0, 0, 0)
    for path, truth in files:
        n, bare = min((bare_decode(path) for _ in range(args.runs)), key=lambda r: r[1])
        runs = [curate(path, s) for _ in range(args.runs)]
        frames, ours, cuts = min(runs, key=lambda r: r[1])
        cli = min(scenedetect_cli(path) for _ in range(args.runs))
        pr = base_pr = ""
        if truth is not None:
            sc = score_cuts(cuts, truth["cuts"], truth["gradual"])
            bc = score_cuts(default_detector_cuts(path, s), truth["cuts"], truth["gradual"])
            if path.name != "all_joined.mp4":  # the joined file repeats the others
                ours_score, base_score = ours_score + sc, base_score + bc
            pr = f"{sc.precision:.2f}/{sc.recall:.2f}"
            base_pr = f"{bc.precision:.2f}/{bc.recall:.2f}"
        rows.append((path.name[:32], n, n / bare, frames / ours, n / cli, frames / ours / (n / bare),
                     frames / ours / (n / cli), pr, base_pr))
        if path.name != "all_joined.mp4":
            tot["frames"] += n
            tot["bare"] += bare
            tot["ours"] += ours
            tot["cli"] += cli

    print(f"\nCuration speed, {w}x{h} sample media (best of {args.runs} runs), "
          f"{shutil.os.cpu_count()} CPU cores\n")
    print("| file | frames | bare decode fps | curate fps | PySceneDetect CLI fps | curate / bare | "
          "curate / CLI | shots P/R (ours) | shots P/R (CLI default detector) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.2f}x | {r[6]:.2f}x | {r[7]} | {r[8]} |")
    if tot["frames"]:
        fb, fo, fc = tot["frames"] / tot["bare"], tot["frames"] / tot["ours"], tot["frames"] / tot["cli"]
        print(f"| **separate files, total** | {tot['frames']} | {fb:.0f} | {fo:.0f} | {fc:.0f} | "
              f"{fo / fb:.2f}x | {fo / fc:.2f}x | {ours_score.precision:.2f}/{ours_score.recall:.2f} | "
              f"{base_score.precision:.2f}/{base_score.recall:.2f} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

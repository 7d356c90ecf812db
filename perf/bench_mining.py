"""Quality and speed of stages 2-3 with the classical backends on the generated sample
media: grounding IoU against the ground truth, identity linking, pairs and their
diversity, identity/background preservation (PSNR) of the synthesized inputs, and
determinism. Prints Markdown (the numbers in docs/mining.md come from here).

    .venv/bin/python perf/bench_mining.py [--media DIR] [--json OUT.json] [--sheet OUT.png]

With --sheet the services (mine, synthesize) also run on an embedded database and
store over the same clips, and the contact sheet of the samples is written there.

Without --media the sample videos are generated into a temporary folder first.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the ground-truth clip builder shared with the tests

from mining_fixtures import gt_clips, iou  # noqa: E402

from opensubject_tasks.backends.registry import get_backend  # noqa: E402
from opensubject_tasks.config import load_settings  # noqa: E402
from opensubject_tasks.services.synthesize import encode_png  # noqa: E402
from opensubject_tasks.steps.pair_inputs import apply_augmentation, synthesize_pair  # noqa: E402
from opensubject_tasks.steps.subjects import mine_clip  # noqa: E402

RUNTIME = {"device": "cpu", "dtype": "auto", "batch_size": 8}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def overlaps_other(clip, track: int, frame: int) -> bool:
    box = clip.boxes[track][frame]
    return any(iou(box, other[frame]) > 0 for t, other in clip.boxes.items() if t != track and frame in other)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--media", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--sheet", type=Path)
    args = ap.parse_args()
    if args.media is None:
        from opensubject_tasks.testmedia.samples import make_samples

        args.media = Path(tempfile.mkdtemp(prefix="osmedia-"))
        make_samples(args.media)
    settings = load_settings()
    vlm, det, emb = (get_backend(i, n, **RUNTIME) for i, n in
                     (("vlm", "none"), ("detector", "classical"), ("embedder", "classical")))
    seg, inp = get_backend("segmenter", "classical", **RUNTIME), get_backend("inpainter", "classical", **RUNTIME)
    clips = gt_clips(args.media, keyframes=settings.curate.keyframes_per_clip,
                     max_side=settings.curate.keyframe_max_side)

    per_clip, ious, ious_sep, links, pair_rows, mine_s = [], [], [], [], [], []
    for clip in clips:
        t0 = time.perf_counter()
        r = mine_clip(clip.frames, clip.frame_numbers, vlm=vlm, detector=det, embedder=emb, settings=settings.mine)
        mine_s.append(time.perf_counter() - t0)
        for track, boxes in clip.boxes.items():
            ids = set()
            for f, box in boxes.items():
                scored = [(iou(box, s.boxes[f]), s.idx) for s in r.subjects if f in s.boxes]
                best, ident = max(scored, default=(0.0, None))
                ious.append(best)
                if not overlaps_other(clip, track, f):
                    ious_sep.append(best)
                    if best >= 0.5:  # linking is judged where the subject is separate
                        ids.add(ident)
            links.append(len(ids))
        per_clip.append({"clip": f"{clip.video}#{clip.idx}", "moving": bool(clip.boxes), "pairs": len(r.pairs),
                         "subjects": [(s.state, s.reason) for s in r.subjects], "reason": r.reason})
        for p in r.pairs:
            ref_k, tgt_k = clip.frame_numbers.index(p.ref_frame), clip.frame_numbers.index(p.tgt_frame)
            pair_rows.append((clip, p, clip.frames[ref_k], clip.frames[tgt_k]))

    gen_psnr, out_psnr, in_psnr, synth_s, deterministic = [], [], [], [], 0
    for k, (_clip, p, ref, tgt) in enumerate(pair_rows):
        seed = 1000 + k
        t0 = time.perf_counter()
        res = synthesize_pair(ref, p.ref_box, tgt, p.tgt_box, seed=seed, attempt=1, segmenter=seg,
                              inpainter=inp, settings=settings.synth)
        synth_s.append(time.perf_counter() - t0)
        subject, _ = apply_augmentation(res.images["reference"], res.images["mask"], res.augment["geometry"])
        keep = res.images["generation_mask"]
        gen_psnr.append(psnr(res.images["generation_input"][keep], subject[keep]))
        box = res.images["manipulation_mask"]
        out_psnr.append(psnr(res.images["manipulation_input"][~box], res.images["target"][~box]))
        in_psnr.append(psnr(res.images["manipulation_input"][box], res.images["target"][box]))
        if k < 5:  # determinism: the same seed again, PNG bytes compared
            again = synthesize_pair(ref, p.ref_box, tgt, p.tgt_box, seed=seed, attempt=1, segmenter=seg,
                                    inpainter=inp, settings=settings.synth)
            digest = [hashlib.sha256(encode_png(v)).hexdigest() for v in res.images.values()]
            digest2 = [hashlib.sha256(encode_png(v)).hexdigest() for v in again.images.values()]
            deterministic += digest == digest2

    # embedder separation on ground-truth crops: same subject within a clip vs other category
    crops, labels = [], []
    for ci, clip in enumerate(clips):
        for track, boxes in clip.boxes.items():
            for f, b in boxes.items():
                x0, y0, x1, y1 = (max(0, int(v)) for v in b)
                crops.append(clip.frames[clip.frame_numbers.index(f)][y0:y1, x0:x1])
                labels.append((ci, track, clip.categories[track]))
    vec = emb.embed(crops)
    sim = vec @ vec.T
    same = [sim[i, j] for i in range(len(labels)) for j in range(i + 1, len(labels))
            if labels[i][:2] == labels[j][:2]]
    other = [sim[i, j] for i in range(len(labels)) for j in range(i + 1, len(labels))
             if labels[i][2] != labels[j][2]]

    moving = [c for c in per_clip if c["moving"]]
    div = [p.scores["diversity"] for _, p, _, _ in pair_rows]
    summary = {
        "clips": len(clips), "clips_with_moving_subject": len(moving),
        "clips_with_pairs": sum(c["pairs"] > 0 for c in moving),
        "iou_share": sum(v >= 0.5 for v in ious) / max(len(ious), 1), "annotated_frames": len(ious),
        "iou_share_unoverlapped": sum(v >= 0.5 for v in ious_sep) / max(len(ious_sep), 1),
        "unoverlapped_frames": len(ious_sep), "median_iou": statistics.median(ious) if ious else 0.0,
        "tracks": len(links), "tracks_one_identity": sum(v == 1 for v in links),
        "tracks_split": sum(v > 1 for v in links), "tracks_never_grounded": sum(v == 0 for v in links),
        "pairs": len(pair_rows),
        "diversity": {"min": min(div, default=0), "median": statistics.median(div) if div else 0,
                      "max": max(div, default=0)},
        "identity": {"min": min((p.scores["identity"] for _, p, _, _ in pair_rows), default=0)},
        "parts_mean": {k: statistics.mean(p.scores[k] for _, p, _, _ in pair_rows) if pair_rows else 0
                       for k in ("temporal", "scale", "position", "aspect", "appearance")},
        "near_duplicates": sum(1 for _, p, _, _ in pair_rows
                               if p.scores["box_iou"] >= settings.mine.near_duplicate_iou
                               and p.scores["identity"] >= settings.mine.near_duplicate_identity),
        "generation_psnr_under_mask": "inf" if all(math.isinf(v) for v in gen_psnr) else min(gen_psnr),
        "manipulation_psnr_outside_box": "inf" if all(math.isinf(v) for v in out_psnr) else min(out_psnr),
        "manipulation_psnr_inside_box_median": statistics.median(in_psnr) if in_psnr else None,
        "deterministic_reruns": f"{deterministic}/{min(5, len(pair_rows))}",
        "embedder_same_subject": {"min": float(np.min(same)), "p5": float(np.percentile(same, 5)),
                                  "median": float(np.median(same))},
        "embedder_other_category": {"p5": float(np.percentile(other, 5)), "median": float(np.median(other)),
                                    "p95": float(np.percentile(other, 95))},
        "mine_s_per_clip": statistics.mean(mine_s), "synth_s_per_sample": statistics.mean(synth_s) if synth_s else 0,
    }
    print("| clip | pairs | reason |\n|---|---|---|")
    for c in per_clip:
        print(f"| {c['clip']} | {c['pairs']} | {c['reason'] or ''} |")
    print()
    print("```json\n" + json.dumps(summary, indent=1, default=str) + "\n```")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "clips": per_clip}, indent=1, default=str))
    if args.sheet:
        write_sheet(clips, args.sheet)


def write_sheet(clips, out: Path) -> None:
    """Run the mine and synthesize services over the clips (embedded mode) and write
    the contact sheet: one sample per video with a moving subject."""
    from mining_fixtures import seed_video

    from opensubject_tasks.context import Context
    from opensubject_tasks.contact_sheet import write_contact_sheet
    from opensubject_tasks.db.engine import upgrade
    from opensubject_tasks.services.common import run_stage

    work = Path(tempfile.mkdtemp(prefix="ossheet-"))
    ctx = Context.from_settings(load_settings(database_url=f"sqlite:///{work / 'db.sqlite'}",
                                              store={"kind": "local", "local_root": str(work / "store")}))
    upgrade(ctx.engine)
    videos: dict[str, list] = {}
    for clip in clips:
        videos.setdefault(clip.video, []).append(clip)
    for video_clips in videos.values():
        result = run_stage(ctx, "mine", seed_video(ctx, video_clips))
        for _, sample_id in result.next[:1]:
            run_stage(ctx, "synthesize", sample_id)
    write_contact_sheet(ctx, out, limit=8)
    print(f"contact sheet: {out}")


if __name__ == "__main__":
    main()

"""Same-individual verification on media with ground-truth tracks (the numbers in
docs/models.md come from here).

1. The check's accuracy: pairs of ground-truth crops, same track against tracks of
   other individuals (opensubject_tasks/calibrate.py), for each embedder given; the
   threshold is calibrated on the first --media and applied unchanged to the others.
2. Wrong-identity pairs through a whole embedded build (profile cpu) of each --media:
   every sample's reference and target box is matched to the ground-truth track it
   overlaps most (IoU >= 0.3); a pair whose two boxes belong to tracks of different
   individuals is a wrong-identity pair. Counted as mined, as rejected by verification
   and as exported (in the dataset's manifest).

    .venv/bin/python perf/bench_identity.py --media DIR [DIR ...] [--embedders classical tiny]
        [--no-build] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from opensubject_tasks.backends.registry import get_backend  # noqa: E402
from opensubject_tasks.calibrate import calibrate, track_crops  # noqa: E402


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _track_of(video: dict, frame: int, box: list[float]) -> tuple[int, str] | None:
    best = (0.3, None)
    for s in video["subjects"]:
        gt = s["boxes"].get(str(frame))
        if gt is not None and _iou(gt, box) >= best[0]:
            best = (_iou(gt, box), (int(s["track"]), str(s["category"])))
    return best[1]


def build_counts(media: Path, out: Path) -> dict:
    """Run the embedded build (profile cpu) and classify its pairs against the ground truth."""
    import pyarrow.parquet as pq
    from sqlalchemy import select

    from opensubject_tasks.cli import main as cli_main
    from opensubject_tasks.config import load_settings
    from opensubject_tasks.context import Context
    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.lineage import lineage
    from opensubject_tasks.db.models import Pair, Sample, Video

    t0 = time.perf_counter()
    rc = cli_main(["run", str(media), "--out", str(out), "--jobs", "1", "--quiet"])
    seconds = time.perf_counter() - t0
    gt = {v["file"]: v for v in json.loads((media / "ground_truth.json").read_text())["videos"]}
    ctx = Context.from_settings(load_settings(database_url=f"sqlite:///{out / 'opensubject.db'}",
                                              store={"kind": "local", "local_root": str(out / "store")}))
    exported = set(pq.read_table(out / "dataset" / "manifest.parquet").column("sample_id").to_pylist())
    counts = {"samples": 0, "matched": 0, "wrong_identity_mined": 0, "wrong_identity_rejected": 0,
              "wrong_identity_exported": 0, "same_individual_rejected": 0, "verified": 0,
              "exported": len(exported), "seconds": round(seconds, 1), "exit_code": rc}
    with session_scope(ctx.sessions) as s:
        rows = s.execute(lineage(select(Sample, Pair, Video.name))).all()
        for sample, pair, name in rows:
            counts["samples"] += 1
            counts["verified"] += sample.state == "verified"
            reasons = " ".join(r for h in (sample.history or []) for r in h.get("reasons") or [])
            counts["same_individual_rejected"] += "same individual: the target's subject differs" in reasons
            video = gt.get(name)
            ref = _track_of(video, pair.ref_frame, pair.ref_box) if video else None
            tgt = _track_of(video, pair.tgt_frame, pair.tgt_box) if video else None
            if ref is None or tgt is None:
                continue
            counts["matched"] += 1
            if ref[1] != tgt[1]:            # tracks of two different individuals
                counts["wrong_identity_mined"] += 1
                counts["wrong_identity_rejected"] += sample.state == "rejected"
                counts["wrong_identity_exported"] += sample.id in exported
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--media", type=Path, nargs="+", required=True,
                    help="folders from `opensubject samples make` (the first calibrates)")
    ap.add_argument("--embedders", nargs="+", default=["classical", "tiny"])
    ap.add_argument("--no-build", action="store_true", help="only the accuracy table")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    crops = {m: track_crops(m) for m in args.media}
    doc: dict = {"accuracy": [], "builds": {}}
    print("| embedder | threshold (calibrated on) | media | same-track pairs kept | different-individual "
          "pairs rejected | balanced accuracy |")
    print("|---|---|---|---:|---:|---:|")
    for name in args.embedders:
        emb = get_backend("embedder", name, device="cpu", dtype="auto", batch_size=32)
        cal = calibrate(emb, crops[args.media[0]])
        for m in args.media:
            r = cal if m == args.media[0] else calibrate(emb, crops[m], threshold=cal.threshold)
            doc["accuracy"].append({"media": str(m), **r.as_dict()})
            print(f"| {emb.name} | {cal.threshold:.2f} ({args.media[0].name}) | {m.name} | "
                  f"{r.same_accuracy:.1%} of {r.same} | {r.different_accuracy:.1%} of {r.different} | "
                  f"{r.balanced_accuracy:.1%} |")
    if not args.no_build:
        print("\n| media | samples | matched to tracks | wrong identity mined | rejected | exported | "
              "samples failing same-individual | verified | exported | build s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for m in args.media:
            c = build_counts(m, Path(tempfile.mkdtemp(prefix="bench-identity-")))
            doc["builds"][str(m)] = c
            print(f"| {m.name} | {c['samples']} | {c['matched']} | {c['wrong_identity_mined']} | "
                  f"{c['wrong_identity_rejected']} | **{c['wrong_identity_exported']}** | "
                  f"{c['same_individual_rejected']} | {c['verified']} | {c['exported']} | {c['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()

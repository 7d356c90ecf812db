"""A video's samples one at a time against per-video batches: model calls and throughput.

    .venv/bin/python perf/bench_samples.py [--profile tiny] [--videos 3] [--batches 1 8]
        [--json out.json]

The sample media (testmedia, 480p) are curated and mined once in an embedded build
(SQLite + a local store); then, for each ``synth.batch_samples`` in ``--batches``, a copy
of that state runs each video's samples unit (synthesize, verify, caption, re-synthesis
included) through the stage service exactly as a GPU worker does. Reported per batch
size: wall seconds of the samples units, sample attempts (synthesis + verification of
one attempt) per second, verified and rejected samples, the calls the stage code makes on
each backend (segment, inpaint, verify, embed, ask_yes_no, caption) and the model forward
passes those make (HF backends, counted in ``Batcher.map``), per sample attempt. The tiny profile's models are random and tiny:
the calls are what the real models would get, the seconds are not a GPU's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from opensubject_tasks.backends.hf import common as hf_common
from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import Sample, Video
from opensubject_tasks.runner import run_build
from opensubject_tasks.services.common import run_stage
from opensubject_tasks.testmedia.samples import make_samples

CALLS: Counter[str] = Counter()     # backend method calls, by interface
FORWARD: Counter[str] = Counter()   # model forward passes (HF backends), by interface
METHODS = {"segmenter": ("segment",), "inpainter": ("inpaint",), "verifier": ("verify",),
           "embedder": ("embed",), "vlm": ("ask_yes_no", "caption")}


def count_forward_passes() -> None:
    """Count every slice an HF backend hands its model (one forward pass or pipeline call)."""
    real = hf_common.Batcher.map

    def counted(self, fn, items):  # noqa: ANN001, ANN202
        def call(chunk):  # noqa: ANN001, ANN202
            FORWARD[self.what.split()[0]] += 1   # "<interface> <model id>"
            return fn(chunk)
        return real(self, call, items)

    hf_common.Batcher.map = counted


def count_calls(ctx: Context) -> None:
    """Count the calls the stage code makes on each backend the samples unit uses."""
    for interface, methods in METHODS.items():
        backend = ctx.backend(interface)
        for name in methods:
            real = getattr(backend, name)

            def counted(*a, _real=real, _key=f"{interface}.{name}", **kw):  # noqa: ANN002, ANN003, ANN202
                CALLS[_key] += 1
                return _real(*a, **kw)
            setattr(backend, name, counted)


def settings_for(root: Path, profile: str, batch: int | None = None):  # noqa: ANN201
    s = load_settings(profile=profile, database_url=f"sqlite:///{root / 'db.sqlite'}",
                      store={"kind": "local", "local_root": str(root / "store")})
    s.curate.min_short_side = 64
    if batch is not None:
        s.synth.batch_samples = batch
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--videos", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    work = Path(tempfile.mkdtemp(prefix="bench_samples_"))
    try:
        media = work / "media"
        make_samples(media, count=args.videos)
        mined = work / "mined"
        ctx = Context.from_settings(settings_for(mined, args.profile))
        t0 = time.perf_counter()
        run_build(ctx, [str(media)], "bench", until="mine")
        mine_s = time.perf_counter() - t0
        with session_scope(ctx.sessions) as s:
            videos = sorted(v.id for v in s.query(Video) if v.stage_done == "mine" and v.state == "running")
            pending = s.query(Sample).count()
        ctx.engine.dispose()
        count_forward_passes()
        rows = []
        for batch in args.batches:
            root = work / f"batch{batch}"
            shutil.copytree(mined, root)
            ctx = Context.from_settings(settings_for(root, args.profile, batch))
            count_calls(ctx)   # loads the models before timing, too
            CALLS.clear()
            FORWARD.clear()
            t0 = time.perf_counter()
            for vid in videos:
                result = run_stage(ctx, "samples", vid)
                assert result.status == "ok" and not result.next, result
            wall = time.perf_counter() - t0
            with session_scope(ctx.sessions) as s:
                states = Counter(x.state for x in s.query(Sample))
                attempts = sum(len(x.history or []) for x in s.query(Sample))
            verified = states.get("verified", 0)
            rows.append({"batch_samples": batch, "wall_s": round(wall, 2), "sample_attempts": attempts,
                         "attempts_per_s": round(attempts / wall, 3), "verified": verified,
                         "rejected": states.get("rejected", 0), "calls": dict(CALLS),
                         "calls_per_attempt": round(sum(CALLS.values()) / max(attempts, 1), 2),
                         "forward_passes": dict(FORWARD),
                         "forward_per_attempt": round(sum(FORWARD.values()) / max(attempts, 1), 2)})
            ctx.engine.dispose()
        doc = {"profile": args.profile, "videos": len(videos), "samples": pending,
               "mine_s": round(mine_s, 1), "omp_threads": torch_threads, "runs": rows}
        print(json.dumps(doc, indent=2))
        print()
        print("| samples per batch | wall s | sample attempts/s | verified / rejected | backend calls per attempt "
              "| forward passes per attempt |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['batch_samples']} | {r['wall_s']} | {r['attempts_per_s']} | {r['verified']} / {r['rejected']} "
                  f"| {r['calls_per_attempt']} | {r['forward_per_attempt']} |")
        if args.json:
            args.json.write_text(json.dumps(doc, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

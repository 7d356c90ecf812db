"""Memory and time of the export's steps against the number of verified samples.

    .venv/bin/python perf/bench_export.py --samples 10000 100000 [--baseline DIR]

For each size, a PostgreSQL database is filled with ``generate_series`` (one build,
20 verified samples per video: 1 clip, 2 subjects, 10 pairs each; one verify stage
attempt per sample) and a local-directory store holds tiny images (200 distinct sets
of seven 48x32 PNGs, sample i uses set i % 200). Then each step runs in a process of
its own (the local store's fsync switched off: the disk is not what is measured), and
the process's peak RSS (``ru_maxrss``), wall and CPU time are reported:

  plan      export_plan: the shards (1,000 samples each), recorded in export_shards
  part      export_part of the first shard
  parts     the remaining shards, one process (needed by the finish; shown for the total)
  finish    the export stage: manifest, stats, report, training layout, stale files

``--baseline DIR``: a checkout of another version of the code (e.g. ``git archive main |
tar -x -C DIR``) run on a copy of the same database and store, its steps interleaved
with this version's so that the machine's load hits both alike. ``--code DIR``: measure
that checkout alone instead of this one.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _services import pg_database  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUILD = "bx"
SETS = 200
PER_VIDEO = 20          # 1 clip x 2 subjects x 10 pairs
SHARD = 1000
IMAGES = ("reference", "mask", "generation_input", "generation_mask", "manipulation_input",
          "manipulation_mask", "target")

FILL = """
INSERT INTO builds (id) VALUES (:b);
INSERT INTO videos (id, content_hash, source_uri, name, build_id, state, stage_done)
  SELECT 'v' || lpad(i::text, 8, '0'), 'h' || i, 'store://raw/v' || i || '.mp4', 'v' || i || '.mp4', :b, 'done', 'verify'
  FROM generate_series(0, :videos - 1) i;
INSERT INTO clips (id, video_id, idx, start_frame, end_frame, start_s, end_s, state, keyframes)
  SELECT 'v' || lpad(i::text, 8, '0') || '-c0', 'v' || lpad(i::text, 8, '0'), 0, 0, 100, 0, 4, 'mined',
         '[{"frame": 0, "key": "kf/0.jpg", "width": 48, "height": 32},
           {"frame": 40, "key": "kf/40.jpg", "width": 48, "height": 32}]'::jsonb
  FROM generate_series(0, :videos - 1) i;
INSERT INTO subjects (id, clip_id, idx, category, category_source, boxes, state)
  SELECT c.id || '-s' || j, c.id, j, 'cat', 'bench', '{"0": [4, 4, 20, 20], "40": [10, 8, 30, 28]}'::jsonb, 'paired'
  FROM clips c, generate_series(0, 1) j;
INSERT INTO pairs (id, subject_id, ref_frame, tgt_frame, ref_box, tgt_box)
  SELECT s.id || '-p' || k || '-40', s.id, k, 40, '[4, 4, 20, 20]'::jsonb, '[10, 8, 30, 28]'::jsonb
  FROM subjects s, generate_series(0, 9) k;
INSERT INTO samples (id, pair_id, build_id, state, attempt, seed, keys, verdict, history,
                     caption_short, caption_long, caption_source)
  SELECT p.id, p.id, :b, 'verified', 1, n,
         jsonb_build_object('reference', 'img/' || (n % 200) || '/reference.png',
                            'mask', 'img/' || (n % 200) || '/mask.png',
                            'generation_input', 'img/' || (n % 200) || '/generation_input.png',
                            'generation_mask', 'img/' || (n % 200) || '/generation_mask.png',
                            'manipulation_input', 'img/' || (n % 200) || '/manipulation_input.png',
                            'manipulation_mask', 'img/' || (n % 200) || '/manipulation_mask.png',
                            'target', 'img/' || (n % 200) || '/target.png'),
         jsonb_build_object('passed', true, 'source', 'classical', 'reasons', '[]'::jsonb,
                            'scores', jsonb_build_object('identity', 0.9, 'overall', 0.5 + (n % 997) / 2000.0)),
         jsonb_build_array(jsonb_build_object('attempt', 1, 'seed', n, 'reasons', '[]'::jsonb,
                                              'verdict', jsonb_build_object('passed', true))),
         'a cat', 'a grey cat sitting on a brick wall in the sun', 'template'
  FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM pairs) p;
INSERT INTO stage_attempts (build_id, entity_type, entity_id, stage, status, duration_s, finished_at)
  SELECT :b, 'sample', id, 'verify', 'ok', 0.05, now() FROM samples;
ANALYZE;
"""

STEP = r"""
import json, os, resource, sys, time
os.fsync = lambda fd: None   # the local store's fsync: disk latency of a shared disk is not measured here
sys.path.insert(0, sys.argv[1])
t0, c0 = time.perf_counter(), time.process_time()
from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.export import service as e
from opensubject_tasks.export.sinks import StoreSink
url, store, step = sys.argv[2], sys.argv[3], sys.argv[4]
ctx = Context.from_settings(load_settings(database_url=url, store={"kind": "local", "local_root": store}))
ctx.settings.export.shard_max_samples = __SHARD__
sink = StoreSink(ctx.store, "__BUILD__")
t1, c1 = time.perf_counter(), time.process_time()
if step == "plan":
    out = len(e.plan_export(ctx, "__BUILD__", max_parts=10**6))
elif step == "part":
    out = e.write_part(ctx, "__BUILD__", 0, 0, sink)["samples"]
elif step == "parts":
    n = int(sys.argv[5])
    out = e.write_part(ctx, "__BUILD__", 1, n - 1, sink)["samples"] if n > 1 else 0
elif step == "idle":
    out = 0
else:
    out = e.finish_export(ctx, "__BUILD__", sink).samples
print(json.dumps({"wall_s": time.perf_counter() - t1, "cpu_s": time.process_time() - c1,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "import_s": t1 - t0, "out": out,
                  "code": __import__("opensubject_tasks").__file__}))
""".replace("__SHARD__", str(SHARD)).replace("__BUILD__", BUILD)


def png(seed: int, name: str) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (32, 48) if "mask" in name else (32, 48, 3)
    arr = (rng.integers(0, 2, shape) * 255 if "mask" in name else rng.integers(0, 256, shape)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def fill_store(root: Path) -> None:
    for i in range(SETS):
        folder = root / "img" / str(i)
        folder.mkdir(parents=True, exist_ok=True)
        for name in IMAGES:
            (folder / f"{name}.png").write_bytes(png(i * 10 + IMAGES.index(name), name))


def step(code: Path, url: str, store: Path, name: str, shards: int) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, str(code), url, str(store), name, str(shards)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} ({code}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--baseline", type=Path, help="another checkout of the code to compare with")
    ap.add_argument("--code", type=Path, default=REPO, help="the checkout measured as 'this' (default: this one)")
    args = ap.parse_args()
    versions = {"this": args.code.resolve()} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    results = []
    for n in args.samples:
        videos = -(-n // PER_VIDEO)
        with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp, pg_database("bench_export", schema=True) as url:
            t = time.perf_counter()
            engine = create_engine(url)
            with engine.begin() as c:
                for stmt in FILL.split(";\n"):
                    if stmt.strip():
                        c.execute(text(stmt), {"b": BUILD, "videos": videos})
                total = c.execute(text("SELECT count(*) FROM samples")).scalar()
            engine.dispose()
            fill_s = time.perf_counter() - t
            stores, urls = {}, {}
            for v in versions:
                stores[v] = Path(tmp) / v
                fill_store(stores[v])
            # each version its own copy of the database (export_shards is written by the plan)
            urls["this"] = url
            copies = []
            if "baseline" in versions:
                admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
                name = url.rsplit("/", 1)[1] + "_base"
                with admin.connect() as c:
                    c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{url.rsplit('/', 1)[1]}'"))
                    c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{url.rsplit("/", 1)[1]}"'))
                urls["baseline"] = url.rsplit("/", 1)[0] + "/" + name
                copies.append((admin, name))
            shards = -(-total // SHARD)
            row = {"samples": total, "fill_s": round(fill_s, 1)}
            for s in ("idle", "plan", "part", "parts", "finish"):
                for v in versions:
                    r = step(versions[v], urls[v], stores[v], s, shards)
                    assert Path(r["code"]).is_relative_to(versions[v]), (r["code"], versions[v])
                    row[f"{v}.{s}"] = r
                    print(f"{total:>7} {v:>8} {s:>6}: {r['wall_s']:7.2f} s wall {r['cpu_s']:7.2f} s cpu "
                          f"{r['maxrss_mb']:7.1f} MB peak RSS (out {r['out']})", flush=True)
            for admin, name in copies:
                with admin.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
        results.append(row)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

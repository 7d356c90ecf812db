"""What the build-count triggers (sql/008_build_counts.sql) cost a bulk write: a
claim-shaped UPDATE of N registered videos into a build, with the triggers on and off
(``session_replication_role = replica``), interleaved.

    .venv/bin/python perf/bench_count_triggers.py [--videos 100000] [--rounds 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _services import pg_database  # noqa: E402

from sqlalchemy import create_engine, text  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    n = args.videos
    with pg_database("bench_count_triggers", schema=True) as url:
        engine = create_engine(url)
        with engine.begin() as c:
            c.execute(text("INSERT INTO builds (id, params, profile, state) VALUES ('b', '{}', 'cpu', 'running')"))
            c.execute(text("INSERT INTO videos (id, content_hash, source_uri, name, state) SELECT 'v' || g, 'h' || g, "
                           "'store://raw/' || g, g || '.mp4', 'registered' FROM generate_series(1, :n) g"), {"n": n})
            c.execute(text("SELECT build_counts_recount()"))
        for rnd in range(args.rounds):
            for triggers in (True, False):
                with engine.begin() as c:
                    if not triggers:
                        c.execute(text("SET LOCAL session_replication_role = replica"))
                    t0 = time.perf_counter()
                    c.execute(text("UPDATE videos SET build_id = 'b', state = 'queued' WHERE build_id IS NULL"))
                    took = time.perf_counter() - t0
                    # back to registered, without counting, for the next round
                    c.execute(text("SET LOCAL session_replication_role = replica"))
                    c.execute(text("UPDATE videos SET build_id = NULL, state = 'registered'"))
                    c.execute(text("DELETE FROM build_count_deltas"))
                print(f"round {rnd} triggers {'on ' if triggers else 'off'}: {n} videos claimed in {took:.2f} s "
                      f"({took / n * 1e6:.0f} us per video)", flush=True)
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

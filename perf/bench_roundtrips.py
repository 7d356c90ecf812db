"""Database round trips per stage step, on the workers' own code path.

    .venv/bin/python perf/bench_roundtrips.py [--videos 10] [--json out.json]

Runs each Celery stage task in this process (``task.apply``: the task body a worker
runs, retry rules included) on tiny generated videos (160x90, 1.5 s, one photo with a
cut-out subject moving across it; ``testmedia.tiny_video``) in a new PostgreSQL
database, following each video's chain (curate -> mine -> samples) as the workers do:
the hand-offs a task makes are recorded instead of sent to a broker, then run next.

Counted per task with SQLAlchemy event listeners on every engine of the process:
statements sent (``before_cursor_execute``), transactions ended (``commit`` and
``rollback``), connections checked out of the pool (each one costs a ``pool_pre_ping``
round trip). A round trip is a statement, a transaction end or a ping. The stage's own
queries are included; ``shell`` is what the task adds around the stage function (lock,
lost attempts, build lookup, attempt row, result, terminal state, hand-off): the round
trips counted outside the stage function's own call. (The samples unit records its
samples' attempts inside its function: that bookkeeping counts as the stage's.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _services import pg_database  # noqa: E402

from opensubject_tasks.testmedia.samples import make_tiny_videos  # noqa: E402


class Counter:
    """Statements, transaction ends and connection checkouts of every engine in the process."""

    def __init__(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
        from sqlalchemy.pool import Pool

        self.statements = self.transactions = self.checkouts = 0
        event.listen(Engine, "before_cursor_execute", self._statement)
        event.listen(Engine, "commit", self._transaction)
        event.listen(Engine, "rollback", self._transaction)
        event.listen(Pool, "checkout", self._checkout)

    def _statement(self, *_a, **_k) -> None:  # noqa: ANN002, ANN003
        self.statements += 1

    def _transaction(self, *_a, **_k) -> None:  # noqa: ANN002, ANN003
        self.transactions += 1

    def _checkout(self, *_a, **_k) -> None:  # noqa: ANN002, ANN003
        self.checkouts += 1

    def snapshot(self) -> tuple[int, int, int]:
        return self.statements, self.transactions, self.checkouts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-roundtrips-"))
    media = tmp / "media"
    make_tiny_videos(media, args.videos)
    with pg_database("bench_roundtrips") as url:
        os.environ.update({
            "OPENSUBJECT_DATABASE_URL": url,
            "OPENSUBJECT_STORE__KIND": "local",
            "OPENSUBJECT_STORE__LOCAL_ROOT": str(tmp / "store"),
            "OPENSUBJECT_CURATE__MIN_SHORT_SIDE": "64",
            "OPENSUBJECT_MINE__MAX_PAIRS_PER_SUBJECT": "1",
            "OPENSUBJECT_VERIFY__MAX_ATTEMPTS": "2",
        })
        from opensubject_tasks import orchestrate as o
        from opensubject_tasks import tasks
        from opensubject_tasks.db.engine import upgrade
        from opensubject_tasks.services.ingest import register_source

        ctx = o.context()
        upgrade(ctx.engine)
        build = o.start_build({"build_name": "roundtrips"}, "roundtrips-run")
        register_source(ctx, str(media), build_id=build)
        o.claim_build_videos(build)
        with ctx.engine.connect() as conn:
            from sqlalchemy import text

            videos = [r[0] for r in conn.execute(text("SELECT id FROM videos ORDER BY id"))]

        queue: list[tuple[str, str]] = [("curate", v) for v in videos]

        def record_send(stage: str, *a, **_k) -> str:  # noqa: ANN002, ANN003
            queue.append((stage, a[0]))
            return "recorded"

        tasks.send = record_send  # hand-offs run next in this process, not through a broker
        counter = Counter()
        inside = [0]

        from dataclasses import replace

        from opensubject_tasks.services.common import load_stages

        stages = load_stages()
        for name, spec in list(stages.items()):
            def counted(c, e, _fn=spec.fn):  # noqa: ANN001, ANN202
                b = sum(counter.snapshot())
                try:
                    return _fn(c, e)
                finally:
                    inside[0] += sum(counter.snapshot()) - b
            stages[name] = replace(spec, fn=counted)
        per_stage: dict[str, list[tuple[int, int, int, float]]] = defaultdict(list)
        while queue:
            stage, entity = queue.pop(0)
            before = counter.snapshot()
            inside[0] = 0
            t0 = time.perf_counter()
            res = getattr(tasks, stage).apply(args=[entity])
            wall = time.perf_counter() - t0
            if res.failed():
                raise RuntimeError(f"{stage}({entity}) failed: {res.result!r}")
            after = counter.snapshot()
            per_stage[stage].append((*(a - b for a, b in zip(after, before, strict=True)), wall,
                                     sum(after) - sum(before) - inside[0]))

    rows = {}
    for stage, runs in per_stage.items():
        st = [r[0] for r in runs]
        tx = [r[1] for r in runs]
        co = [r[2] for r in runs]
        rows[stage] = {"tasks": len(runs), "statements": statistics.mean(st), "transactions": statistics.mean(tx),
                       "checkouts": statistics.mean(co),
                       "round_trips": statistics.mean(a + b + c for a, b, c, *_ in runs),
                       "shell_round_trips": statistics.mean(r[4] for r in runs),
                       "wall_ms": 1000 * statistics.median(r[3] for r in runs)}
    print(f"{args.videos} tiny videos (160x90, 1.5 s), PostgreSQL {url.rsplit('@', 1)[-1]}")
    print(f"{'task':<10} {'tasks':>5} {'statements':>11} {'transactions':>13} {'checkouts':>10} "
          f"{'round trips':>12} {'shell':>6} {'wall ms p50':>12}")
    for stage, r in rows.items():
        print(f"{stage:<10} {r['tasks']:>5} {r['statements']:>11.1f} {r['transactions']:>13.1f} "
              f"{r['checkouts']:>10.1f} {r['round_trips']:>12.1f} {r['shell_round_trips']:>6.1f} {r['wall_ms']:>12.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

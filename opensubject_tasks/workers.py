"""Worker start-up: load the models a worker's queues need before it takes a task, and say
when every process is ready (the container health check).

    python -m opensubject_tasks.workers --check [--expect N]

exits 0 once N pool processes of this container have loaded their models (N: the
``OPENSUBJECT_WORKER_CONCURRENCY`` variable, default 1), 1 before.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from opensubject_tasks.catalogue import STAGES

log = logging.getLogger(__name__)
READY_DIR_ENV = "OPENSUBJECT_WORKER_READY_DIR"


def backends_for(queues: Iterable[str]) -> list[str]:
    """The model interfaces of the stages on these queues (every stage when unknown)."""
    wanted = set(queues)
    return sorted({b for s in STAGES.values() if not wanted or s.queue in wanted for b in s.backends})


def warm_backends(ctx, queues: Iterable[str]) -> list[str]:  # noqa: ANN001 - a Context
    """Load each backend now (they stay cached in this process); returns their names."""
    t0 = time.monotonic()
    names = []
    for interface in backends_for(queues):
        backend = ctx.backend(interface)
        names.append(f"{interface}={getattr(backend, 'name', type(backend).__name__)}")
    log.info("backends loaded in %.1f s: %s", time.monotonic() - t0, ", ".join(names))
    return names


def _ready_dir() -> Path | None:
    value = os.environ.get(READY_DIR_ENV, "").strip()
    return Path(value) if value else None


def mark_ready() -> None:
    where = _ready_dir()
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
        (where / str(os.getpid())).write_text("ready")


def ready_processes() -> int:
    """Pool processes of this container that are alive and have loaded their models."""
    where = _ready_dir()
    if where is None or not where.is_dir():
        return 0
    alive = 0
    for f in where.iterdir():
        if f.name.isdigit() and Path(f"/proc/{f.name}").exists():
            alive += 1
    return alive


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="worker readiness check")
    ap.add_argument("--check", action="store_true", required=True)
    ap.add_argument("--expect", type=int, default=int(os.environ.get("OPENSUBJECT_WORKER_CONCURRENCY", "1")))
    args = ap.parse_args(argv)
    n = ready_processes()
    print(f"{n} of {args.expect} worker process(es) ready")
    return 0 if n >= args.expect else 1


if __name__ == "__main__":
    sys.exit(main())

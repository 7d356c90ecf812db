"""Stragglers and a lost message: worker busy share with chunk waves against continuous hand-out.

    PYTHONPATH=$PWD .venv/bin/python perf/bench_waves.py [--chunks 8] [--per-chunk 10]
        [--workers 4] [--active-chunks 2] [--base-s 0.05] [--slow 20] [--rounds 2]

A simulation on the real hand-out code and a real PostgreSQL (a fresh database per run):
videos are rows registered and chunked by ``orchestrate.claim_build_videos``; the "broker"
is an in-process queue and each "worker" a thread that sleeps for a video's stage time,
then records its end in one transaction that calls ``handoff.leave_flight`` (the chain's
call) and sends what it returns. No media: a video's work is ``--base-s`` seconds, and the
last (``--slow-first``: first) video of every chunk takes ``--slow`` times that. The first
message of the second video of chunk 0 is lost; a reconcile pass
(``services.reconcile.reconcile``, the real one) runs every ``--reconcile-s`` seconds and
resends work handed out longer ago than that whose message is gone.

* waves (before): at most ``--active-chunks`` chunks at once, each handing out all its
  videos (``handoff.hand_out_videos``) and holding its slot until they are all settled;
* continuous (after): every chunk starts at once (``orchestrate.start_chunk``: its videos
  wait) and at most 2 x workers videos are in flight; each video that ends hands out the
  next waiting one.

Same worker threads in both. Prints wall time, worker busy share (time in stage work / (workers
x wall)), the mean time of the end-of-video transaction and this process's CPU time per
video; the two modes alternate, ``--rounds`` each.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _services import pg_database  # noqa: E402


def run(mode: str, args: argparse.Namespace) -> dict[str, float]:
    from sqlalchemy import update

    from opensubject_tasks import orchestrate, tasks
    from opensubject_tasks.db.engine import session_scope, upgrade
    from opensubject_tasks.db.models import Build, Video
    from opensubject_tasks.services.handoff import hand_out_videos, leave_flight
    from opensubject_tasks.services.reconcile import reconcile

    bound = 2 * args.workers
    with pg_database("bench_waves") as url:
        os.environ["OPENSUBJECT_DATABASE_URL"] = url
        os.environ["OPENSUBJECT_CELERY__MAX_VIDEOS_IN_FLIGHT"] = str(bound)
        ctx = orchestrate.context()
        upgrade(ctx.engine)
        n = args.chunks * args.per_chunk
        with session_scope(ctx.sessions) as s:
            s.add(Build(id="b", params={}))
            s.flush()
            s.add_all(Video(id=f"v{i:05d}", content_hash=f"h{i}", source_uri=f"store://raw/{i}.mp4",
                            name=f"{i}.mp4", build_id="b") for i in range(n))
        chunks = orchestrate.claim_build_videos("b", chunk_size=args.per_chunk)
        with session_scope(ctx.sessions) as s:
            of_chunk = {c: [v for (v,) in s.execute(orchestrate._of_chunk("b", c).order_by(Video.id))] for c in chunks}
        slow = {ids[0 if args.slow_first else -1] for ids in of_chunk.values()}
        lost = {of_chunk[0][1]}

        broker: queue.Queue = queue.Queue()
        held: set[tuple[str, str]] = set()          # queued or being worked on
        lock = threading.Lock()

        def send(stage: str, vid: str, task_id: str | None = None) -> None:
            with lock:
                if vid in lost:
                    lost.discard(vid)
                    return
                held.add((stage, vid))
            broker.put((stage, vid))

        orchestrate._send = send
        tasks.waiting_in_broker = lambda: set(held)
        busy = [0.0] * args.workers
        book = [0.0] * args.workers                 # time in the end-of-video transaction
        stop = threading.Event()

        def worker(k: int) -> None:
            while not stop.is_set():
                try:
                    stage, vid = broker.get(timeout=0.05)
                except queue.Empty:
                    continue
                t = args.base_s * (args.slow if vid in slow else 1)
                time.sleep(t)
                busy[k] += t
                t1 = time.perf_counter()
                with session_scope(ctx.sessions) as s:
                    s.execute(update(Video).where(Video.id == vid).values(state="done", stage_done="mine"))
                    sends = leave_flight(s, vid, "verify")
                book[k] += time.perf_counter() - t1
                with lock:
                    held.discard((stage, vid))
                for st, v, tid in sends:
                    send(st, v, task_id=tid)

        def reconciler() -> None:
            while not stop.wait(args.reconcile_s):
                reconcile(ctx, send, older_than_s=args.reconcile_s, waiting=lambda: set(held))

        def settled(c: int) -> bool:
            return orchestrate.chunk_progress("b", c) is not None

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.workers)]
        threads.append(threading.Thread(target=reconciler))
        cpu0, t0 = time.process_time(), time.perf_counter()
        for th in threads:
            th.start()
        if mode == "waves":
            slots = threading.Semaphore(args.active_chunks)

            def chunk_task(c: int) -> None:
                with slots:
                    hand_out_videos(ctx, "curate", of_chunk[c], send)
                    while not settled(c):
                        time.sleep(0.02)
            runners = [threading.Thread(target=chunk_task, args=(c,)) for c in chunks]
            for th in runners:
                th.start()
            for th in runners:
                th.join()
        else:
            for c in chunks:
                orchestrate.start_chunk("b", c)
            while not all(settled(c) for c in chunks):
                time.sleep(0.02)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        stop.set()
        for th in threads:
            th.join()
        ctx.engine.dispose()
    return {"wall_s": wall, "busy": sum(busy) / (args.workers * wall), "cpu_ms_per_video": 1000 * cpu / n,
            "work_s": sum(busy), "end_ms": 1000 * sum(book) / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--per-chunk", type=int, default=10)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--active-chunks", type=int, default=2)
    p.add_argument("--base-s", type=float, default=0.05)
    p.add_argument("--slow", type=float, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--slow-first", action="store_true", help="the slow video first in its chunk (default: last)")
    p.add_argument("--reconcile-s", type=float, default=1.0, help="reconcile period and age of lost work")
    args = p.parse_args()
    print(f"{args.chunks} chunks x {args.per_chunk} simulated videos ({args.base_s} s each, the "
          f"{'first' if args.slow_first else 'last'} of each chunk {args.slow:g}x), {args.workers} worker "
          f"threads, 1 lost message, reconcile every {args.reconcile_s:g} s; waves: "
          f"{args.active_chunks} chunks at once; continuous: bound {2 * args.workers}")
    print("| mode | round | wall s | worker busy share | stage work s | end-of-video transaction ms | "
          "CPU ms/video (this process) |")
    print("|---|---|---|---|---|---|---|")
    for r in range(args.rounds):
        for mode in ("waves", "continuous"):
            m = run(mode, args)
            print(f"| {mode} | {r + 1} | {m['wall_s']:.2f} | {m['busy']:.0%} | {m['work_s']:.2f} | "
                  f"{m['end_ms']:.1f} | {m['cpu_ms_per_video']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

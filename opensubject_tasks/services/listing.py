"""The scheduled listing of a store prefix: a safety net behind bucket notifications whose
cost is O(new), not O(prefix).

It remembers what it has seen between runs (sql/007_listing_and_events.sql):

* **Segments.** A source's keys are cut into segments of about ``SEGMENT`` keys; each
  keeps the digest of its objects' ``(key, etag, size)`` from the pass that registered
  them. A pass lists the prefix (one call per 1,000 keys) and compares digests: a
  segment that did not change costs no database work at all; a changed one (a new,
  overwritten or deleted object in it) is registered as before (one round trip per 500
  candidates; known objects count as known) and its digest stored. A segment that grows
  past ``2 * SEGMENT`` keys is split.
* **Watermark.** A prefix whose new keys always sort after the old ones (date-partitioned,
  ``ingest.append_only_prefixes``) is listed from its greatest key seen: list calls and
  database work both O(new). Keys written below the watermark are found by notifications
  (or by a run with ``full=True``).
* **Checkpoint.** A pass records the last key it finished (``listing_progress.resume_after``)
  with each changed segment and at least every ``CHECKPOINT_S`` seconds; a pass that runs
  out of its time budget, or is killed, continues after that key on the next run or retry
  instead of starting again.

Correctness rests on one rule: a segment's digest is written only after its objects were
registered (committed), so an unchanged digest means every object in it was registered,
recorded as a duplicate or skipped with its reason by an earlier pass. Only counts are
returned.
"""
from __future__ import annotations

import bisect
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import delete, select

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.models import ListingProgress, ListingSegment, utcnow
from opensubject_tasks.services.ingest import (
    _BATCH, IngestResult, Skipped, _Candidate, _ensure_build_exists, _insert, _register_batch, store_candidate,
)
from opensubject_tasks.storage.base import ObjectInfo, check_prefix

SEGMENT = 1000          # keys per segment when one is cut
CHECKPOINT_S = 10.0     # a pass with nothing to register still records its place this often


@dataclass
class ListingResult:
    """Counts of one listing run (never per-object lists)."""
    listed: int = 0           # objects the store listed in this run
    unchanged: int = 0        # of them, in segments no object of which changed: no database work
    new: int = 0
    known: int = 0
    duplicates: int = 0
    replaced: int = 0
    skipped: Skipped = field(default_factory=Skipped)       # counts per reason, a few names each
    segments_changed: int = 0
    complete: bool = True      # False: stopped by its time budget; the next run continues

    def add(self, res: IngestResult) -> None:
        self.new += len(res.new_ids)
        self.known += len(res.known_ids)
        self.duplicates += len(res.duplicates)
        self.replaced += len(res.replaced)

    def to_dict(self) -> dict[str, Any]:
        return {"listed": self.listed, "unchanged": self.unchanged, "new": self.new, "known": self.known,
                "duplicates": self.duplicates, "replaced": self.replaced,
                "skipped": dict(self.skipped.counts),
                "segments_changed": self.segments_changed, "complete": self.complete}


def digest(objects: Iterable[ObjectInfo]) -> str:
    h = hashlib.sha256()
    for o in objects:
        h.update(f"{o.key}\0{o.etag}\0{o.size}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def source_of(prefix: str) -> str:
    return "store://" + prefix


def list_and_register(ctx: Context, prefix: str, build_id: str | None = None, *,
                      budget_s: float | None = None, full: bool = False) -> ListingResult:
    """Register what is new under ``prefix`` since the last pass (see the module's doc).

    ``budget_s``: stop at a segment's end once this much time has passed (the result says
    ``complete=False``; the next call continues). ``full``: compare every object with the
    database, ignoring digests and the watermark (a pass from the start)."""
    check_prefix(prefix)
    source = source_of(prefix)
    if budget_s is None:
        budget_s = ctx.settings.ingest.listing_budget_s
    if build_id is not None:
        _ensure_build_exists(ctx, build_id)
    run = _Pass(ctx, source, prefix, build_id, budget_s, full)
    if any(prefix.startswith(p) for p in ctx.settings.ingest.append_only_prefixes if p):
        run.by_watermark()
    else:
        run.by_segments()
    return run.result


class _Pass:
    def __init__(self, ctx: Context, source: str, prefix: str, build_id: str | None,
                 budget_s: float, full: bool) -> None:
        self.ctx, self.source, self.prefix, self.build_id, self.full = ctx, source, prefix, build_id, full
        self.deadline = time.monotonic() + budget_s
        self.result = ListingResult()
        self.last_checkpoint = time.monotonic()
        with session_scope(ctx.sessions) as s:
            prog = s.get(ListingProgress, source)
            self.resume_after = prog.resume_after if prog else None
            self.watermark = prog.watermark if prog else None
            if full:
                self.resume_after = None
            seg = [] if full else s.execute(select(ListingSegment.lower_key, ListingSegment.digest)
                                            .where(ListingSegment.source == source)
                                            .order_by(ListingSegment.lower_key)).all()
        self.bounds = [r.lower_key for r in seg]
        self.digests = {r.lower_key: r.digest for r in seg}
        if not self.bounds or self.bounds[0] != "":
            self.bounds.insert(0, "")   # the first segment starts at the beginning of the key space

    # -- registration ------------------------------------------------------------------------
    def _register(self, objects: list[ObjectInfo]) -> None:
        batch: list[_Candidate] = []
        for o in objects:
            cand = store_candidate(o.key, o.etag, o.size)
            if isinstance(cand, str):
                self.result.skipped.add(PurePosixPath(o.key).name, cand)
                continue
            batch.append(cand)
        for i in range(0, len(batch), _BATCH):
            res = IngestResult()
            _register_batch(self.ctx, batch[i:i + _BATCH], self.build_id, None, res)
            self.result.add(res)

    def _save(self, resume_after: str | None, segments: list[tuple[str, list[ObjectInfo]]] = (),
              watermark: str | None = None, finished: bool = False) -> None:
        """One transaction: the segments just registered and where the pass stands."""
        now = utcnow()
        with session_scope(self.ctx.sessions) as s:
            if segments:
                rows = [{"source": self.source, "lower_key": low, "objects": len(objs), "digest": digest(objs)}
                        for low, objs in segments]
                stmt = _insert(s, ListingSegment).values(rows)
                s.execute(stmt.on_conflict_do_update(
                    index_elements=[ListingSegment.source, ListingSegment.lower_key],
                    set_={"objects": stmt.excluded.objects, "digest": stmt.excluded.digest}))
            values: dict[str, Any] = {"source": self.source, "resume_after": resume_after, "updated_at": now,
                                      "passes": 1 if finished else 0}
            if watermark is not None:
                values["watermark"] = watermark
            stmt = _insert(s, ListingProgress).values(**values)
            set_: dict[str, Any] = {"resume_after": stmt.excluded.resume_after, "updated_at": now}
            if watermark is not None:
                set_["watermark"] = stmt.excluded.watermark
            if finished:
                set_["passes"] = ListingProgress.passes + 1
            s.execute(stmt.on_conflict_do_update(index_elements=[ListingProgress.source], set_=set_))
        self.last_checkpoint = time.monotonic()

    def _out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    # -- date-partitioned prefixes: list after the watermark ---------------------------------------
    def by_watermark(self) -> None:
        start = None if self.full else self.watermark
        page: list[ObjectInfo] = []
        for o in self.ctx.store.list(self.prefix, start_after=start):
            self.result.listed += 1
            page.append(o)
            if len(page) >= SEGMENT:
                self._register(page)
                self._save(None, watermark=page[-1].key)
                page = []
                if self._out_of_time():
                    self.result.complete = False
                    return
        if page:
            self._register(page)
        self._save(None, watermark=page[-1].key if page else None, finished=True)

    # -- any prefix: segments and digests --------------------------------------------------------
    def by_segments(self) -> None:
        resume = self.resume_after
        # In a resumed pass, the segment the previous run stopped inside is only partly listed:
        # its objects are registered but its digest is left for the next whole pass.
        partial = bisect.bisect_right(self.bounds, resume) - 1 if resume else -1
        current, group = -2, []
        for o in self.ctx.store.list(self.prefix, start_after=resume):
            self.result.listed += 1
            idx = bisect.bisect_right(self.bounds, o.key) - 1
            if idx != current:
                if group and not self._finish(current, group, partial):
                    return
                current, group = idx, []
            group.append(o)
            # A segment that grew is cut: its first SEGMENT keys stay, the rest starts a new
            # one. The last segment (open-ended: where keys are appended) is cut at SEGMENT,
            # the others at twice that.
            if len(group) > (SEGMENT if current == len(self.bounds) - 1 else 2 * SEGMENT):
                head, group = group[:SEGMENT], group[SEGMENT:]
                if not self._finish(current, head, partial):
                    return
                self._split_at(group[0].key)
                current = bisect.bisect_right(self.bounds, group[0].key) - 1
        if group and not self._finish(current, group, partial):
            return
        self._save(None, finished=True)

    def _split_at(self, key: str) -> None:
        if key not in self.digests:
            bisect.insort(self.bounds, key)
            self.digests[key] = ""

    def _finish(self, idx: int, group: list[ObjectInfo], partial: int) -> bool:
        """Settle one segment's objects; False when the pass must stop here (out of time)."""
        low = self.bounds[idx]
        if idx == partial:
            self._register(group)
            self._save(group[-1].key)
        elif not self.full and self.digests.get(low) == digest(group):
            self.result.unchanged += len(group)
            if time.monotonic() - self.last_checkpoint >= CHECKPOINT_S:
                self._save(group[-1].key)
        else:
            self._changed(low, group)
        if self._out_of_time():
            self._save(group[-1].key)
            self.result.complete = False
            return False
        return True

    def _changed(self, low: str, group: list[ObjectInfo]) -> None:
        self._register(group)
        self.result.segments_changed += 1
        self.digests[low] = digest(group)
        self._save(group[-1].key, [(low, group)])


def forget(ctx: Context, prefix: str) -> None:
    """Drop what the listing remembers of a prefix (the next pass compares everything)."""
    source = source_of(prefix)
    with session_scope(ctx.sessions) as s:
        s.execute(delete(ListingSegment).where(ListingSegment.source == source))
        s.execute(delete(ListingProgress).where(ListingProgress.source == source))

"""The scheduled listing remembers what it has seen: a run with nothing new does no
database work per object, a run with new objects registers exactly those, and a pass
stopped by its time budget or killed continues where it stopped (PostgreSQL, S3 server)."""
from __future__ import annotations

import pytest
from sqlalchemy import event, func, select

from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.models import Duplicate, ListingProgress, Video
from opensubject_tasks.services import listing
from opensubject_tasks.services.listing import list_and_register

PREFIX = "raw/"


@pytest.fixture()
def ctx(pg_db, s3_store_settings, monkeypatch):
    monkeypatch.setattr(listing, "SEGMENT", 10)   # segments of 10 keys: many segments from few objects
    c = Context.from_settings(load_settings(database_url=pg_db, store=s3_store_settings.model_dump()))
    upgrade(c.engine)
    yield c
    c.engine.dispose()


class Counter:
    """Database statements and objects listed during a block."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.statements, self.listed_keys = ctx, 0, []
        event.listen(ctx.engine, "before_cursor_execute", self._count)
        inner = ctx.store.list

        def counted(prefix="", start_after=None):  # noqa: ANN001, ANN202
            for o in inner(prefix, start_after=start_after):
                self.listed_keys.append(o.key)
                yield o
        ctx.store.list = counted

    def _count(self, *a, **k) -> None:  # noqa: ANN002, ANN003
        self.statements += 1

    def reset(self) -> None:
        self.statements, self.listed_keys = 0, []


def put(ctx: Context, i: int, body: str | None = None) -> None:
    ctx.store.put_bytes(f"{PREFIX}{i // 50:03d}/v{i:05d}.mp4", (body or f"video {i}").encode(), "video/mp4")


def videos(ctx: Context) -> int:
    with session_scope(ctx.sessions) as s:
        return int(s.scalar(select(func.count(Video.id))))


def test_nothing_new_costs_list_calls_only_and_new_objects_register_exactly(ctx):
    for i in range(0, 400, 2):
        put(ctx, i)
    ctx.store.put_bytes(f"{PREFIX}notes.txt", b"not a video")
    c = Counter(ctx)
    first = list_and_register(ctx, PREFIX)
    assert (first.new, first.known, first.listed, first.unchanged) == (200, 0, 201, 0)
    assert first.skipped.counts == {"not a video file name": 1} and first.complete

    c.reset()
    again = list_and_register(ctx, PREFIX)
    assert (again.new, again.known, again.unchanged, again.listed) == (0, 0, 201, 201)
    assert again.segments_changed == 0
    # two reads (where the pass stands, the segments) and one write (the pass finished):
    # nothing per object or per segment
    assert c.statements <= 4, c.statements

    c.reset()
    for i in range(1, 400, 40):   # 10 new objects spread over the key space
        put(ctx, i)
    put(ctx, 0, "video 0 overwritten")  # a new version at a known key
    put(ctx, 1000, "video 2")           # a copy of a registered video's bytes
    third = list_and_register(ctx, PREFIX)
    assert third.new == 11 and third.duplicates == 1 and third.replaced == 1
    # every listed object accounted for; only the segments with a change were compared
    assert third.listed == (third.unchanged + third.new + third.known + third.duplicates
                            + len(third.skipped))
    assert third.segments_changed <= 12 and third.unchanged >= 201 - 12 * 2 * listing.SEGMENT
    assert videos(ctx) == 211
    with session_scope(ctx.sessions) as s:
        assert s.scalar(select(func.count(Duplicate.id))) == 1
    assert list_and_register(ctx, PREFIX).segments_changed == 0


def test_a_pass_out_of_time_continues_where_it_stopped(ctx, monkeypatch):
    for i in range(300):
        put(ctx, i)
    c = Counter(ctx)
    clock = iter(range(10**6))
    monkeypatch.setattr(listing.time, "monotonic", lambda: float(next(clock)))
    part = list_and_register(ctx, PREFIX, budget_s=40)     # stops after a few segments
    assert not part.complete and 0 < part.new < 300
    first_keys = list(c.listed_keys)
    c.reset()
    rest = list_and_register(ctx, PREFIX, budget_s=10**9)
    assert rest.complete and part.new + rest.new == 300 and videos(ctx) == 300
    # the second run listed after the last key the first one finished, nothing before it
    assert min(c.listed_keys) > max(first_keys[: part.new])
    assert len(first_keys) + len(c.listed_keys) <= 300 + 2 * listing.SEGMENT
    with session_scope(ctx.sessions) as s:
        prog = s.get(ListingProgress, listing.source_of(PREFIX))
        assert prog.resume_after is None and prog.passes == 1


def test_a_killed_pass_resumes_from_its_checkpoint(ctx):
    for i in range(300):
        put(ctx, i)
    inner = ctx.store.list

    def dies_after(n):  # noqa: ANN001, ANN202
        def listing_(prefix="", start_after=None):  # noqa: ANN001, ANN202
            for k, o in enumerate(inner(prefix, start_after=start_after)):
                if k == n:
                    raise SystemExit("worker killed")
                yield o
        return listing_

    ctx.store.list = dies_after(155)
    with pytest.raises(SystemExit):
        list_and_register(ctx, PREFIX)
    done = videos(ctx)
    assert 140 <= done <= 155
    c = Counter(ctx)
    ctx.store.list = inner
    c = Counter(ctx)
    res = list_and_register(ctx, PREFIX)
    assert res.complete and videos(ctx) == 300
    assert res.new == 300 - done and len(c.listed_keys) <= 300 - done + listing.SEGMENT


def test_date_partitioned_prefix_is_listed_after_its_watermark(ctx):
    ctx.settings.ingest.append_only_prefixes = [PREFIX]
    for i in range(100):
        put(ctx, i)
    c = Counter(ctx)
    assert list_and_register(ctx, PREFIX).new == 100
    c.reset()
    for i in range(100, 105):
        put(ctx, i)
    res = list_and_register(ctx, PREFIX)
    assert (res.new, res.listed) == (5, 5) and len(c.listed_keys) == 5
    c.reset()
    assert list_and_register(ctx, PREFIX).listed == 0
    assert list_and_register(ctx, PREFIX, full=True).known == 105

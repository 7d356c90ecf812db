"""Bucket notifications, event path and listing path together (PostgreSQL, S3 server).

moto sends no notifications: each test uploads the object to the S3 server and then
writes the event document MinIO would send for it (its S3 event JSON) into the table
MinIO's PostgreSQL target fills (``store_events``, the compose configuration). That is
the one part that cannot run here; everything after it is the production code.
"""
from __future__ import annotations

import pytest
from sqlalchemy import func, select

from opensubject_tasks.config import load_settings
from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope, upgrade
from opensubject_tasks.db.models import Duplicate, StoreEvent, Video
from opensubject_tasks.services.events import consume, publish, s3_event
from opensubject_tasks.services.listing import list_and_register

RAW = "raw/"


@pytest.fixture()
def ctx(pg_db, s3_store_settings):
    c = Context.from_settings(load_settings(database_url=pg_db, store=s3_store_settings.model_dump()))
    upgrade(c.engine)
    yield c
    c.engine.dispose()


class Sent(list):
    def __call__(self, stage: str, vid: str, task_id: str | None = None) -> None:
        self.append((stage, vid))


def upload(ctx: Context, key: str, body: bytes, notify: bool = True) -> None:
    """Put an object; with ``notify``, the event MinIO sends for it reaches the table."""
    ctx.store.put_bytes(key, body, "video/mp4")
    if notify:
        info = ctx.store.stat(key)
        publish(ctx, s3_event(ctx.settings.store.bucket, key, info.etag, info.size))


def rows(ctx: Context, model=Video, **where) -> int:  # noqa: ANN001
    with session_scope(ctx.sessions) as s:
        q = select(func.count()).select_from(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return int(s.scalar(q))


def test_notification_registers_and_hands_out_without_listing(ctx):
    ctx.store.list = lambda *a, **k: pytest.fail("the event path must not list")  # noqa: ARG005
    upload(ctx, f"{RAW}cam 1/clip one.mp4", b"video one")        # a key that needs URL-encoding
    upload(ctx, f"{RAW}clip-two.mp4", b"video two")
    upload(ctx, f"{RAW}readme.txt", b"text")                      # not a video name
    upload(ctx, "elsewhere/clip.mp4", b"video three")              # outside the watched prefix
    publish(ctx, {"not": "an event"})
    # a key no object of ours may have: counted, and it blocks nothing behind it
    publish(ctx, s3_event(ctx.settings.store.bucket, f"{RAW}../escape.mp4", "0123", 5))
    sent = Sent()
    res = consume(ctx, RAW, build_id="live", send=sent)
    assert (res.events, res.new, res.known, res.handed_out) == (6, 2, 0, 2)
    assert res.skipped.counts == {"not a video file name": 1, "outside the watched prefix": 1,
                                  "not an S3 event document": 1, "unsafe object key": 1}
    assert sorted(stage for stage, _ in sent) == ["curate", "curate"]
    with session_scope(ctx.sessions) as s:
        got = s.execute(select(Video.source_uri, Video.build_id, Video.queued_stage)).all()
    assert sorted(got) == [("store://raw/cam 1/clip one.mp4", "live", "curate"),
                           ("store://raw/clip-two.mp4", "live", "curate")]
    assert rows(ctx, StoreEvent) == 0            # consumed events are gone
    assert consume(ctx, RAW).events == 0


def test_duplicate_notification_registers_nothing_twice(ctx):
    upload(ctx, f"{RAW}a.mp4", b"video a")
    info = ctx.store.stat(f"{RAW}a.mp4")
    for _ in range(2):                            # delivered twice in one batch, and once more later
        publish(ctx, s3_event(ctx.settings.store.bucket, f"{RAW}a.mp4", info.etag, info.size))
    sent = Sent()
    first = consume(ctx, RAW, build_id="live", send=sent)
    publish(ctx, s3_event(ctx.settings.store.bucket, f"{RAW}a.mp4", info.etag, info.size))
    again = consume(ctx, RAW, build_id="live", send=sent)
    assert (first.new, first.known, again.new, again.known) == (1, 2, 0, 1)
    assert len(sent) == 1 and rows(ctx) == 1 and rows(ctx, Duplicate) == 0
    # the listing after it finds nothing new either
    listed = list_and_register(ctx, RAW)
    assert (listed.new, listed.known, listed.duplicates) == (0, 1, 0)


def test_overwrite_notification_is_a_new_version(ctx):
    upload(ctx, f"{RAW}a.mp4", b"first version")
    consume(ctx, RAW)
    upload(ctx, f"{RAW}a.mp4", b"second version, longer")
    upload(ctx, f"{RAW}copy.mp4", b"first version")          # the old bytes under another key
    res = consume(ctx, RAW)
    # the new version is a new video, the old row is retired, the old bytes elsewhere a duplicate
    assert (res.new, res.replaced, res.duplicates) == (1, 1, 1)
    assert rows(ctx) == 2 and rows(ctx, Video, state="rejected") == 1
    with session_scope(ctx.sessions) as s:
        reason = s.scalar(select(Video.reason).where(Video.state == "rejected"))
    assert "replaced by a new version" in reason


def test_lost_notification_is_picked_up_by_the_listing(ctx):
    upload(ctx, f"{RAW}a.mp4", b"video a")
    upload(ctx, f"{RAW}b.mp4", b"video b", notify=False)      # its event was lost
    assert consume(ctx, RAW).new == 1
    listed = list_and_register(ctx, RAW)
    assert (listed.new, listed.known) == (1, 1) and rows(ctx) == 2


def test_notifications_queue_down_the_listing_registers_everything(ctx):
    """No event arrives while the target is down; the listing registers every object. When
    the target comes back and MinIO replays its queued events, nothing is registered twice."""
    keys = [f"{RAW}{d}/v{i}.mp4" for d in ("2026-12-06", "2026-12-07") for i in range(5)]
    for i, key in enumerate(keys):
        upload(ctx, key, f"video {i}".encode(), notify=False)
    upload(ctx, f"{RAW}2026-12-07/copy.mp4", b"video 0", notify=False)
    listed = list_and_register(ctx, RAW)
    assert (listed.new, listed.duplicates, listed.listed) == (10, 1, 11)
    for key in [*keys, f"{RAW}2026-12-07/copy.mp4"]:          # the replay
        info = ctx.store.stat(key)
        publish(ctx, s3_event(ctx.settings.store.bucket, key, info.etag, info.size))
    res = consume(ctx, RAW, build_id="live", send=Sent())
    # the copy is recorded once (unique per source and video), every other object is known
    assert (res.new, res.known, res.handed_out) == (0, 10, 0)
    assert rows(ctx) == 10 and rows(ctx, Duplicate) == 1


def test_notification_from_s3_through_sqs(ctx, s3_server):
    """AWS's path, end to end on the S3 test server (moto implements S3 → SQS notifications):
    the bucket's rule sends object-created events under raw/ to an SQS queue; the forwarder
    moves them into the events table; the consumer registers them."""
    import boto3

    from opensubject_tasks.services.events import forward_sqs

    endpoint = f"http://{s3_server.endpoint}"
    aws = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "testkey",
           "aws_secret_access_key": "testsecret"}
    sqs, s3 = boto3.client("sqs", **aws), boto3.client("s3", **aws)
    bucket = ctx.settings.store.bucket
    ctx.store.put_bytes("raw/.keep", b"")          # the bucket exists
    queue_url = sqs.create_queue(QueueName=f"{bucket}-events")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [{
        "QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "raw/"}]}}}]})
    for i in range(3):
        upload(ctx, f"{RAW}sqs-{i}.mp4", f"video {i}".encode(), notify=False)   # S3 itself notifies
    upload(ctx, "other/x.mp4", b"not watched", notify=False)
    fwd = forward_sqs(ctx, queue_url, sqs, wait_s=0, until_empty=True)
    assert fwd["forwarded"] == 3, fwd
    res = consume(ctx, RAW, build_id="live", send=Sent())
    assert (res.new, res.handed_out) == (3, 3)
    assert forward_sqs(ctx, queue_url, sqs, wait_s=0, until_empty=True)["received"] == 0   # deleted once moved

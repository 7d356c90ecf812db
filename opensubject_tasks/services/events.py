"""Bucket notifications: new and overwritten objects reach the project without listing.

MinIO's PostgreSQL notification target (``format=access``) appends each bucket event to
the ``store_events`` table (sql/007_listing_and_events.sql) as the S3 event document
(``{"EventName": ..., "Key": "<bucket>/<key>", "Records": [...]}``, AWS's notification
structure). ``consume`` takes the rows in id order, a batch at a time
(``FOR UPDATE SKIP LOCKED``: two consumers never take the same rows), registers the objects
they name exactly as the listing does (identity ``etag:size``, from the event itself: no
store call), optionally hands the new videos of a build straight to the queues, and deletes
the rows. Delivery is at least once and registration is idempotent: an event delivered
twice, or for an object the listing registered already, registers nothing twice; a lost
event is found by the next scheduled listing (services/listing.py).

Only counts leave this module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

from sqlalchemy import Select, delete, func, insert, select

from opensubject_tasks.context import Context
from opensubject_tasks.db.engine import session_scope
from opensubject_tasks.db.hot_queries import hot_query
from opensubject_tasks.db.models import StoreEvent, Video, utcnow
from opensubject_tasks.services.handoff import Send, hand_out_videos
from opensubject_tasks.services.ingest import (
    _BATCH, IngestResult, Skipped, _Candidate, _ensure_build_exists, _register_batch, store_candidate,
)

CREATED = "ObjectCreated:"


@dataclass
class EventResult:
    """Counts of one consume call."""
    events: int = 0        # rows taken from the table
    objects: int = 0       # object records in them
    new: int = 0
    known: int = 0         # already registered (a repeated event, or the listing was first)
    duplicates: int = 0
    replaced: int = 0
    handed_out: int = 0
    skipped: Skipped = field(default_factory=Skipped)   # counts per reason, a few names each

    def skip(self, reason: str, name: str = "") -> None:
        self.skipped.add(name, reason)

    def to_dict(self) -> dict[str, Any]:
        return {"events": self.events, "objects": self.objects, "new": self.new, "known": self.known,
                "duplicates": self.duplicates, "replaced": self.replaced, "handed_out": self.handed_out,
                "skipped": dict(self.skipped.counts)}


def records(doc: Any, bucket: str, prefix: str, result: EventResult) -> list[_Candidate]:  # noqa: ANN401
    """The objects an S3 event document announces under ``bucket``/``prefix``; every other
    record is counted as skipped with its reason."""
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except ValueError:
            doc = None
    recs = doc.get("Records") if isinstance(doc, dict) else None
    if not isinstance(recs, list):
        result.skip("not an S3 event document")
        return []
    out = []
    for rec in recs:
        result.objects += 1
        try:
            name = str(rec.get("eventName", ""))
            s3 = rec["s3"]
            rec_bucket = s3["bucket"]["name"]
            obj = s3["object"]
            key = unquote_plus(obj["key"])     # S3 and MinIO send keys URL-encoded
            etag, size = str(obj.get("eTag") or obj.get("etag") or "").strip('"'), int(obj.get("size") or 0)
        except (KeyError, TypeError, ValueError, AttributeError):
            result.skip("malformed event record")
            continue
        if not name.removeprefix("s3:").startswith(CREATED):
            result.skip("not an object-created event", key)
        elif rec_bucket != bucket:
            result.skip("another bucket", key)
        elif not key.startswith(prefix):
            result.skip("outside the watched prefix", key)
        else:
            cand = store_candidate(key, etag, size)
            if isinstance(cand, str):
                result.skip(cand, key)
            else:
                out.append(cand)
    return out


def consume(ctx: Context, prefix: str, build_id: str | None = None, send: Send | None = None,
            max_batches: int | None = None) -> EventResult:
    """Register the objects of the pending events under ``prefix``, a batch of rows at a time,
    until none is left (or ``max_batches``). With ``build_id``, new videos join that build;
    with ``send`` too, they are handed to ``curate`` at once (recorded first, as every
    hand-out)."""
    result = EventResult()
    bucket = ctx.settings.store.bucket
    if build_id is not None:
        _ensure_build_exists(ctx, build_id)
    batches = 0
    while max_batches is None or batches < max_batches:
        batches += 1
        with session_scope(ctx.sessions) as s:
            rows = s.execute(select(StoreEvent.id, StoreEvent.event_data).order_by(StoreEvent.id)
                             .limit(_BATCH).with_for_update(skip_locked=True)).all()
            if not rows:
                break
            result.events += len(rows)
            seen: set[tuple[str, str]] = set()
            batch = []
            for r in rows:
                for c in records(r.event_data, bucket, prefix, result):
                    if (c.content_hash, c.source_uri) in seen:   # the same version announced twice
                        result.known += 1
                        continue
                    seen.add((c.content_hash, c.source_uri))
                    batch.append(c)
            if batch:
                res = IngestResult()
                _register_batch(ctx, batch, build_id, None, res)
                result.new += len(res.new_ids)
                result.known += len(res.known_ids)
                result.duplicates += len(res.duplicates)
                result.replaced += len(res.replaced)
                if build_id is not None and send is not None:
                    result.handed_out += _hand_out(ctx, build_id, res.new_ids + res.known_ids, send)
            # The rows go only once their objects are registered (and handed out): a consumer
            # that dies before this line leaves them to the next one.
            s.execute(delete(StoreEvent).where(StoreEvent.id.in_([r.id for r in rows])))
    return result


def _hand_out(ctx: Context, build_id: str, ids: list[str], send: Send) -> int:
    """Hand to curate the build's videos among ``ids`` that were never handed out (also those a
    consumer that died registered but did not hand out)."""
    with session_scope(ctx.sessions) as s:
        todo = list(s.scalars(never_handed_out(build_id, ids)))
    return len(hand_out_videos(ctx, "curate", todo, send))


@hot_query("event batch", lambda f: {"build_id": f.build, "ids": f.video_ids})
def never_handed_out(build_id: str, ids: list[str]) -> Select:
    """Which of a batch's registered videos the build has not handed out yet."""
    return (select(Video.id).where(Video.id.in_(ids), Video.build_id == build_id,
                                   Video.state == "registered", Video.queued_at.is_(None))
            .order_by(Video.id))


def pending(ctx: Context) -> int:
    """The id of the newest event waiting (0: none); one index lookup."""
    with session_scope(ctx.sessions) as s:
        return int(s.scalar(select(func.max(StoreEvent.id))) or 0)


def publish(ctx: Context, doc: dict[str, Any], event_time: datetime | None = None) -> None:
    """Append an event document as MinIO's PostgreSQL target does
    (``INSERT INTO store_events (event_time, event_data)``)."""
    with session_scope(ctx.sessions) as s:
        s.execute(insert(StoreEvent).values(event_time=event_time or utcnow(), event_data=doc))


def s3_event(bucket: str, key: str, etag: str, size: int, name: str = "s3:ObjectCreated:Put") -> dict[str, Any]:
    """The event document MinIO sends for one object (AWS's notification structure, with
    MinIO's ``EventName`` and ``Key``); the key URL-encoded as S3 does."""
    from urllib.parse import quote_plus

    return {"EventName": name, "Key": f"{bucket}/{key}", "Records": [{
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": utcnow().isoformat(),
        "eventName": name, "userIdentity": {"principalId": "opensubject"},
        "requestParameters": {"region": ""}, "responseElements": {},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "opensubject"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": quote_plus(key, safe="/"), "size": size, "eTag": etag,
                          "contentType": "video/mp4", "sequencer": "0"}}}]}


def forward_sqs(ctx: Context, queue_url: str, client: Any, *, wait_s: int = 20,  # noqa: ANN401 - a boto3 SQS client
                until_empty: bool = False) -> dict[str, int]:
    """AWS S3 sends bucket notifications to an SQS queue: move them into ``store_events``,
    where the same trigger and consumer as MinIO's take them. Each received batch (up to 10
    messages, long-polled ``wait_s``) is inserted in one transaction and only then deleted
    from the queue (at least once; registration is idempotent). S3's ``s3:TestEvent`` (sent
    when the rule is created) is dropped. Runs until stopped, or with ``until_empty`` until a
    receive returns nothing. Returns counts."""
    counts = {"received": 0, "forwarded": 0, "test_events": 0}
    while True:
        msgs = client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                      WaitTimeSeconds=wait_s).get("Messages", [])
        if not msgs:
            if until_empty:
                return counts
            continue
        counts["received"] += len(msgs)
        docs = []
        for m in msgs:
            try:
                doc = json.loads(m["Body"])
            except ValueError:
                doc = {"unreadable": m["Body"][:200]}   # kept: the consumer counts it as skipped
            if isinstance(doc, dict) and doc.get("Event") == "s3:TestEvent":
                counts["test_events"] += 1
                continue
            docs.append(doc)
        if docs:
            now = utcnow()
            with session_scope(ctx.sessions) as s:
                s.execute(insert(StoreEvent), [{"event_time": now, "event_data": d} for d in docs])
            counts["forwarded"] += len(docs)
        client.delete_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])

"""Upload → queued through the event path, with the real Airflow components (as in
tests/test_scale.py): ``scheduler`` (LocalExecutor), ``dag-processor``, ``triggerer`` and
``api-server`` on a PostgreSQL metadata database, Redis as the broker, the S3 test server.

The trigger of ``opensubject_events``' asset watcher runs in the triggerer and watches the
table MinIO's PostgreSQL target fills. moto sends no notifications, so after each upload
the test writes the event document MinIO would send into that table (the one part that
cannot run here). No listing runs: ``opensubject_ingest`` stays paused and the listing's
progress table stays empty. Each video must be registered and on the broker within 60 s of
its upload; the seconds are printed.
"""
from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from airflow_fixtures import service_env, use_services
from airflow_stack import AirflowStack, pg_database, wait_for

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url, s3_server):
    from opensubject_tasks.config import StoreSettings

    work = tmp_path_factory.mktemp("events")
    store_settings = StoreSettings(kind="minio", endpoint=s3_server.endpoint, access_key="testkey",
                                   secret_key="testsecret", bucket=f"events-{uuid.uuid4().hex[:8]}")
    with pg_database("os_events_airflow") as af_url, pg_database("os_events_data") as data_url:
        env = service_env(data_url, redis_url, store_settings,
                          OPENSUBJECT_EVENTS_BUILD="live", OPENSUBJECT_EVENTS_POLL_S="1",
                          AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="5",
                          # this checkout's package and the tests' helpers, in every component
                          PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)]))
        with pytest.MonkeyPatch.context() as mp:
            use_services(env, mp, migrate=True)
            airflow = AirflowStack(work, af_url, env).start()
            try:
                airflow.wait_parsed("opensubject_events")
                yield {"airflow": airflow, "af_url": af_url, "store_settings": store_settings}
            finally:
                airflow.stop()


def _watcher_running(af_url: str) -> bool:
    from sqlalchemy import create_engine, text

    eng = create_engine(af_url)
    try:
        with eng.connect() as c:
            return bool(c.execute(text(
                "SELECT count(*) FROM trigger WHERE classpath LIKE '%StoreEventsTrigger' "
                "AND triggerer_id IS NOT NULL")).scalar())
    finally:
        eng.dispose()


def test_notification_upload_is_queued_within_a_minute_through_scheduler_and_triggerer(stack):
    from sqlalchemy import func, select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import ListingProgress, StoreEvent, Video
    from opensubject_tasks.orchestrate import context
    from opensubject_tasks.services.events import publish, s3_event
    from opensubject_tasks.tasks import waiting_in_broker

    airflow = stack["airflow"]
    airflow.unpause("opensubject_events")
    t0 = time.monotonic()
    wait_for("the asset watcher's trigger in the triggerer", lambda: _watcher_running(stack["af_url"]), 180, 1)
    print(f"\nwatcher running {time.monotonic() - t0:.0f} s after the unpause")
    ctx = context()
    bucket = stack["store_settings"].bucket
    latencies: dict[str, float] = {}
    for wave in range(2):            # a second wave after the first was handled: the trigger fires again
        uploaded: dict[str, datetime] = {}
        for i in range(3):
            key = f"raw/wave{wave}/clip-{i}.mp4"
            ctx.store.put_bytes(key, f"video {wave} {i}".encode(), "video/mp4")
            uploaded[f"store://{key}"] = datetime.now(UTC)
            info = ctx.store.stat(key)
            publish(ctx, s3_event(bucket, key, info.etag, info.size))

        def queued(uploaded=uploaded):  # noqa: ANN001, ANN202
            with session_scope(ctx.sessions) as s:
                got = dict(s.execute(select(Video.source_uri, Video.queued_at)
                                     .where(Video.source_uri.in_(list(uploaded)), Video.queued_at.is_not(None))).all())
            return got if len(got) == len(uploaded) else None

        got = wait_for(f"wave {wave} queued", queued, 120, 0.5)
        for uri, at in got.items():
            latencies[uri] = (at - uploaded[uri]).total_seconds()
        print(f"wave {wave}: upload -> queued " + ", ".join(f"{latencies[u]:.1f} s" for u in sorted(got)))
        # the next wave only after this run has ended: it must come through a new firing
        wait_for(f"wave {wave}'s run ended", lambda w=wave: len(runs := airflow.runs("opensubject_events")) == w + 1
                 and all(r["state"] == "success" for r in runs), 120, 0.5)
    assert all(0 < s < 60 for s in latencies.values()), latencies

    with session_scope(ctx.sessions) as s:
        assert s.scalar(select(func.count()).select_from(ListingProgress)) == 0   # no listing ran
        assert s.scalar(select(func.count()).select_from(StoreEvent)) == 0        # every event consumed
        videos = s.execute(select(Video.id, Video.build_id, Video.queued_stage)).all()
    assert len(videos) == 6 and {(b, q) for _, b, q in videos} == {("live", "curate")}
    held = waiting_in_broker()
    assert held is not None and {v.id for v in videos} <= {e for _, e in held}   # on the broker
    runs = airflow.runs("opensubject_events")
    assert len(runs) == 2 and {r["run_type"] for r in runs} == {"asset_triggered"}
    print(f"opensubject_events runs: {len(runs)}; latencies max {max(latencies.values()):.1f} s, "
          f"mean {sum(latencies.values()) / len(latencies):.1f} s")

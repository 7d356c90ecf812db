"""The ``scale`` stack of the tests that build through the real Airflow components: a
``scheduler`` with the LocalExecutor, ``dag-processor``, ``triggerer`` and ``api-server`` on a
PostgreSQL metadata database, a Celery worker and the S3 test server, all separate processes
(module-scoped: each test file that uses it starts its own, so files run side by side)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from airflow_fixtures import service_env, use_services
from airflow_stack import AirflowStack, celery_worker, pg_database

MAP_LENGTH = 8
SETTINGS = {"OPENSUBJECT_CURATE__MIN_SHORT_SIDE": "64", "OPENSUBJECT_MINE__MAX_PAIRS_PER_SUBJECT": "1",
            "OPENSUBJECT_VERIFY__MAX_ATTEMPTS": "2"}
WIDE = (192, 108)  # the size of the video the test backend fails on


@pytest.fixture(scope="module")
def scale(tmp_path_factory, redis_url, s3_server):
    from opensubject_tasks.config import StoreSettings
    from opensubject_tasks.storage import make_store

    work = tmp_path_factory.mktemp("scale")
    flag = work / "fail-flag"
    store_settings = StoreSettings(kind="minio", endpoint=s3_server.endpoint, access_key="testkey",
                                   secret_key="testsecret", bucket=f"scale-{uuid.uuid4().hex[:8]}")
    with pg_database("os_scale_airflow") as af_url, pg_database("os_scale_data") as data_url:
        env = service_env(data_url, redis_url, store_settings, **SETTINGS,
                          OPENSUBJECT_BACKENDS__QUALITY="fail_wide",
                          OPENSUBJECT_TEST_FAIL_WIDTH=str(WIDE[0]), OPENSUBJECT_TEST_FAIL_FLAG=str(flag),
                          OPENSUBJECT_CELERY__MAX_RETRIES="1", OPENSUBJECT_CELERY__RETRY_BACKOFF_S="0.2",
                          OPENSUBJECT_CELERY__POLL_INTERVAL_S="1", OPENSUBJECT_CELERY__TRIGGER_MIN_WAIT_S="5",
                          OPENSUBJECT_FAILURE_NOTIFY=(work / "notify.jsonl").as_uri(),
                          OPENSUBJECT_MAX_ACTIVE_CHUNKS="4",
                          AIRFLOW__CORE__MAX_MAP_LENGTH=str(MAP_LENGTH),
                          PYTHONPATH=str(Path(__file__).parent))
        # this process reads the same database and store as the stack
        with pytest.MonkeyPatch.context() as mp:
            use_services(env, mp, migrate=True)
            stack = AirflowStack(work, af_url, env).start()
            worker = celery_worker(env, work / "worker.log", "scale", concurrency=2, include="fickle_backend")
            try:
                stack.wait_parsed("opensubject_build", "opensubject_ingest")
                yield {"stack": stack, "worker": worker, "store": make_store(store_settings), "flag": flag,
                       "work": work, "store_settings": store_settings}
            finally:
                worker.stop()
                stack.stop()


def upload_videos(store, paths, prefix: str) -> None:  # noqa: ANN001
    for p in paths:
        store.put_file(f"{prefix}/{p.name}", p, "video/mp4")


def attempt_counts(ctx) -> dict[str, int]:  # noqa: ANN001
    from sqlalchemy import func, select

    from opensubject_tasks.db.engine import session_scope
    from opensubject_tasks.db.models import StageAttempt

    with session_scope(ctx.sessions) as s:
        return dict(s.execute(select(StageAttempt.entity_id, func.count())
                              .where(StageAttempt.entity_type.in_(("video", "sample")))
                              .group_by(StageAttempt.entity_id)).all())

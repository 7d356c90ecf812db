"""DAG integrity: the files in dags/ parse cleanly, fast, offline and without heavy imports,
and every DAG carries what operating it needs (tags, retries, no catchup, typed params)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from airflow_fixtures import AIRFLOW_ENV, REPO

DAG_IDS = {"opensubject_build", "opensubject_events", "opensubject_ingest", "opensubject_reconcile"}
# Modules a DAG file must not pull in when it is parsed: models, media, the database and
# store clients, Celery. They belong in the tasks (imported when a task runs).
HEAVY = ("torch", "transformers", "diffusers", "cv2", "av", "scenedetect", "skimage", "numpy",
         "celery", "kombu", "minio", "psycopg2", "webdataset", "pyarrow",
         "opensubject_tasks.services", "opensubject_tasks.backends", "opensubject_tasks.steps", "opensubject_tasks.export",
         "opensubject_tasks.tasks", "opensubject_tasks.celery_app")

# Runs in a fresh interpreter: parses dags/ with every socket connection refused and no
# OPENSUBJECT_* setting, and reports what parsing imported and how long each file took.
PARSE_SCRIPT = r"""
import json, socket, sys, time
def refuse(*a, **k):
    raise OSError("network access while parsing DAGs")
socket.socket.connect = refuse
socket.create_connection = refuse
import airflow.sdk  # noqa: F401  (Airflow itself, the baseline)
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator  # noqa: F401
from airflow.dag_processing.dagbag import DagBag
before = set(sys.modules)
t0 = time.perf_counter()
bag = DagBag(sys.argv[1])
total = time.perf_counter() - t0
dags = {}
for dag_id, dag in bag.dags.items():
    dags[dag_id] = {
        "tags": sorted(dag.tags), "catchup": dag.catchup, "schedule": str(dag.schedule),
        "default_retries": dag.default_args.get("retries"),
        "tasks": {t.task_id: {"retries": t.retries} for t in dag.tasks},
        "params": {k: dag.params.get_param(k).schema for k in dag.params},
    }
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "imported": sorted(set(sys.modules) - before),
    "total_s": total,
    "stats": [{"file": s.file, "duration_s": s.duration.total_seconds() if hasattr(s.duration, "total_seconds") else s.duration} for s in bag.dagbag_stats],
    "dags": dags,
}))
"""


def _parse(extra_env: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSUBJECT_")}
    env.update(AIRFLOW_ENV)
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, "-c", PARSE_SCRIPT, str(REPO / "dags")], env=env,
                         capture_output=True, text=True, timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def parsed() -> dict:
    return _parse()


def test_dags_parse_without_errors_offline(parsed):
    assert parsed["errors"] == {}
    assert set(parsed["dags"]) == DAG_IDS


def test_no_heavy_imports_at_parse_time(parsed):
    heavy = [m for m in parsed["imported"] if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == [], f"DAG files imported {heavy} at parse time"


def test_parse_time(parsed):
    # Airflow re-parses every file every 30 s by default; a file should take a small
    # fraction of that. Measured here: well under a second each.
    slow = [s for s in parsed["stats"] if s["duration_s"] > 3.0]
    assert parsed["stats"] and not slow, slow


def test_every_dag_has_tags_no_catchup_and_retries(parsed):
    for dag_id, d in parsed["dags"].items():
        assert "opensubject" in d["tags"], dag_id
        assert d["catchup"] is False, dag_id
        assert (d["default_retries"] or 0) >= 1, dag_id
        # Only the watcher, which exists to fail the run, does not retry.
        no_retry = {t for t, v in d["tasks"].items() if v["retries"] < 1}
        assert no_retry <= {"watch"}, (dag_id, no_retry)


def test_build_dag_has_typed_params(parsed):
    params = parsed["dags"]["opensubject_build"]["params"]
    expected = {"build_name": ["null", "string"], "source": ["null", "string"], "profile": "string",
                "limit": "integer", "video_ids": ["null", "array"], "until": "string", "export": "boolean",
                "chunk_size": "integer"}
    assert {k: v.get("type") for k, v in params.items()} == expected
    assert params["profile"]["enum"] == ["cpu", "gpu", "small", "tiny"]
    assert params["until"]["enum"] == ["curate", "mine", "verify"]
    assert params["limit"]["minimum"] == 0 and params["chunk_size"]["minimum"] == 0


@pytest.mark.usefixtures("airflow_db")
def test_no_cycles_and_expected_structure():
    from airflow_fixtures import load_dag

    dag = load_dag("opensubject_build")
    order = [t.task_id for t in dag.topological_sort()]  # raises on a cycle
    assert order.index("start") < order.index("claim") < order.index("chunk") \
        < order.index("export") < order.index("report")
    # One mapped task over chunks (not a group per video), all active at once: the bound is
    # on videos in flight, not on chunks.
    chunk = dag.get_task("chunk")
    assert chunk.max_active_tis_per_dagrun is None
    assert dag.get_task("export_part").max_active_tis_per_dagrun == 16
    assert len(dag.tasks) == 10, [t.task_id for t in dag.tasks]
    # The export is split too: its plan, a mapped task over its parts, the finish.
    assert order.index("chunk") < order.index("export_plan") < order.index("export_part") < order.index("export")
    assert dag.get_task("export_part").operator_class.__name__ == "CeleryTaskOperator"
    # Work runs on Celery through deferrable operators, never inside the Airflow worker.
    assert chunk.operator_class.__name__ == "ChunkOperator"
    for tid in ("export", "register"):
        assert hasattr(dag.get_task(tid), "execute_complete"), tid
    # The watcher sees every working task, so a failure anywhere turns the run red.
    assert {"chunk", "export_plan", "export_part", "export", "register", "claim"} \
        <= dag.get_task("watch").upstream_task_ids
    # The export publishes the dataset asset a training DAG can be scheduled on.
    assert [a.name for a in dag.get_task("export").outlets] == ["opensubject_dataset"]


@pytest.mark.usefixtures("airflow_db")
def test_the_export_skips_runs_that_stop_before_verify():
    """As the embedded runner: a run up to curate or mine has no sample to export, so the
    export's steps skip, saying why; the form's switch still turns it off for a full run."""
    from airflow_fixtures import load_dag

    dag = load_dag("opensubject_build")
    for tid in ("export_plan", "export"):
        step = dag.get_task(tid)
        for until in ("curate", "mine"):
            assert "nothing to export" in step.skip_reason({"params": {"until": until, "export": True}})
        assert "switched off" in step.skip_reason({"params": {"until": "verify", "export": False}})
        assert step.skip_reason({"params": {"until": "verify", "export": True}}) is None
    assert dag.get_task("register").skip_reason({"params": {"until": "curate"}}) is None


def test_schedules_default_and_configurable(parsed):
    assert parsed["dags"]["opensubject_ingest"]["schedule"] == "@hourly"
    assert parsed["dags"]["opensubject_reconcile"]["schedule"] == "*/15 * * * *"
    assert parsed["dags"]["opensubject_build"]["schedule"] == "None"  # manual only
    # new objects: an asset whose watcher reads the bucket-notification table
    assert "opensubject_store_events" in parsed["dags"]["opensubject_events"]["schedule"]
    assert parsed["dags"]["opensubject_events"]["params"]["build"]["type"] == "string"
    custom = _parse({"OPENSUBJECT_INGEST_SCHEDULE": "*/5 * * * *"})
    assert custom["dags"]["opensubject_ingest"]["schedule"] == "*/5 * * * *"


def test_triggers_import_from_plugins_folder_alone(tmp_path):
    """The triggerer does not parse DAG files: the trigger classes must import from the
    plugins folder (on sys.path in every Airflow process) and survive serialization."""
    script = r"""
import importlib, sys
sys.path = [p for p in sys.path if not p.rstrip('/').endswith('dags')]
sys.path.insert(0, sys.argv[1])
from opensubject_airflow.triggers import ChunkTrigger, StoreEventsTrigger, TaskOutcomeTrigger
from airflow.triggers.base import BaseEventTrigger
assert issubclass(StoreEventsTrigger, BaseEventTrigger)
for t in (TaskOutcomeTrigger("abc", 1.0, 5.0), ChunkTrigger("b1", 3, 2.0, 0.0), StoreEventsTrigger(2.0)):
    path, kwargs = t.serialize()
    mod, _, name = path.rpartition(".")
    again = getattr(importlib.import_module(mod), name)(**kwargs)
    assert again.serialize() == (path, kwargs), (path, kwargs)
print("ok")
"""
    env = {**os.environ, **AIRFLOW_ENV}
    out = subprocess.run([sys.executable, "-c", script, str(REPO / "plugins")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

"""docker-compose.yml checked against the code (no Docker engine needed): every service's
command, build context and environment must name things that exist."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from airflow_fixtures import REPO

COMPOSE = REPO / "docker-compose.yml"
LONG_RUNNING = {"postgres", "redis", "minio", "airflow-apiserver", "airflow-scheduler",
                "airflow-dag-processor", "airflow-triggerer", "worker-cpu", "worker-gpu", "worker-maintenance",
                "flower"}
WORKERS = ("worker-cpu", "worker-gpu", "worker-maintenance")
ONE_SHOT = {"minio-init", "airflow-init"}
AIRFLOW_COMMANDS = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                    "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    pairs = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _argv(service: dict[str, Any]) -> list[str]:
    """The command as it runs with .env.example's defaults (${VAR:-default} -> default)."""
    cmd = service.get("command") or []
    argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    return [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in argv]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def test_the_stack_is_complete(services):
    assert LONG_RUNNING | ONE_SHOT <= set(services)


def test_every_long_running_service_has_a_healthcheck(services):
    for name in LONG_RUNNING:
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no healthcheck"


def test_depends_on_waits_for_health(services):
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            wanted = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond == {"condition": wanted}, (name, dep, cond)
    # Nothing that uses the databases, broker or store starts before they are ready.
    for name in LONG_RUNNING - {"postgres", "redis", "minio"}:
        deps = services[name]["depends_on"]
        assert {"postgres", "redis"} <= set(deps), name


def test_build_context_and_dockerfile_copy_what_exists(services):
    built = [n for n, s in services.items() if "build" in s]
    assert set(AIRFLOW_COMMANDS) | {*WORKERS, "flower", "airflow-init"} <= set(built)
    for name in built:
        build = services[name]["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (REPO / context / "Dockerfile").is_file(), name
    dockerfile = (REPO / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    for arg in re.findall(r"--build-arg (\w+)", (REPO / "Dockerfile").read_text()):
        assert f"ARG {arg}" in dockerfile
    gpu_args = services["worker-gpu"]["build"].get("args", {})
    for arg in gpu_args:
        assert f"ARG {arg}" in dockerfile, arg


def test_celery_workers_consume_real_queues_and_tasks(services):
    from opensubject_tasks.catalogue import QUEUES, STAGES
    from opensubject_tasks.celery_app import app, queue_for

    import opensubject_tasks.tasks  # noqa: F401 - registers the tasks

    consumed: set[str] = set()
    for name in (*WORKERS, "flower"):
        argv = _argv(services[name])
        assert argv[:3] == ["celery", "-A", "opensubject_tasks.celery_app"], name
        module = __import__(argv[2], fromlist=["app"])
        assert module.app is app
        if "worker" in argv:
            queues = argv[argv.index("-Q") + 1].split(",")
            assert set(queues) <= set(QUEUES), (name, queues)
            consumed |= set(queues)
    assert consumed == set(QUEUES)
    # Without GPU workers the cpu worker can take both queues.
    raw = services["worker-cpu"]["command"]
    assert raw[raw.index("-Q") + 1] == "${CPU_WORKER_QUEUES:-cpu}"
    queue_of = {n: _argv(services[n])[_argv(services[n]).index("-Q") + 1] for n in WORKERS}
    assert queue_of == {"worker-cpu": "cpu", "worker-gpu": "gpu", "worker-maintenance": "maintenance"}
    # Every stage and task of the catalogue is a registered task whose queue a worker consumes;
    # maintenance work (ingest, reconcile) never waits behind a curate backlog.
    for stage in STAGES:
        assert f"opensubject.{stage}" in app.tasks, stage
        assert queue_for(stage) in consumed, stage
    assert queue_for("ingest") == queue_for("reconcile") == "maintenance"


def test_workers_are_warm_before_healthy_and_stop_after_their_longest_task(services):
    from opensubject_tasks.catalogue import STAGES
    from opensubject_tasks.config import Settings

    limits = Settings().celery
    for name in WORKERS:
        svc = services[name]
        assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "opensubject_tasks.workers", "--check"], name
        env = _env(svc)
        assert env["OPENSUBJECT_WORKER_READY_DIR"] and env["OPENSUBJECT_WORKER_CONCURRENCY"], name
        queue = _argv(svc)[_argv(svc).index("-Q") + 1]
        longest = max(limits.limits(s).hard_s for s, st in STAGES.items() if st.queue == queue)
        grace = svc["stop_grace_period"]
        assert grace.endswith("m") and int(grace[:-1]) * 60 >= longest, (name, grace, longest)


def test_the_services_use_their_own_roles_not_the_superusers(services, env_example):
    env = _env(services["worker-cpu"])
    assert "OPENSUBJECT_DB_USER" in env["OPENSUBJECT_DATABASE_URL"]
    assert "POSTGRES_PASSWORD" not in env["OPENSUBJECT_DATABASE_URL"]
    assert "AIRFLOW_DB_USER" in _env(services["airflow-scheduler"])["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["OPENSUBJECT_STORE__ACCESS_KEY"].startswith("${OPENSUBJECT_S3_ACCESS_KEY")
    assert "MINIO_ROOT" not in env["OPENSUBJECT_STORE__ACCESS_KEY"] + env["OPENSUBJECT_STORE__SECRET_KEY"]
    roles = (REPO / "deploy" / "postgres" / "00-roles.sh").read_text()
    assert "CREATE ROLE :\"app_user\"" in roles and "OWNER :\"app_user\"" in roles
    entry = " ".join(services["minio-init"]["entrypoint"])
    assert "mc admin user add" in entry and "mc admin policy attach" in entry
    assert env_example["MINIO_ROOT_USER"] != env_example["OPENSUBJECT_S3_ACCESS_KEY"]


def test_images_are_pinned(services):
    for name, svc in services.items():
        if "build" in svc:
            continue
        image = svc["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), (name, image)
    assert re.search(r"^FROM python:3\.11\.\d+-slim", (REPO / "Dockerfile").read_text(), re.M)


def test_gpu_worker_reserves_a_gpu_and_mounts_the_model_cache(services):
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert any(":/models" in v for v in gpu["volumes"])
    # the gpu profile's curation needs the aesthetic model on the cpu worker too
    assert any(":/models" in v for v in services["worker-cpu"]["volumes"])
    assert _env(services["worker-cpu"])["OPENSUBJECT_BACKENDS__DEVICE"] == "cpu"
    assert "HF_HOME=/models" in (REPO / "Dockerfile").read_text()


def test_airflow_services_run_the_right_components(services):
    from airflow.cli.cli_parser import get_parser

    parser = get_parser()
    for name, sub in AIRFLOW_COMMANDS.items():
        argv = _argv(services[name])
        assert argv[:2] == ["airflow", sub], name
        parser.parse_args(argv[1:])  # exits on an unknown command or flag
    env = _env(services["airflow-scheduler"])
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/opensubject/dags"
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == "/opt/opensubject/plugins"
    assert "COPY dags ./dags" in (REPO / "Dockerfile").read_text()
    assert "WORKDIR /opt/opensubject" in (REPO / "Dockerfile").read_text()


def _settings_field_exists(path: list[str]) -> bool:
    from pydantic import BaseModel

    from opensubject_tasks.config import Settings

    model: Any = Settings
    for i, part in enumerate(path):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        ann = fields[part].annotation
        if i < len(path) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            model = ann
    return True


def _code_reads(name: str) -> bool:
    for folder in ("dags", "plugins", "opensubject_tasks"):
        for f in (REPO / folder).rglob("*.py"):
            if name in f.read_text():
                return True
    return False


def test_env_var_names_are_real_settings(services):
    from airflow.configuration import conf

    seen = set()
    ours = {n: s for n, s in services.items() if "build" in s}  # the services running our image
    for name, svc in ours.items():
        for key in _env(svc):
            seen.add(key)
            if key.startswith("OPENSUBJECT_"):
                path = key[len("OPENSUBJECT_"):].lower().split("__")
                assert _settings_field_exists(path) or _code_reads(key), f"{name}: {key} is read by nothing"
            elif key.startswith("AIRFLOW__"):
                _, section, option = key.split("__", 2)
                described = conf.configuration_description.get(section.lower(), {}).get("options", {})
                assert option.lower() in described, f"{name}: {key} is no Airflow option"
    assert "OPENSUBJECT_DATABASE_URL" in seen and "AIRFLOW__API_AUTH__JWT_SECRET" in seen


def test_secrets_come_from_env_file_and_are_required(compose, services, env_example):
    text = COMPOSE.read_text()
    # ${VAR} is filled in by compose from .env; $${VAR} is left to the container's shell.
    referenced = set(re.findall(r"(?<!\$)\$\{(\w+)(?::[-?][^}]*)?\}", text))
    missing = referenced - set(env_example)
    assert not missing, f"compose uses variables .env.example does not document: {missing}"
    secret_keys = [k for k in env_example if re.search(r"PASSWORD|SECRET|FERNET", k)]
    assert len(secret_keys) >= 8
    for key in secret_keys:
        # no value to start with, and compose refuses to start without one: no default secret
        assert env_example[key] == "", f".env.example holds a value for {key}"
        assert re.search(r"\$\{" + key + r":\?", text), f"{key} is not required with ${{{key}:?...}}"
        assert not re.search(r"\$\{" + key + r":-", text), f"{key} has a default"
    for name, svc in services.items():
        for key, value in _env(svc).items():
            if re.search(r"PASSWORD(?!S_FILE)|SECRET|_KEY$|FERNET", key):
                assert "${" in value, f"{name}: {key} is written into the compose file"
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_postgres_roles_and_schema(services):
    vols = services["postgres"]["volumes"]
    assert "./deploy/postgres:/docker-entrypoint-initdb.d:ro" in vols
    assert sorted(p.name for p in (REPO / "sql").glob("*.sql"))
    init = services["airflow-init"]["command"][-1]
    assert "airflow db migrate" in init and "opensubject db upgrade" in init


def test_bucket_is_created(services):
    entry = " ".join(services["minio-init"]["entrypoint"])
    assert "mc mb --ignore-existing" in entry and "$${BUCKET}" in entry
    assert _env(services["minio-init"])["BUCKET"] == "${OPENSUBJECT_BUCKET:-opensubject}"
    env = _env(services["worker-cpu"])
    assert env["OPENSUBJECT_STORE__BUCKET"] == "${OPENSUBJECT_BUCKET:-opensubject}"


def test_compose_file_is_valid_yaml_with_named_volumes(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith((".", "/", "$")):
                assert src in compose["volumes"], (name, src)
    assert Path(REPO / "Dockerfile").read_text().count("USER ") >= 1


def test_minio_notification_target_and_event_rule(services):
    """New objects under raw/ reach store_events through MinIO's PostgreSQL target, as the
    role that may only append there; the bucket's event rule is made at start."""
    env = _env(services["minio"])
    assert env["MINIO_NOTIFY_POSTGRES_ENABLE_PRIMARY"] == "on"
    assert env["MINIO_NOTIFY_POSTGRES_TABLE_PRIMARY"] == "store_events"
    assert env["MINIO_NOTIFY_POSTGRES_FORMAT_PRIMARY"] == "access"
    conn = env["MINIO_NOTIFY_POSTGRES_CONNECTION_STRING_PRIMARY"]
    assert "user=opensubject_events" in conn and "dbname=opensubject" in conn and "POSTGRES_PASSWORD" not in conn
    assert env["MINIO_NOTIFY_POSTGRES_QUEUE_DIR_PRIMARY"] == "/events-queue"
    assert any(v.endswith(":/events-queue") for v in services["minio"]["volumes"])
    assert services["minio"]["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}
    entry = " ".join(services["minio-init"]["entrypoint"])
    assert "mc event add" in entry and "arn:minio:sqs::PRIMARY:postgresql" in entry and "--prefix raw/" in entry
    assert "opensubject_events" in (REPO / "deploy/postgres/00-roles.sh").read_text()
    assert "store_events" in (REPO / "sql/007_listing_and_events.sql").read_text()

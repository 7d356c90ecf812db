"""The real Airflow stack as separate processes, for tests and benchmarks: a PostgreSQL
metadata database, ``airflow api-server``, ``scheduler`` (LocalExecutor), ``dag-processor``
and ``triggerer``, with this repository's dags/ and plugins/; and a client of its REST API
(the calls the UI makes: trigger a run, read task instances and logs, clear tasks).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from local_services import free_port, pg_database  # noqa: F401 - pg_database: for importers

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ADMIN_PASSWORD = "stack-admin-password"  # test-only login


class Proc:
    """A long-running child process in its own process group, logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, ready: str | None = None,
                 timeout: float = 180) -> None:
        self.argv, self.log_path = argv, log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if ready:
            deadline = time.monotonic() + timeout
            while ready.encode() not in log.read_bytes():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def celery_worker(env: dict[str, str], log: Path, name: str = "bench", concurrency: int = 1,
                  queues: str = "cpu,gpu,maintenance", include: str | None = None) -> Proc:
    argv = [str(BIN / "celery"), "-A", "opensubject_tasks.celery_app", "worker", "-Q", queues,
            "--concurrency", str(concurrency), "--hostname", f"{name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle"]
    if include:
        argv += ["--include", include]
    return Proc(argv, env, log, ready=" ready.")


class AirflowStack:
    """api-server, scheduler, dag-processor and triggerer on a PostgreSQL metadata database."""

    COMPONENTS = ("scheduler", "dag-processor", "triggerer")

    def __init__(self, work: Path, metadata_url: str, env: dict[str, str]) -> None:
        self.work, self.port = work, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        home = work / "airflow-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "passwords.json").write_text(json.dumps({"admin": ADMIN_PASSWORD}))
        self.env = {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__API_AUTH__JWT_SECRET": "stack-jwt-secret-" + "s" * 40,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
            "AIRFLOW__API__BASE_URL": self.base,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            **env,
        }
        self.procs: list[Proc] = []
        self.token = ""

    def start(self, timeout: float = 300) -> AirflowStack:
        t0 = time.monotonic()
        out = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env={**os.environ, **self.env},
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        self.procs.append(Proc([str(BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port",
                                str(self.port), "--workers", "1"], self.env, self.work / "api-server.log"))
        for comp in self.COMPONENTS:
            self.procs.append(Proc([str(BIN / "airflow"), comp], self.env, self.work / f"{comp}.log"))
        self.token = wait_for("api-server", lambda: self.http(
            "POST", "/auth/token", {"username": "admin", "password": ADMIN_PASSWORD}, auth=False)["access_token"],
            timeout)
        self.ready_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    # --- the REST API, as the UI uses it ---------------------------------------------------
    def http(self, method: str, path: str, body: dict | None = None, auth: bool = True) -> dict:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - loopback
            raw = r.read()
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            return {"text": raw.decode(errors="replace")}

    def wait_parsed(self, *dag_ids: str, timeout: float = 180) -> None:
        for dag_id in dag_ids:
            wait_for(f"{dag_id} parsed", lambda d=dag_id: self.http("GET", f"/api/v2/dags/{d}"), timeout)

    def unpause(self, dag_id: str) -> None:
        self.http("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: dict, run_id: str | None = None) -> str:
        body = {"logical_date": None, "conf": conf, **({"dag_run_id": run_id} if run_id else {})}
        return self.http("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.http("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id)}")["state"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 900, interval: float = 1.0) -> str:
        return wait_for(f"{dag_id} run {run_id}", lambda: (s := self.run_state(dag_id, run_id))
                        in ("success", "failed") and s, timeout, interval)

    def runs(self, dag_id: str) -> list[dict]:
        return self.http("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        out, offset = [], 0
        while True:
            page = self.http("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id)}"
                                    f"/taskInstances?limit=100&offset={offset}")
            out += page["task_instances"]
            offset += 100
            if offset >= page["total_entries"]:
                return out

    def log(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, try_number: int = 1) -> str:
        doc = self.http("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id)}/taskInstances/"
                               f"{task_id}/logs/{try_number}?map_index={map_index}&full_content=true")
        content = doc.get("content", doc.get("text", ""))
        if isinstance(content, list):
            return "\n".join(c.get("event", "") if isinstance(c, dict) else str(c) for c in content)
        return str(content)

    def clear(self, dag_id: str, run_id: str, task_ids: list, downstream: bool = False) -> list[dict]:
        return self.http("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances", {
            "dry_run": False, "dag_run_id": run_id, "task_ids": task_ids, "only_failed": False,
            "include_downstream": downstream, "reset_dag_runs": True})["task_instances"]


def wait_for(what: str, fn, timeout: float = 300, interval: float = 0.5):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready after {timeout}s (last error: {last!r})")

"""Settings: environment variables, a YAML file, clear errors, profiles, secrets."""
from __future__ import annotations

import os

import pytest

from opensubject_tasks.config import PROFILE_BACKENDS, load_settings
from opensubject_tasks.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No OPENSUBJECT_* setting from the caller's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("OPENSUBJECT_") and not name.startswith("OPENSUBJECT_TEST_"):
            monkeypatch.delenv(name)


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults():
    s = load_settings()
    assert s.profile == "cpu" and s.curate.min_short_side == 480 and s.store.kind == "local"


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("OPENSUBJECT_CURATE__MIN_SHORT_SIDE", "480")
    monkeypatch.setenv("OPENSUBJECT_DATABASE_URL", "postgresql+psycopg2://u@db/x")
    monkeypatch.setenv("OPENSUBJECT_STORE__RETRY_ATTEMPTS", "3")
    s = load_settings()
    assert s.curate.min_short_side == 480
    assert s.database_url == "postgresql+psycopg2://u@db/x"
    assert s.store.retry_attempts == 3


def test_yaml_file_and_precedence(tmp_path, monkeypatch):
    path = write(tmp_path, """
profile: cpu
curate:
  min_short_side: 360
  detector: content
store:
  kind: minio
  endpoint: minio:9000
  bucket: corpus
""")
    s = load_settings(path)
    assert (s.curate.min_short_side, s.curate.detector) == (360, "content")
    assert (s.store.kind, s.store.endpoint, s.store.bucket) == ("minio", "minio:9000", "corpus")
    # env beats the file, field by field (the rest of the section still comes from the file)
    monkeypatch.setenv("OPENSUBJECT_CURATE__MIN_SHORT_SIDE", "720")
    s = load_settings(path)
    assert (s.curate.min_short_side, s.curate.detector) == (720, "content")
    # explicit arguments beat both
    assert load_settings(path, curate={"min_short_side": 100}).curate.min_short_side == 100
    # the file named by OPENSUBJECT_CONFIG is read when no path is given
    monkeypatch.setenv("OPENSUBJECT_CONFIG", str(path))
    assert load_settings().store.bucket == "corpus"


def test_a_path_is_not_remembered_by_the_next_load(tmp_path):
    load_settings(write(tmp_path, "curate: {min_short_side: 999}\n"))
    assert load_settings().curate.min_short_side == 480


@pytest.mark.parametrize("text,field", [
    ("curate: {min_short_side: 0}\n", "curate.min_short_side"),
    ("curate: {min_short_side: big}\n", "curate.min_short_side"),
    ("store: {presign_expiry_s: 0}\n", "store.presign_expiry_s"),
    ("store: {kind: s3}\n", "store.kind"),
    ("store: {multipart_part_size: 1024}\n", "store.multipart_part_size"),
    ("curate: {no_such_field: 1}\n", "curate.no_such_field"),
    ("no_such_section: {}\n", "no_such_section"),
    ("profile: quantum\n", "profile"),
])
def test_invalid_yaml_values_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert f"{field}:" in str(info.value)


def test_invalid_env_value_names_the_field(monkeypatch):
    monkeypatch.setenv("OPENSUBJECT_CURATE__MIN_SHORT_SIDE", "abc")
    with pytest.raises(ConfigError, match=r"curate\.min_short_side: .*'abc'"):
        load_settings()


@pytest.mark.parametrize("text,message", [
    ("curate: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
])
def test_broken_files_are_config_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.yaml")
    monkeypatch.setenv("OPENSUBJECT_CONFIG", str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        load_settings()


def test_errors_do_not_echo_secrets():
    with pytest.raises(ConfigError) as info:
        load_settings(celery={"result_backend": "db+postgresql://u:topsecret@h/db",
                              "visibility_timeout_s": 60, "hard_time_limit_s": 100000})
    assert "celery" in str(info.value) and "topsecret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(store={"secret_key": ["hunter2"]})
    assert "store.secret_key" in str(info.value) and "hunter2" not in str(info.value)


@pytest.mark.parametrize("profile", ["cpu", "gpu", "tiny", "small"])
def test_profiles_set_backend_names(profile):
    s = load_settings(profile=profile)
    expected = {"vlm": "none", "detector": "classical", "segmenter": "classical",
                "inpainter": "classical", "embedder": "classical", "quality": "classical",
                "verifier": "classical"} | PROFILE_BACKENDS[profile]
    assert {k: getattr(s.backends, k) for k in expected} == expected
    if profile == "gpu":
        assert s.backends.detector == "hf" and s.backends.verifier == "vlm"


def test_explicit_backend_beats_the_profile(tmp_path, monkeypatch):
    s = load_settings(write(tmp_path, "profile: gpu\nbackends: {detector: classical}\n"))
    assert s.backends.detector == "classical" and s.backends.segmenter == "hf"
    monkeypatch.setenv("OPENSUBJECT_PROFILE", "tiny")
    monkeypatch.setenv("OPENSUBJECT_BACKENDS__VLM", "none")
    s = load_settings()
    assert s.profile == "tiny" and s.backends.vlm == "none" and s.backends.detector == "tiny"


def test_pool_processes_may_take_the_profiles_model_load_time_to_come_up():
    """Celery kills a replacement pool process that has not reported ready after
    worker_proc_alive_timeout (4 s by default): the profile's load time sets it."""
    from opensubject_tasks.celery_app import celery_config

    got = {p: celery_config(load_settings(profile=p))["worker_proc_alive_timeout"]
           for p in ("cpu", "tiny", "small", "gpu")}
    assert got == {"cpu": 60.0, "tiny": 60.0, "small": 300.0, "gpu": 900.0}
    assert celery_config(load_settings(profile="gpu", celery={"worker_ready_timeout_s": 30}))[
        "worker_proc_alive_timeout"] == 30


def test_secrets_lists_configured_secrets():
    assert load_settings().secrets() == []
    s = load_settings(
        database_url="postgresql+psycopg2://app:p%40ss@db:5432/opensubject",
        broker_url="redis://:redispw@redis:6379/0",
        celery={"result_backend": "db+postgresql://res:resultpw@db/celery"},
        store={"kind": "minio", "access_key": "AKIAEXAMPLE", "secret_key": "s3cr3t"},
    )
    assert set(s.secrets()) == {"AKIAEXAMPLE", "s3cr3t", "p%40ss", "p@ss", "redispw", "resultpw"}
    # the store's keys are SecretStr: masked in repr and in JSON dumps
    for text in (repr(s), s.model_dump_json()):
        assert "s3cr3t" not in text and "AKIAEXAMPLE" not in text

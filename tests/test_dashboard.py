"""The dataset dashboard, mounted by Airflow's real API app from plugins/: it refuses
requests without a valid Airflow token and serves the funnel, failures, retries,
presigned thumbnails and build progress with one."""
from __future__ import annotations

import io
import urllib.parse
import urllib.request
from datetime import datetime, UTC

import pytest
from airflow_fixtures import FAIL_REASON, HOSTILE, JWT_SECRET
from PIL import Image


@pytest.fixture(scope="module")
def api(airflow_db):
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from fastapi.testclient import TestClient

    app = create_app()
    with TestClient(app) as client:
        yield client, get_auth_manager()


def _user():
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return SimpleAuthManagerUser(username="admin", role="ADMIN")


@pytest.fixture()
def dataset(pg_db, s3_store_settings, redis_url, monkeypatch):
    from airflow_fixtures import seed_dashboard_data, service_env

    for k, v in service_env(pg_db, redis_url, s3_store_settings).items():
        monkeypatch.setenv(k, v)
    from opensubject_tasks.orchestrate import context

    seed_dashboard_data(context())


def test_refuses_requests_without_a_valid_token(api, dataset):
    client, auth = api
    forged = _forge(auth, secret="another-secret-" + "y" * 40)
    expired = auth._get_token_signer().generate(auth.serialize_user(_user()), valid_for=-3600)
    cases = {
        "missing": {},
        "empty bearer": {"headers": {"Authorization": "Bearer "}},
        "wrong scheme": {"headers": {"Authorization": "Basic YWRtaW46YWRtaW4="}},
        "malformed": {"headers": {"Authorization": "Bearer not-a-jwt"}},
        "malformed cookie": {"cookies": {"_token": "abc.def.ghi"}},
        "forged": {"headers": {"Authorization": f"Bearer {forged}"}},
        "expired": {"headers": {"Authorization": f"Bearer {expired}"}},
        "expired cookie": {"cookies": {"_token": expired}},
    }
    for what, kw in cases.items():
        for path in ("/opensubject/", "/opensubject/api/summary"):
            client.cookies.clear()
            r = client.get(path, **kw)
            assert r.status_code == 401, (what, path, r.status_code, r.text[:200])
            assert FAIL_REASON not in r.text and "a.mp4" not in r.text
    r = client.get("/opensubject/api/summary", headers={"Authorization": f"Bearer {expired}"})
    assert "expired" in r.json()["detail"]


def _forge(auth, secret: str) -> str:
    import jwt

    from airflow.api_fastapi.auth.tokens import JWTGenerator

    gen = JWTGenerator(secret_key=secret, valid_for=600, audience=auth._get_jwt_audience())
    token = gen.generate(auth.serialize_user(_user()))
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == "admin"
    return token


def test_revoked_token_is_refused(api, dataset):
    import jwt

    from airflow.models.revoked_token import RevokedToken

    client, auth = api
    token = auth.generate_jwt(_user())
    assert client.get("/opensubject/api/summary", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    claims = jwt.decode(token, options={"verify_signature": False})
    RevokedToken.revoke(claims["jti"], datetime.fromtimestamp(claims["exp"], tz=UTC))
    assert client.get("/opensubject/api/summary", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_api_serves_funnel_failures_retries_thumbnails_and_progress(api, dataset, s3_store_settings):
    client, auth = api
    token = auth.generate_jwt(_user())
    r = client.get("/opensubject/api/summary", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    doc = r.json()
    funnel = {f["stage"]: f["count"] for f in doc["funnel"]}
    assert funnel == {"inputs": 3, "duplicates": 0, "videos": 3, "curated": 1, "clips": 1, "subjects": 1,
                      "pairs": 2, "samples": 2, "verified": 1, "rejected": 1}
    assert {f["stage"]: f["label"] for f in doc["funnel"]}["clips"] == "clips kept"
    [failure] = doc["failures"]
    assert failure["reason"] == FAIL_REASON and failure["count"] == 1
    assert failure["videos"][0]["name"] == HOSTILE and failure["videos"][0]["stage"] == "curate"
    assert doc["sample_rejections"] == [{"reason": "identity not preserved", "state": "rejected", "count": 1}]
    assert doc["attempts"]["curate"]["retries"] == 1
    assert doc["attempts"]["curate"]["statuses"] == {"ok": 1, "error": 1, "failed": 1}
    assert doc["resynthesized_samples"] == 1
    [build] = doc["builds"]
    assert build["id"] == "b1" and build["videos_finished"] == 2 and build["videos_total"] == 3
    # Thumbnails: presigned GET links with a five-minute expiry that the store honours.
    verified = next(s for s in doc["recent_samples"] if s["state"] == "verified")
    url = verified["thumbnails"]["generation_input"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["300"]
    assert s3_store_settings.endpoint in url
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - the test S3 server
        assert Image.open(io.BytesIO(resp.read())).size == (160, 120)
    # Narrowed to a build that does not exist: nothing counted.
    other = client.get("/opensubject/api/summary?build=nope", headers={"Authorization": f"Bearer {token}"}).json()
    assert {f["stage"]: f["count"] for f in other["funnel"]}["videos"] == 0


def test_page_with_the_login_cookie_escapes_what_it_shows(api, dataset):
    client, auth = api
    client.cookies.clear()
    r = client.get("/opensubject/", cookies={"_token": auth.generate_jwt(_user())})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for text in ("Stage funnel", "Failures by reason", FAIL_REASON, "identity not preserved", "Builds", "b1"):
        assert text in page, text
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;.mp4" in page
    assert page.count("<img ") == 4


def test_plugin_is_linked_from_the_ui(api):
    client, auth = api
    r = client.get("/api/v2/plugins", headers={"Authorization": f"Bearer {auth.generate_jwt(_user())}"})
    assert r.status_code == 200
    plugin = next(p for p in r.json()["plugins"] if p["name"] == "opensubject")
    assert plugin["fastapi_apps"][0]["url_prefix"] == "/opensubject"
    view = plugin["external_views"][0]
    assert view["href"] == "/opensubject/" and view["destination"] == "nav"
    assert JWT_SECRET not in r.text

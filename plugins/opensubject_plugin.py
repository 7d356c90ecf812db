"""OpenSubject's Airflow plugin: the dataset dashboard, linked from the Airflow UI.

Airflow mounts a plugin's FastAPI app without its login check, so the dashboard checks
the caller itself: the Airflow JWT from the ``Authorization: Bearer`` header, or the
``_token`` cookie the Airflow UI sets at login, validated by Airflow's own auth manager
(signature with the ``[api_auth] jwt_secret``/keys, audience, expiry, revocation).
Missing, malformed, forged and expired tokens get 401; a user who may not read the
``opensubject_build`` DAG's runs gets 403.
"""
from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin
from fastapi import HTTPException, Request

from opensubject_tasks.dashboard.app import create_app

URL_PREFIX = "/opensubject"
BUILD_DAG = "opensubject_build"


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


async def airflow_user(request: Request) -> Any:
    """The Airflow user behind the request's token, or 401."""
    from jwt import ExpiredSignatureError, InvalidTokenError

    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("malformed Authorization header (expected: Bearer <token>)")
        token = token.strip()
    else:
        token = request.cookies.get(COOKIE_NAME_JWT_TOKEN, "")
    if not token:
        raise _unauthorized("not authenticated: log in to Airflow first")
    auth = get_auth_manager()
    try:
        user = await auth.get_user_from_token(token)
    except ExpiredSignatureError:
        raise _unauthorized("token expired: log in to Airflow again") from None
    except (InvalidTokenError, ValueError, KeyError):
        raise _unauthorized("invalid token") from None
    if not auth.is_authorized_dag(method="GET", user=user, access_entity=DagAccessEntity.RUN,
                                  details=DagDetails(id=BUILD_DAG)):
        raise HTTPException(status_code=403, detail=f"not allowed to read {BUILD_DAG} runs")
    return user


class OpenSubjectPlugin(AirflowPlugin):
    name = "opensubject"
    fastapi_apps = [{"app": create_app(airflow_user), "url_prefix": URL_PREFIX,
                     "name": "OpenSubject dataset dashboard"}]
    external_views = [{"name": "OpenSubject dataset", "href": URL_PREFIX + "/",
                       "destination": "nav", "url_route": "opensubject-dataset",
                       "category": "browse"}]

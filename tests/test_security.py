"""API keys: parsing NEXTACT_API_KEYS, constant-time verification, the FastAPI dependency, no keys in logs."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, FastAPI

from app.security import ApiKeyAuth, ApiKeyConfigError, fingerprint, parse_api_keys, require_api_key
from tests.app_client import running_app

pytestmark = pytest.mark.anyio

KEY_A = "k-alpha-0123456789abcdef"
KEY_B = "k-beta-fedcba9876543210"


def test_parse_comma_list_trims_and_dedupes() -> None:
    assert parse_api_keys(f" {KEY_A} , {KEY_B},,{KEY_A} ") == (KEY_A, KEY_B)
    assert parse_api_keys(None) == ()
    assert parse_api_keys("  ") == ()


def test_parse_key_file_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"# production keys\n{KEY_A}\n\n  {KEY_B}  \n", encoding="utf-8")
    assert parse_api_keys(str(path)) == (KEY_A, KEY_B)


def test_missing_key_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(ApiKeyConfigError, match="nope.txt"):
        parse_api_keys(str(missing))


def test_bad_key_is_refused_without_echoing_it() -> None:
    secret = "good-key,bad\u00e9key-secret"
    with pytest.raises(ApiKeyConfigError) as info:
        parse_api_keys(secret)
    assert "key #2" in str(info.value)
    assert "secret" not in str(info.value)


def test_verify_accepts_only_exact_keys() -> None:
    auth = ApiKeyAuth((KEY_A, KEY_B))
    assert auth.verify(KEY_B) == fingerprint(KEY_B)
    for wrong in ("", KEY_A[:-1], KEY_A + "x", KEY_A.upper(), "x" * 10_000):
        assert auth.verify(wrong) is None
    assert len(fingerprint(KEY_A)) == 12 and fingerprint(KEY_A) not in KEY_A


def test_verify_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr("app.security.hmac.compare_digest", counting)
    auth = ApiKeyAuth((KEY_A, KEY_B, "k-gamma"))
    for presented in (KEY_A, KEY_B, "wrong"):
        calls.clear()
        auth.verify(presented)
        assert len(calls) == 3  # no early exit on the first match


def _app(auth: ApiKeyAuth) -> FastAPI:
    app = FastAPI()
    app.state.auth = auth

    @app.get("/v1/thing", dependencies=[Depends(require_api_key)])
    async def thing() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def _get(app: FastAPI, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (None, 401),
        ({"Authorization": "Bearer nope"}, 401),
        ({"Authorization": f"Basic {KEY_A}"}, 401),
        ({"X-API-Key": KEY_A + " x"}, 401),
        ({"Authorization": f"Bearer {KEY_A}"}, 200),
        ({"Authorization": f"bearer {KEY_B}"}, 200),
        ({"X-API-Key": KEY_A}, 200),
        ({"Authorization": "Bearer nope", "X-API-Key": KEY_A}, 401),  # a wrong bearer is not rescued
    ],
)
async def test_dependency_requires_a_valid_key(headers: dict[str, str] | None, status: int) -> None:
    response = await _get(_app(ApiKeyAuth((KEY_A, KEY_B))), "/v1/thing", headers)
    assert response.status_code == status
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["detail"]


async def test_open_routes_and_auth_off() -> None:
    assert (await _get(_app(ApiKeyAuth((KEY_A,))), "/healthz")).status_code == 200
    assert (await _get(_app(ApiKeyAuth(())), "/v1/thing")).status_code == 200


def test_openapi_declares_both_key_headers_on_v1_routes_only() -> None:
    """/docs gets an Authorize button for either header; open routes stay open in the schema too."""
    from app import routes

    app = FastAPI()
    app.include_router(routes.v1)
    app.include_router(routes.router)
    doc = app.openapi()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearerKey"]["description"],
    }
    assert schemes["apiKeyHeader"]["in"] == "header" and schemes["apiKeyHeader"]["name"] == "X-API-Key"
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            if path.startswith("/v1/"):
                assert operation["security"] == [{"bearerKey": []}, {"apiKeyHeader": []}], path
            else:
                assert "security" not in operation, path


def test_auth_off_warns_at_start_up(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.security"):
        assert not ApiKeyAuth.from_setting(None).enabled
        assert ApiKeyAuth.from_setting(KEY_A).enabled
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any(level == logging.WARNING and "OFF" in msg for level, msg in levels)
    assert all(KEY_A not in msg for _, msg in levels)


async def test_keys_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    app = _app(ApiKeyAuth.from_setting(f"{KEY_A},{KEY_B}"))
    with caplog.at_level(logging.DEBUG):
        await _get(app, "/v1/thing", {"Authorization": f"Bearer {KEY_A}"})
        await _get(app, "/v1/thing", {"X-API-Key": KEY_B + "-wrong"})
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert KEY_A not in text and KEY_B not in text


# --- the real app ---------------------------------------------------------------------------------------------


def _concrete(path: str) -> str:
    return path.replace("{user_id}", "someone")


async def test_every_v1_route_needs_a_key_and_the_rest_stay_open(
    behavior_artifact: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # many wrong keys from one address on purpose: failed-auth limiting off here (tested in test_surface.py)
    async with running_app(
        behavior_artifact, redis_url, api_keys=f"{KEY_A},{KEY_B}", auth_failure_limit=0
    ) as (
        app,
        client,
    ):
        v1 = [
            (method.upper(), path)
            for path, item in app.openapi()["paths"].items()
            if path.startswith("/v1")
            for method in item
        ]
        assert {p for _, p in v1} >= {
            "/v1/users/{user_id}/events",
            "/v1/events",
            "/v1/model",
            "/v1/model/reload",
            "/v1/users/{user_id}/predictions",
            "/v1/users/{user_id}",
        }
        with caplog.at_level(logging.DEBUG):
            for method, path in v1:
                for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": f"Bearer {KEY_A}x"}):
                    r = await client.request(method, _concrete(path), headers=headers, json={"action": "pv"})
                    assert r.status_code == 401, (method, path, r.status_code)
                    assert r.json()["error"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
                ok = await client.request(
                    method,
                    _concrete(path),
                    headers={"X-API-Key": KEY_B},
                    json={"events": [{"user_id": "someone", "action": "pv"}]}
                    if path == "/v1/events"
                    else {"action": "pv"},
                )
                no_candidate = (
                    path == "/v1/model/promote" and ok.status_code == 409
                )  # authorised, nothing to promote
                assert ok.status_code in (200, 204) or no_candidate, (method, path, ok.text)
            for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/ui"):
                assert (await client.get(path)).status_code == 200, path
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert KEY_A not in text and KEY_B not in text

"""The hot routes' fast path (app/hotpath.py) answers exactly as FastAPI's generic handler does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import APIRouter, Depends, FastAPI

from app import routes
from app.deps import get_services
from app.hotpath import FastPathError, HotRoute, fast_path
from app.security import require_api_key
from tests.app_client import running_app

pytestmark = pytest.mark.anyio

KEY = {"X-API-Key": "hot-key"}
JSON = {"content-type": "application/json", **KEY}
EVENTS = "/v1/users/u1/events"
PREDICT = "/v1/users/u1/predictions"
# (method, path, query, headers, body, answered by the fast path?)
Case = tuple[str, str, str, dict[str, str], bytes | None, bool]


def _body(value: Any) -> bytes:
    return json.dumps(value).encode()


CASES: list[Case] = [
    ("POST", EVENTS, "k=3", JSON, _body({"action": "pv", "timestamp": 1511848894, "event_id": "e1"}), True),
    ("POST", EVENTS, "k=3", JSON, _body({"action": "pv", "timestamp": 1511848894, "event_id": "e1"}), True),
    (
        "POST",
        EVENTS,
        "",
        JSON,
        _body(
            {
                "events": [
                    {"action": "cart", "timestamp": 1511848900, "event_id": "e2"},
                    {"action": "buy", "timestamp": "2017-11-28T06:01:34Z", "event_id": "e3"},
                ]
            }
        ),
        True,
    ),
    (
        "POST",
        EVENTS,
        "k=2&exclude_window=true&exclude=pv&include=cart&include=buy&include=fav&renormalize=true",
        JSON,
        _body({"action": "fav", "timestamp": 1511848950, "event_id": "e4"}),
        True,
    ),
    (
        "POST",
        "/v1/users/a%2Fb%20%C3%A9/events",
        "k=4",
        JSON,
        _body({"action": "pv", "event_id": "e5", "timestamp": 1511848960}),
        True,
    ),
    ("GET", PREDICT, "k=2", KEY, None, True),
    ("GET", PREDICT, "exclude_window=false&exclude=buy", KEY, None, True),
    ("GET", "/v1/users/nobody/predictions", "", KEY, None, True),
    # left to FastAPI: values it coerces, repeats, refusals
    (
        "POST",
        EVENTS,
        "k=%2B3",
        JSON,
        _body({"action": "cart", "timestamp": 1511849000, "event_id": "e6"}),
        False,
    ),
    (
        "POST",
        EVENTS,
        "k=3&k=4",
        JSON,
        _body({"action": "pv", "timestamp": 1511849001, "event_id": "e7"}),
        False,
    ),
    ("GET", PREDICT, "exclude_window=yes", KEY, None, False),
    ("GET", PREDICT, "k=0", KEY, None, False),
    ("GET", PREDICT, "k=many", KEY, None, False),
    ("GET", PREDICT, "&".join(["exclude=pv"] * 1001), KEY, None, False),
    ("GET", "/v1/users/" + "u" * 21 + "/predictions", "", KEY, None, True),  # id over 20: the endpoint's 422
    ("POST", EVENTS, "k=100001", JSON, _body({"action": "pv"}), False),
    ("POST", EVENTS, "", JSON, _body({"timestamp": 200}), False),
    ("POST", EVENTS, "", JSON, _body({"action": "pv", "colour": "red"}), False),
    ("POST", EVENTS, "", JSON, _body([{"action": "pv"}]), False),
    ("POST", EVENTS, "", JSON, b'{"action": "pv"', False),
    ("POST", EVENTS, "", JSON, b'{"action": "pv", "timestamp": NaN}', True),
    ("POST", EVENTS, "", JSON, b"", False),
    ("POST", EVENTS, "", {"content-type": "text/plain", **KEY}, _body({"action": "pv"}), False),
    ("POST", EVENTS, "", KEY, _body({"action": "pv"}), False),
    (
        "POST",
        EVENTS,
        "",
        JSON,
        _body({"action": "x" * 11}),
        True,
    ),  # over the length setting: the endpoint's 422
    ("POST", EVENTS, "", JSON, _body({"events": [{"action": "pv"}] * 6}), True),  # 413
    (
        "POST",
        EVENTS,
        "",
        JSON,
        _body({"action": "pv", "timestamp": 50}),
        True,
    ),  # too early: the endpoint's 422
    ("POST", EVENTS, "", {"content-type": "application/json"}, _body({"action": "pv"}), True),  # 401
    ("GET", PREDICT, "", {"X-API-Key": "wrong"}, None, True),  # 401
    ("GET", PREDICT, "", {"Authorization": "Bearer hot-key"}, None, True),
    ("GET", "/v1/users/u1/events", "", KEY, None, False),  # not a hot route: the window, to compare
]
SETTINGS = {
    "api_keys": "hot-key",
    "auth_failure_limit": 0,
    "rate_limit_requests": 1000,  # on: the fast path runs the limiter too
    "max_id_length": 20,
    "max_action_length": 10,
    "max_events_per_request": 5,
    "min_event_timestamp": 100.0,
}
HEADERS = ("content-type", "x-model-version", "www-authenticate", "retry-after")


async def _answers(
    artifact: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, *, generic: bool
) -> tuple[list[tuple[Any, ...]], list[bool]]:
    """Every case's (status, headers, body) and whether the fast path took it (it calls routes._admit)."""
    admitted: list[int] = []
    real = routes._admit

    async def spy(request: Any) -> Any:
        admitted.append(1)
        return await real(request)

    monkeypatch.setattr(routes, "_admit", spy)
    answers, fast = [], []
    async with running_app(artifact, redis_url, **SETTINGS) as (app, client):
        if generic:  # any override sends every request to FastAPI's handler
            app.dependency_overrides[get_services] = get_services
        for method, path, query, headers, body, _ in CASES:
            before = len(admitted)
            r = await client.request(
                method, f"{path}?{query}" if query else path, headers=headers, content=body
            )
            fast.append(len(admitted) > before)
            kept = {h: r.headers.get(h) for h in HEADERS}
            answers.append((method, path, query, r.status_code, kept, r.json() if r.content else None))
    return answers, fast


async def test_the_fast_path_answers_every_case_as_fastapis_handler(
    behavior_artifact: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast_answers, fast_taken = await _answers(behavior_artifact, redis_url, monkeypatch, generic=False)
    redis.Redis.from_url(redis_url).flushall()
    generic_answers, generic_taken = await _answers(behavior_artifact, redis_url, monkeypatch, generic=True)
    assert not any(generic_taken)
    assert fast_taken == [case[-1] for case in CASES]
    for fast, generic in zip(fast_answers, generic_answers, strict=True):
        assert fast == generic
    statuses = [a[3] for a in fast_answers]
    assert statuses.count(200) >= 12 and {401, 413, 422} <= set(statuses)  # the cases do what they say
    fields = [f["field"] for a in fast_answers if a[3] == 422 for f in a[5]["fields"]]
    assert {"query.k", "path.user_id", "body.action", "body.colour", "body.timestamp", "body"} <= set(fields)


async def test_dependency_overrides_are_honoured(behavior_artifact: Path, redis_url: str) -> None:
    async with running_app(behavior_artifact, redis_url, api_keys="hot-key") as (app, client):
        assert (await client.get(PREDICT)).status_code == 401
        app.dependency_overrides[require_api_key] = lambda: None
        assert (await client.get(PREDICT)).status_code == 200
        r = await client.post(EVENTS, json={"action": "pv"})
        assert r.status_code == 200 and r.json()["window_size"] == 1


def test_a_dependency_or_parameter_the_fast_path_does_not_handle_is_refused() -> None:
    async def quota() -> None:
        return None

    async def fast(request: Any, body: Any) -> None:
        return None

    router = APIRouter(dependencies=[Depends(require_api_key), Depends(quota)], route_class=HotRoute)
    with pytest.raises(FastPathError, match="quota"):

        @router.get("/x")
        @fast_path(fast, runs=(require_api_key,), reads=())
        async def endpoint() -> None:
            return None

    covered = APIRouter(dependencies=[Depends(require_api_key)], route_class=HotRoute)
    with pytest.raises(FastPathError, match="parameter 'limit'"):

        @covered.get("/z")
        @fast_path(fast, runs=(require_api_key,), reads=("user_id",))
        async def with_query(limit: int = 5) -> None:
            return None

    app = FastAPI()

    @covered.get("/y")
    @fast_path(fast, runs=(require_api_key,), reads=())
    async def fine() -> dict[str, str]:
        return {"ok": "yes"}

    app.include_router(covered, dependencies=[Depends(quota)])  # the including router's count too
    included = [r for r in app.router.routes if hasattr(r, "effective_candidates")]
    with pytest.raises(FastPathError, match="quota"):  # FastAPI builds included routes on first use
        included[0].effective_candidates()

"""Issue 13 item 1 and issue 14 item 6: numbers out of range and malformed bodies are 422s that say what is wrong."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.events import InvalidField, epoch_seconds
from app.schemas import EventIn
from app.settings import Settings
from tests.app_client import running_app

pytestmark = pytest.mark.anyio

HUGE = int("9" * 400)


@pytest.fixture
async def client(behavior_artifact: Path, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(behavior_artifact, redis_url) as (_, c):
        yield c


def _field_error(r: httpx.Response, field: str) -> str:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "validation_error", body
    fields = {f["field"]: f["message"] for f in body["fields"]}
    assert field in fields, body
    return fields[field]


@pytest.mark.parametrize("value", [HUGE, -HUGE], ids=["huge", "minus-huge"])
@pytest.mark.parametrize(
    ("path", "shape", "field"),
    [
        ("/v1/users/u1/events", lambda ts: {"action": "pv", "timestamp": ts}, "body.timestamp"),
        (
            "/v1/users/u1/events",
            lambda ts: {"events": [{"action": "pv", "timestamp": ts}]},
            "body.events[0].timestamp",
        ),
        (
            "/v1/events",
            lambda ts: {"events": [{"user_id": "u1", "action": "pv", "timestamp": ts}]},
            "body.events[0].timestamp",
        ),
    ],
)
async def test_huge_integer_timestamps_are_422_naming_the_field(
    client: httpx.AsyncClient, path: str, shape: Any, field: str, value: int
) -> None:
    """fails on main: yes (500 internal_error, OverflowError)."""
    message = _field_error(await client.post(path, json=shape(value)), field)
    assert "out of range" in message


async def test_a_number_with_more_digits_than_python_parses_is_422(client: httpx.AsyncClient) -> None:
    """A 5000-digit literal is over Python's int-parsing limit: 422 on the body, not a bare 400. fails on main: yes."""
    raw = '{"action": "pv", "timestamp": ' + "1" * 5000 + "}"
    r = await client.post("/v1/users/u1/events", content=raw, headers={"content-type": "application/json"})
    assert "4300 digits" in _field_error(r, "body")


@pytest.mark.parametrize(
    "k",
    [str(HUGE), "-" + str(HUGE), "1" * 5000, "1e400", "0", "100001"],
    ids=["huge", "minus-huge", "5000-digits", "1e400", "zero", "over-limit"],
)
async def test_out_of_range_k_is_422_on_query_k(client: httpx.AsyncClient, k: str) -> None:
    _field_error(await client.get("/v1/users/u1/predictions", params={"k": k}), "query.k")


async def test_millisecond_timestamps_suggest_dividing_by_1000(client: httpx.AsyncClient) -> None:
    """fails on main: yes (no hint)."""
    ms = int(time.time() * 1000)
    message = _field_error(
        await client.post("/v1/users/u1/events", json={"action": "pv", "timestamp": ms}), "body.timestamp"
    )
    assert "looks like milliseconds; divide by 1000" in message


async def test_a_json_body_without_json_content_type_says_so(client: httpx.AsyncClient) -> None:
    """curl -d sends application/x-www-form-urlencoded. fails on main: yes ("expected one event object")."""
    for path, body in (
        ("/v1/users/u1/events", b'{"action": "pv"}'),
        ("/v1/events", b'{"events": [{"user_id": "u", "action": "pv"}]}'),
    ):
        r = await client.post(
            path, content=body, headers={"content-type": "application/x-www-form-urlencoded"}
        )
        message = _field_error(r, "body")
        assert "expected one event object" not in message
        assert message == (
            "the body must be JSON sent with 'Content-Type: application/json' "
            "(got 'application/x-www-form-urlencoded')"
        )


async def test_a_json_syntax_error_names_line_and_column_not_an_index(client: httpx.AsyncClient) -> None:
    """fails on main: yes (field "body[15]")."""
    r = await client.post(
        "/v1/users/u1/events",
        content=b'{"action": "pv",\n "timestamp": }',
        headers={"content-type": "application/json"},
    )
    message = _field_error(r, "body")
    assert message == "invalid JSON at line 2, column 15 (character 31): Expecting value"
    assert "body[" not in r.text


def test_model_load_log_counts_actions_without_pad_and_unk(
    behavior_artifact: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """fails on main: yes (4 behaviours logged as "6 actions")."""
    from app.model import load_model

    with caplog.at_level(logging.INFO, logger="app.model"):
        model = load_model(behavior_artifact, device="cpu")
    line = next(r.getMessage() for r in caplog.records if "loaded from" in r.getMessage())
    assert f"{model.vocab_size - 2} actions (plus <pad> and <unk>)" in line


# --- numeric parsing limits, property-based ------------------------------------------------------------------


@given(st.integers() | st.integers(min_value=-(10**400), max_value=10**400))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_integer_timestamp_validates_or_names_the_field(value: int) -> None:
    """Any integer: either accepted by the schema and then within or outside the configured range, never a crash."""
    s = Settings()
    try:
        event = EventIn.model_validate({"action": "pv", "timestamp": value})
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        assert "timestamp" in str(e) and "out of range" in str(e)
        return
    try:
        ts = epoch_seconds(event.timestamp, 1.8e9, s, ("body", "timestamp"))
    except InvalidField:
        return
    assert s.min_event_timestamp <= ts <= 1.8e9 + s.max_future_seconds


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(10**30), max_value=10**30))
@settings(max_examples=300, deadline=None)
def test_epoch_seconds_accepts_exactly_the_configured_range(value: float) -> None:
    s = Settings()
    now = 1.8e9
    event = EventIn.model_validate({"action": "pv", "timestamp": value})
    inside = (
        event.timestamp is not None and s.min_event_timestamp <= event.timestamp <= now + s.max_future_seconds
    )
    try:
        epoch_seconds(event.timestamp, now, s, ("body", "timestamp"))
    except InvalidField:
        assert not inside
    else:
        assert inside


async def test_a_content_length_of_5000_digits_is_413() -> None:
    """The body-size check must not parse an absurd Content-Length as an integer (ValueError over 4300 digits)."""
    from app.errors import BodyLimitMiddleware

    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the application must not be called")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": [(b"content-length", b"9" * 5000)]}
    await BodyLimitMiddleware(app, max_bytes=1024)(scope, receive, send)
    assert sent[0]["status"] == 413

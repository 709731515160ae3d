"""Metrics registry, the request middleware (ids, labels, error lines) and the JSON log formatter."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Response
from prometheus_client.parser import text_string_to_metric_families

from app.manifest import read_manifest
from app.observability import JsonFormatter, Metrics, ObservabilityMiddleware, request_id_var
from tests.app_client import running_app

pytestmark = pytest.mark.anyio


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _app() -> tuple[FastAPI, Metrics]:
    metrics = Metrics()
    app = FastAPI()
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)

    @app.get("/v1/users/{user_id}/things")
    async def things(user_id: str) -> dict[str, str]:
        logging.getLogger("nextact.test").info("handling", extra={"user_hash": len(user_id)})
        return {"request_id": request_id_var.get() or ""}

    @app.get("/boom")
    async def boom() -> Response:
        raise RuntimeError("kaput")

    return app, metrics


async def test_request_metrics_use_the_route_template_and_status() -> None:
    app, metrics = _app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for user in ("alice", "bob", "carol"):
            assert (await c.get(f"/v1/users/{user}/things")).status_code == 200
        assert (await c.get("/no/such/path")).status_code == 404
    s = _samples(metrics)
    ok = (("method", "GET"), ("route", "/v1/users/{user_id}/things"), ("status", "200"))
    assert s[("nextact_http_requests_total", ok)] == 3
    assert s[("nextact_http_request_duration_seconds_count", ok)] == 3
    assert (
        s[("nextact_http_requests_total", (("method", "GET"), ("route", "<unmatched>"), ("status", "404")))]
        == 1
    )
    assert not any("alice" in str(labels) for _, labels in s)  # raw paths (user ids) never become labels
    assert s[("nextact_http_requests_in_flight", ())] == 0


async def test_request_id_is_returned_and_visible_to_the_handler() -> None:
    app, _ = _app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        fresh = await c.get("/v1/users/u/things")
        echoed = await c.get("/v1/users/u/things", headers={"X-Request-ID": "abc-123"})
        hostile = await c.get("/v1/users/u/things", headers={"X-Request-ID": "x" * 500})
    assert len(fresh.headers["x-request-id"]) == 32
    assert fresh.json()["request_id"] == fresh.headers["x-request-id"]
    assert echoed.headers["x-request-id"] == "abc-123"
    assert hostile.headers["x-request-id"] != "x" * 500  # not echoed: replaced by a fresh id


async def test_unhandled_error_gives_json_500_with_request_id(caplog: pytest.LogCaptureFixture) -> None:
    app, metrics = _app()
    with caplog.at_level(logging.ERROR, logger="nextact.access"):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            response = await c.get("/boom", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-500"
    body = response.json()
    assert body["error"] == "internal_error" and body["request_id"] == "req-500"
    assert "req-500" in body["message"]
    assert "kaput" not in response.text  # no traceback or message leaks to the client
    assert (
        _samples(metrics)[
            ("nextact_http_requests_total", (("method", "GET"), ("route", "/boom"), ("status", "500")))
        ]
        == 1
    )
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    assert any("RuntimeError: kaput" in line.get("exception", "") for line in lines)
    assert any(line.get("status") == 500 and line.get("route") == "/boom" for line in lines)


def test_registries_are_per_app() -> None:
    a, b = Metrics(), Metrics()
    a.events_ingested.inc(5)
    assert _samples(a)[("nextact_events_ingested_total", ())] == 5
    assert _samples(b)[("nextact_events_ingested_total", ())] == 0


def test_model_info_keeps_one_series() -> None:
    m = Metrics()
    m.set_model(model_version="aaa", cell="lstm", window=20, vocab_size=6, provider="CPUExecutionProvider")
    m.set_model(model_version="bbb", cell="gru", window=50, vocab_size=9, provider="CPUExecutionProvider")
    info = {labels: v for (name, labels), v in _samples(m).items() if name == "nextact_model_info"}
    assert len(info) == 1
    assert dict(next(iter(info)))["model_version"] == "bbb"


def test_redis_op_times_and_counts_errors() -> None:
    m = Metrics()
    with m.redis_op("append"):
        pass
    with pytest.raises(ConnectionError), m.redis_op("append"):
        raise ConnectionError("down")
    s = _samples(m)
    assert s[("nextact_redis_duration_seconds_count", (("op", "append"),))] == 2
    assert s[("nextact_redis_errors_total", (("op", "append"),))] == 1


def test_json_formatter_carries_request_id_extras_and_exceptions() -> None:
    formatter = JsonFormatter()
    token = request_id_var.set("rid-1")
    try:
        try:
            raise ValueError("bad value")
        except ValueError:
            record = logging.LogRecord(
                "nextact", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
            )
        record.user_count = 3
        entry = json.loads(formatter.format(record))
    finally:
        request_id_var.reset(token)
    assert entry["message"] == "failed x"
    assert entry["level"] == "error"
    assert entry["request_id"] == "rid-1"
    assert entry["user_count"] == 3
    assert "ValueError: bad value" in entry["exception"]
    assert entry["time"].endswith("+00:00")


# --- the real app ---------------------------------------------------------------------------------------------


async def test_app_metrics_cover_requests_inference_redis_and_events(
    behavior_artifact: Path, redis_url: str
) -> None:
    version = read_manifest(behavior_artifact).model_version
    async with running_app(behavior_artifact, redis_url) as (app, client):
        events = {
            "events": [
                {"action": "pv", "event_id": "e1"},
                {"action": "cart", "event_id": "e2"},
                {"action": "no-such-action", "event_id": "e3"},
            ]
        }
        first = await client.post("/v1/users/m1/events", json=events)
        again = await client.post("/v1/users/m1/events", json=events)  # all three are duplicates now
        read = await client.get("/v1/users/m1/events")
        bad = await client.post("/v1/users/m1/events", json={"action": "pv", "timestamp": "NaN"})
        for r in (first, again, read, bad):
            assert r.headers["x-model-version"] == version
            assert len(r.headers["x-request-id"]) == 32
        assert first.json()["model_version"] == version
        scrape = await client.get("/metrics")
        assert scrape.headers["content-type"].startswith("text/plain")
        inference_on = app.state.services.inference_on[0]  # NEXTACT_INFERENCE_ON=auto, resolved for this host
    s = _samples(app.state.metrics)
    route = "/v1/users/{user_id}/events"
    assert s[("nextact_http_requests_total", (("method", "POST"), ("route", route), ("status", "200")))] == 2
    assert s[("nextact_http_requests_total", (("method", "POST"), ("route", route), ("status", "422")))] == 1
    assert s[("nextact_events_ingested_total", ())] == 3
    assert s[("nextact_events_duplicate_total", ())] == 3
    assert s[("nextact_unknown_actions_total", ())] == 2  # posted twice
    assert s[("nextact_inference_batch_size_count", ())] >= 1
    calls = {on: s.get(("nextact_inference_calls_total", (("on", on),)), 0) for on in ("thread", "loop")}
    if inference_on == "thread":
        assert calls["thread"] >= 1  # a batcher's first call always runs in its thread
    else:
        assert calls["loop"] >= 1 and calls["thread"] == 0  # every call on the event loop's thread
    assert calls["thread"] + calls["loop"] == s[("nextact_inference_batch_size_count", ())]
    assert s[("nextact_inference_duration_seconds_count", ())] >= 1
    assert s[("nextact_redis_duration_seconds_count", (("op", "append"),))] == 2
    assert s[("nextact_redis_duration_seconds_count", (("op", "read"),))] == 1
    info = [dict(labels) for (name, labels), v in s.items() if name == "nextact_model_info" and v == 1]
    assert [i["model_version"] for i in info] == [version]
    names = {name for name, _ in s}
    for family in (
        "nextact_redis_errors_total",
        "nextact_model_reloads_total",
        "nextact_rate_limited_total",
        "nextact_auth_failures_total",
        "nextact_http_requests_in_flight",
    ):
        assert any(n.startswith(family) for n in names), family

"""Every error the service gives: status code, error code and a message that names the field, limit or file."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.manifest import MANIFEST_FILE, MODEL_FILE
from app.model import ModelLoadError
from app.redis_server import EmbeddedRedis, free_port
from tests.app_client import running_app

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def client(behavior_artifact: Path, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = {
        "max_events_per_request": 5,
        "max_body_bytes": 2048,
        "max_id_length": 20,
        "max_action_length": 10,
        "min_event_timestamp": 100.0,
        "max_future_seconds": 60.0,
    }
    async with running_app(behavior_artifact, redis_url, **limits) as (_, c):
        yield c


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    return str(body["message"])


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"timestamp": 200}, "body.action", "Field required"),
        ({"events": [{"action": "pv"}, {"timestamp": 200}]}, "body.events[1].action", "Field required"),
        ({"events": []}, "body.events", "at least 1 item"),
        ({"action": ""}, "body.action", "at least 1 character"),
        ({"action": 5}, "body.action", "valid string"),
        ({"action": "pv", "colour": "red"}, "body.colour", "Extra inputs are not permitted"),
        (
            {"action": "pv", "timestamp": "yesterday"},
            "body.timestamp",
            "epoch seconds (a number) or an ISO-8601",
        ),
        ({"action": "pv", "timestamp": True}, "body.timestamp", "epoch seconds"),
        ({"action": "pv", "timestamp": float("nan")}, "body.timestamp", "finite number"),
        ({"action": "pv", "timestamp": 50}, "body.timestamp", "NEXTACT_MIN_EVENT_TIMESTAMP"),
        ({"action": "pv", "timestamp": time.time() + 3600}, "body.timestamp", "NEXTACT_MAX_FUTURE_SECONDS"),
        ({"action": "x" * 11}, "body.action", "longer than 10 characters (NEXTACT_MAX_ACTION_LENGTH)"),
        (
            {"events": [{"action": "pv", "event_id": "i" * 21}]},
            "body.events[0].event_id",
            "NEXTACT_MAX_ID_LENGTH",
        ),
        ({"action": "pv", "event_id": "\ud800"}, "body.event_id", "valid string"),
        ([{"action": "pv"}], "body", 'expected one event object or {"events": [...]}'),
    ],
)
async def test_invalid_user_events_are_422_naming_the_field(
    client: httpx.AsyncClient, body: Any, field: str, says: str
) -> None:
    r = await client.post(
        "/v1/users/u/events", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    message = _error(r, 422, "validation_error")
    assert f"{field}: " in message and says in message, message
    assert {"field": field}.items() <= r.json()["fields"][0].items()
    assert (await client.get("/v1/users/u/events")).json()["events"] == []  # nothing stored


async def test_other_422s(client: httpx.AsyncClient) -> None:
    assert "query.k: " in _error(
        await client.get("/v1/users/u/predictions", params={"k": 0}), 422, "validation_error"
    )
    assert "query.k: " in _error(
        await client.post("/v1/users/u/events", params={"k": "many"}, json={"action": "a"}),
        422,
        "validation_error",
    )
    assert "path.user_id: longer than 20" in _error(
        await client.get("/v1/users/" + "u" * 21 + "/events"), 422, "validation_error"
    )
    assert "body.events[1].user_id: Field required" in _error(
        await client.post(
            "/v1/events", json={"events": [{"user_id": "a", "action": "pv"}, {"action": "pv"}]}
        ),
        422,
        "validation_error",
    )
    assert "body.events[0].user_id: longer than 20" in _error(
        await client.post("/v1/events", json={"events": [{"user_id": "a" * 21, "action": "pv"}]}),
        422,
        "validation_error",
    )
    broken = await client.post(
        "/v1/users/u/events", content=b'{"action": "pv"', headers={"content-type": "application/json"}
    )
    assert "invalid JSON at line 1, column 16" in _error(broken, 422, "validation_error")


async def test_too_many_events_is_413(client: httpx.AsyncClient) -> None:
    six = [{"action": "pv"} for _ in range(6)]
    message = _error(await client.post("/v1/users/u/events", json={"events": six}), 413, "payload_too_large")
    assert "6 events in one request is over the limit of 5 (NEXTACT_MAX_EVENTS_PER_REQUEST)" in message
    bulk = [{"user_id": "u", "action": "pv"} for _ in range(6)]
    assert "NEXTACT_MAX_EVENTS_PER_REQUEST" in _error(
        await client.post("/v1/events", json={"events": bulk}), 413, "payload_too_large"
    )
    assert (await client.get("/v1/users/u/events")).json()["events"] == []


async def test_a_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    big = json.dumps({"action": "pv", "event_id": "x" * 3000}).encode()
    message = _error(
        await client.post("/v1/users/u/events", content=big, headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
    )
    assert "over the limit of 2048 bytes (NEXTACT_MAX_BODY_BYTES)" in message

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        for i in range(0, len(big), 500):
            yield big[i : i + 500]

    chunked = await client.post(
        "/v1/users/u/events", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "NEXTACT_MAX_BODY_BYTES" in _error(chunked, 413, "payload_too_large")

    async def small() -> AsyncIterator[bytes]:
        yield b'{"action": '
        yield b'"pv"}'

    assert (
        await client.post("/v1/users/u/events", content=small(), headers={"content-type": "application/json"})
    ).status_code == 200


async def test_unknown_routes_and_methods(client: httpx.AsyncClient) -> None:
    assert _error(await client.get("/v1/nothing"), 404, "not_found") == "Not Found"
    assert _error(await client.put("/v1/users/u/events"), 405, "method_not_allowed") == "Method Not Allowed"


async def test_redis_unreachable_is_503_with_retry_after(
    behavior_artifact: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    user = "user-7f3a9c"
    async with running_app(
        behavior_artifact, f"redis://127.0.0.1:{port}/0", redis_timeout_seconds=0.5, retry_after_seconds=7
    ) as (_, client):
        assert (await client.get("/healthz")).status_code == 200
        calls = [
            client.post(f"/v1/users/{user}/events", json={"action": "pv"}),
            client.post("/v1/events", json={"events": [{"user_id": user, "action": "pv"}]}),
            client.get(f"/v1/users/{user}/predictions"),
            client.get(f"/v1/users/{user}/events"),
            client.delete(f"/v1/users/{user}"),
        ]
        for call in calls:
            with caplog.at_level(logging.WARNING, logger="app"):
                r = await call
            message = _error(r, 503, "redis_unavailable")
            assert r.headers["retry-after"] == "7"
            assert f"Redis at 127.0.0.1:{port} is unavailable" in message and "Traceback" not in r.text
            assert user in message  # the client is told which of its users failed
        logged = [rec.getMessage() for rec in caplog.records if "is unavailable" in rec.getMessage()]
        assert logged and not any(user in line for line in logged)  # the logs are not
        ready = await client.get("/readyz")
        assert _error(ready, 503, "not_ready").startswith(f"Redis at 127.0.0.1:{port} is unavailable")
        assert ready.headers["retry-after"] == "7"


async def test_the_service_recovers_when_redis_returns(behavior_artifact: Path, tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, port=free_port()).start()
    try:
        async with running_app(behavior_artifact, server.url, redis_timeout_seconds=0.5) as (_, client):
            ok = await client.post(
                "/v1/users/u/events", json={"action": "pv", "event_id": "a", "timestamp": 1}
            )
            assert ok.status_code == 200
            server.stop()
            down = await client.post(
                "/v1/users/u/events", json={"action": "cart", "event_id": "b", "timestamp": 2}
            )
            _error(down, 503, "redis_unavailable")
            server.start()
            assert (await client.get("/readyz")).status_code == 200
            back = await client.post(
                "/v1/users/u/events", json={"action": "buy", "event_id": "c", "timestamp": 3}
            )
            assert back.status_code == 200, back.text
            stored = (await client.get("/v1/users/u/events")).json()["events"]
            assert [e["event_id"] for e in stored] == ["a", "c"]  # acknowledged events survived the restart
    finally:
        server.stop()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


async def _start(artifact: Path, redis_url: str, **overrides: Any) -> None:
    async with running_app(artifact, redis_url, **overrides):
        pass


async def test_a_missing_or_broken_artifact_stops_start_up(
    behavior_artifact: Path, redis_url: str, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match=f"{missing / MANIFEST_FILE}: manifest file not found"):
        await _start(missing, redis_url)

    bad_json = _copy(behavior_artifact, tmp_path / "bad-json")
    (bad_json / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"{bad_json / MANIFEST_FILE}: invalid manifest"):
        await _start(bad_json, redis_url)

    no_model = _copy(behavior_artifact, tmp_path / "no-model")
    (no_model / MODEL_FILE).unlink()
    with pytest.raises(ModelLoadError, match=f"{no_model / MODEL_FILE}: model file not found"):
        await _start(no_model, redis_url)

    garbage = _copy(behavior_artifact, tmp_path / "garbage")
    (garbage / MODEL_FILE).write_bytes(b"this is not an onnx graph")
    with pytest.raises(ModelLoadError, match=f"{garbage / MODEL_FILE}: ONNX Runtime cannot load the model"):
        await _start(garbage, redis_url)

    other_vocab = _copy(behavior_artifact, tmp_path / "other-vocab")
    manifest = json.loads((other_vocab / MANIFEST_FILE).read_text())
    manifest["vocabulary"].append("an-extra-action")
    (other_vocab / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=f"{other_vocab / MODEL_FILE}: output shape .* vocabulary has"):
        await _start(other_vocab, redis_url)


def _cuda_loads(model: Path) -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(model), options, providers=["CUDAExecutionProvider"])
        return bool(session.get_providers()[0] == "CUDAExecutionProvider")
    finally:
        ort.set_default_logger_severity(3)


async def test_device_cuda_runs_on_cuda_or_refuses_to_start(behavior_artifact: Path, redis_url: str) -> None:
    if _cuda_loads(behavior_artifact / MODEL_FILE):
        async with running_app(behavior_artifact, redis_url, device="cuda") as (_, client):
            assert (await client.get("/v1/model")).json()["execution_provider"] == "CUDAExecutionProvider"
            assert (await client.post("/v1/users/u/events", json={"action": "pv"})).status_code == 200
    else:
        with pytest.raises(ModelLoadError, match="NEXTACT_DEVICE=cuda but"):
            await _start(behavior_artifact, redis_url, device="cuda")


def test_python_m_app_names_the_missing_file(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "NEXTACT_ARTIFACT_DIR": str(tmp_path / "none"),
        "NEXTACT_PORT": str(free_port()),
    }
    done = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert f"cannot start: {tmp_path / 'none' / MANIFEST_FILE}: manifest file not found" in done.stderr

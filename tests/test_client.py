"""The Python client (clients/python, `nextact_client`) against a real service process on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from nextact_client import (
    AsyncNextactClient,
    BulkEvent,
    Event,
    NextactClient,
    NextactError,
)

from app.redis_server import EmbeddedRedis, free_port
from tests.service_proc import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
SERVER_PACKAGES = {
    "app",
    "training",
    "fastapi",
    "starlette",
    "pydantic",
    "numpy",
    "onnxruntime",
    "redis",
    "torch",
}


@pytest.fixture(scope="module")
def service(
    redis_server: EmbeddedRedis, behavior_artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    env = {"NEXTACT_REDIS_URL": redis_server.url, "NEXTACT_ARTIFACT_DIR": str(behavior_artifact)}
    svc = ServiceProcess(tmp_path_factory.mktemp("client") / "service.log", env)
    try:
        yield svc.start()
    finally:
        svc.kill()


class DropFirstAnswer(httpx.HTTPTransport):
    """Delivers every request to the real server, but loses the answer to the first POST (a timeout after the
    server acted): what a client sees when the network fails on the way back."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST":
            self.sent.append(request.content)
            if len(self.sent) == 1:
                response.read()
                response.close()
                raise httpx.ReadTimeout("answer lost", request=request)
        return response


class CountingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        return response


def test_client_imports_without_the_server_dependencies() -> None:
    code = (
        "import sys, nextact_client; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(SERVER_PACKAGES)!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_sync_client_round_trip(service: ServiceProcess) -> None:
    with NextactClient(service.base_url) as client:
        client.delete_user("cl-alice")
        first = client.post_event("cl-alice", "pv", timestamp=1511848894.0, event_id="e-1", k=2)
        assert first.user_id == "cl-alice" and first.window_size == 1 and len(first.predictions) == 2
        assert first.predictions[0].probability >= first.predictions[1].probability
        second = client.post_events("cl-alice", [Event("cart", 1511848950.0), Event("fav", 1511848900.0)])
        assert second.window_size == 3
        assert [e.action for e in client.window("cl-alice")] == ["pv", "fav", "cart"]  # by timestamp
        assert client.predict("cl-alice", k=1).predictions == second.predictions[:1]
        model = client.model()
        assert model.model_version == first.model_version and model.window == 20
        bulk = client.post_bulk([BulkEvent("cl-bob", "pv"), BulkEvent("cl-carol", "buy")], predict=True, k=1)
        assert bulk.accepted == 2 and bulk.predictions is not None
        assert {p.user_id for p in bulk.predictions} == {"cl-bob", "cl-carol"}
        client.delete_user("cl-alice")
        assert client.window("cl-alice") == []


def test_errors_carry_status_code_and_field(service: ServiceProcess) -> None:
    with NextactClient(service.base_url) as client, pytest.raises(NextactError) as caught:
        client.post_event("cl-err", "")
    assert caught.value.status == 422 and caught.value.error == "validation_error"
    assert caught.value.fields and "action" in caught.value.fields[0]["field"]


def test_a_retry_after_a_lost_answer_stores_the_event_once(service: ServiceProcess) -> None:
    transport = DropFirstAnswer()
    with NextactClient(service.base_url, transport=transport, backoff=0.01) as client:
        client.delete_user("cl-retry")
        answer = client.post_event("cl-retry", "pv")  # no event_id given: the client chose one, once
        assert len(transport.sent) == 2 and transport.sent[0] == transport.sent[1], "the retry is a resend"
        assert answer.window_size == 1, "the resend was recognised as a duplicate"
        assert len(client.window("cl-retry")) == 1


def test_unavailable_redis_is_retried_then_raised(tmp_path: Path, behavior_artifact: Path) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: every Redis call fails at once
    env = {
        "NEXTACT_REDIS_URL": dead_redis,
        "NEXTACT_ARTIFACT_DIR": str(behavior_artifact),
        "NEXTACT_REDIS_RETRIES": "0",
    }
    svc = ServiceProcess(tmp_path / "service.log", env).start()
    try:
        transport = CountingTransport()
        with (
            NextactClient(svc.base_url, retries=1, transport=transport) as client,
            pytest.raises(NextactError) as caught,
        ):
            client.post_event("cl-down", "pv")
        assert caught.value.status == 503 and caught.value.error == "redis_unavailable"
        assert transport.statuses == [503, 503], "one try and one retry after Retry-After"
    finally:
        svc.kill()


def test_async_client_round_trip_and_safe_retry(service: ServiceProcess) -> None:
    class DropFirstAsync(httpx.AsyncHTTPTransport):
        def __init__(self) -> None:
            super().__init__()
            self.posts = 0

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await super().handle_async_request(request)
            if request.method == "POST":
                self.posts += 1
                if self.posts == 1:
                    await response.aread()
                    await response.aclose()
                    raise httpx.ReadTimeout("answer lost", request=request)
            return response

    async def scenario() -> None:
        transport = DropFirstAsync()
        async with AsyncNextactClient(service.base_url, transport=transport, backoff=0.01) as client:
            await client.delete_user("cl-async")
            answers = await asyncio.gather(*(client.post_event("cl-async", "pv") for _ in range(3)))
            assert transport.posts == 4  # three posts, one of them sent twice
            assert max(a.window_size for a in answers) == 3
            assert len(await client.window("cl-async")) == 3
            prediction = await client.predict("cl-async", k=2)
            assert len(prediction.predictions) == 2

    asyncio.run(scenario())

"""SIGTERM under load: in-flight requests finish, the process exits 0, the embedded Redis is stopped cleanly
and every acknowledged event is in its append-only file."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from app.redis_server import EmbeddedRedis, _answers, free_port
from app.windows import WindowStore
from tests.service_proc import ServiceProcess

pytestmark = pytest.mark.anyio


async def test_sigterm_finishes_in_flight_requests_and_loses_nothing(
    behavior_artifact: Path, tmp_path: Path
) -> None:
    data_dir, redis_port = tmp_path / "data", free_port()
    svc = ServiceProcess(
        tmp_path / "service.log",
        {
            "NEXTACT_ARTIFACT_DIR": str(behavior_artifact),
            "NEXTACT_DATA_DIR": str(data_dir),  # no NEXTACT_REDIS_URL: the service owns an embedded Redis
            "NEXTACT_EMBEDDED_REDIS_PORT": str(redis_port),
            "NEXTACT_SHUTDOWN_TIMEOUT_SECONDS": "10",
            "NEXTACT_WINDOW_SIZE": "10000",  # big bulk batches per user: nothing is trimmed
        },
    ).start()
    acked: dict[str, set[str]] = {}
    spans: list[tuple[float, float, int]] = []  # (sent, answered, status) of every answered request
    running = True

    async def client(http: httpx.AsyncClient, n: int) -> None:
        i = 0
        while running:
            user = f"sd-{n}"
            batch = [{"user_id": user, "action": "pv", "event_id": uuid.uuid4().hex} for _ in range(200)]
            i += 1
            sent = time.monotonic()
            try:
                r = await http.post(f"{svc.base_url}/v1/events", json={"events": batch})
            except httpx.TransportError:
                await asyncio.sleep(0.02)  # refused or closed: the server is going away
                continue
            spans.append((sent, time.monotonic(), r.status_code))
            if r.status_code == 200:
                acked.setdefault(user, set()).update(e["event_id"] for e in batch)

    try:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=8)) as http:
            tasks = [asyncio.create_task(client(http, n)) for n in range(8)]
            while len(spans) < 16:  # traffic is flowing
                await asyncio.sleep(0.05)
                assert svc.process is not None and svc.process.poll() is None, svc.log()
            signalled = time.monotonic()
            assert svc.process is not None
            svc.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(svc.process.wait, 30)
            exited = time.monotonic()
            running = False
            await asyncio.gather(*tasks)
    finally:
        svc.kill()

    log = svc.log()
    assert code == 0, log
    assert exited - signalled < 12, "shutdown took longer than the graceful timeout allows"
    assert "Traceback" not in log, log
    # structured logs: Python's and uvicorn's lines are JSON objects (native libraries may still write raw text)
    assert not [line for line in log.splitlines() if line.startswith(("INFO:", "WARNING:", "ERROR:"))], log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["message"] == "Application shutdown complete." for line in lines)
    statuses = {s for _, _, s in spans}
    assert statuses <= {200, 503}, f"answers during shutdown: {statuses}\n{log}"
    straddling = [s for sent, answered, s in spans if sent < signalled < answered]
    assert straddling and all(s == 200 for s in straddling), f"in flight at SIGTERM: {straddling}"
    assert not _answers(redis_port), "the embedded redis-server outlived the service"

    # the append-only file the embedded Redis flushed on its way down holds every acknowledged event
    server = EmbeddedRedis(data_dir, port=redis_port).start()
    try:
        stored = await asyncio.wait_for(_stored_ids(server.url, list(acked)), timeout=30)
    finally:
        server.stop()
    for user, ids in acked.items():
        assert ids <= stored[user], f"{len(ids - stored[user])} acknowledged events of {user} lost"
    assert sum(map(len, acked.values())) > 0


async def _stored_ids(url: str, users: list[str]) -> dict[str, set[str]]:
    """Event ids in each user's window, read with the service's own window store."""
    client = aioredis.Redis.from_url(url)
    try:
        store = WindowStore(client, "nextact", 60, url)
        return {u: {e.event_id for e in await store.events(u)} for u in users}
    finally:
        await client.aclose()

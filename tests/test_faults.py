"""Redis going away under load, against the real server and the real service process.

Redis runs with appendfsync always and is stopped with SIGKILL: it replies to a write only after the write
is fsynced to its append-only file, so a crash can lose nothing it acknowledged to the service, and the
service acknowledges an event only after Redis did. (The embedded default, everysec, survives a clean stop
but may lose the last second on a crash; see the README's operations section.)
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.manifest import read_manifest
from app.redis_server import EmbeddedRedis, free_port
from tests.service_proc import ServiceProcess

pytestmark = pytest.mark.anyio

REDIS_TIMEOUT = 0.5  # NEXTACT_REDIS_TIMEOUT_SECONDS for the service under test
FAIL_FAST = 3.0  # a request during the outage must be answered within this (timeouts + retries + slack)


@pytest.fixture
def redis_dir(tmp_path: Path) -> Path:
    return tmp_path / "redis"


@pytest.fixture
def durable_redis(redis_dir: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(redis_dir, port=free_port(), extra_args=["--appendfsync", "always"]).start()
    yield server
    server.stop()


@pytest.fixture
def service(
    behavior_artifact: Path, durable_redis: EmbeddedRedis, tmp_path: Path
) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(
        tmp_path / "service.log",
        {
            "NEXTACT_ARTIFACT_DIR": str(behavior_artifact),
            "NEXTACT_REDIS_URL": durable_redis.url,
            "NEXTACT_REDIS_TIMEOUT_SECONDS": str(REDIS_TIMEOUT),
            "NEXTACT_LOG_LEVEL": "warning",
        },
    ).start()
    yield svc
    svc.kill()


def _kill(server: EmbeddedRedis) -> None:
    """SIGKILL: no shutdown flush, only what is already in the append-only file survives."""
    assert server.process is not None
    server.process.kill()
    server.process.wait(10)
    server.stop()


@dataclass
class Traffic:
    base_url: str
    actions: list[str]
    per_user: int  # events sent to one user, below the window so nothing may be trimmed
    acked: dict[str, set[str]] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    slowest_failure: float = 0.0
    bad_503: list[str] = field(default_factory=list)
    running: bool = True

    async def client(self, http: httpx.AsyncClient, n: int) -> None:
        i = 0
        while self.running:
            user = f"fault-{n}-{i // self.per_user}-\u00e9"
            event_id = uuid.uuid4().hex
            self.acked.setdefault(user, set())
            body = {
                "action": self.actions[i % len(self.actions)],
                "event_id": event_id,
                "timestamp": time.time(),
            }
            started = time.monotonic()
            try:
                r = await http.post(f"{self.base_url}/v1/users/{user}/events", json=body)
            except httpx.TransportError:
                self.statuses[-1] += 1
                await asyncio.sleep(0.05)
                i += 1
                continue
            self.statuses[r.status_code] += 1
            if 200 <= r.status_code < 300:
                self.acked[user].add(event_id)
            else:
                self.slowest_failure = max(self.slowest_failure, time.monotonic() - started)
                if r.status_code == 503 and (
                    "retry-after" not in r.headers or r.json().get("error") != "redis_unavailable"
                ):
                    self.bad_503.append(r.text)
                await asyncio.sleep(0.02)
            i += 1

    def successes(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)


async def _status(http: httpx.AsyncClient, url: str) -> int:
    return (await http.get(url)).status_code


async def _eventually(http: httpx.AsyncClient, url: str, want: int, timeout: float) -> float:
    """Seconds until GET url answers `want`; fails the test after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if await _status(http, url) == want:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"GET {url} did not answer {want} within {timeout}s")


async def test_redis_outage_fails_fast_and_recovers_without_losing_acked_events(
    service: ServiceProcess, durable_redis: EmbeddedRedis, behavior_artifact: Path
) -> None:
    manifest = read_manifest(behavior_artifact)
    traffic = Traffic(service.base_url, manifest.vocabulary[2:], per_user=manifest.window - 1)
    port = durable_redis.port
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(timeout=10, limits=limits) as http:
        clients = [asyncio.create_task(traffic.client(http, n)) for n in range(6)]
        try:
            await asyncio.sleep(1.0)
            before = traffic.successes()
            assert before > 0, f"no successful request before the outage: {traffic.statuses}\n{service.log()}"

            _kill(durable_redis)
            await asyncio.sleep(1.0)  # traffic keeps coming while Redis is gone
            ready = await http.get(f"{service.base_url}/readyz")
            assert ready.status_code == 503 and "retry-after" in ready.headers
            assert (await http.get(f"{service.base_url}/healthz")).status_code == 200  # alive, just not ready
            during = traffic.statuses[503]
            assert during > 0, f"no 503 while Redis was down: {traffic.statuses}"

            durable_redis.start()  # same port, same data directory and append-only file
            assert durable_redis.port == port
            recovered = await _eventually(http, f"{service.base_url}/readyz", 200, timeout=10)
            after = traffic.successes()
            await asyncio.sleep(0.7)
            assert traffic.successes() > after, f"no success after Redis came back: {traffic.statuses}"
        finally:
            traffic.running = False
            await asyncio.gather(*clients)

        assert set(traffic.statuses) <= {200, 503}, f"unexpected answers: {traffic.statuses}\n{service.log()}"
        assert not traffic.bad_503, (
            f"503 without Retry-After or the redis_unavailable code: {traffic.bad_503[:3]}"
        )
        assert traffic.slowest_failure < FAIL_FAST, f"a failing request took {traffic.slowest_failure:.2f}s"
        assert recovered < 10
        scrape = (await http.get(f"{service.base_url}/metrics")).text
        errors = [
            line for line in scrape.splitlines() if line.startswith('nextact_redis_errors_total{op="append"}')
        ]
        assert errors and float(errors[0].split()[-1]) > 0, errors
        assert service.process is not None and service.process.poll() is None  # the same process recovered

        lost = {}
        for user, ids in traffic.acked.items():
            r = await http.get(f"{service.base_url}/v1/users/{user}/events")
            assert r.status_code == 200
            missing = ids - {e["event_id"] for e in r.json()["events"]}
            if missing:
                lost[user] = missing
        acked = sum(len(ids) for ids in traffic.acked.values())
        assert not lost, f"{sum(map(len, lost.values()))} of {acked} acknowledged events missing: {lost}"


async def test_redis_down_at_start_up_then_up(behavior_artifact: Path, tmp_path: Path) -> None:
    """The service starts without Redis (readyz 503, requests 503) and becomes ready when Redis appears."""
    port = free_port()
    svc = ServiceProcess(
        tmp_path / "service.log",
        {
            "NEXTACT_ARTIFACT_DIR": str(behavior_artifact),
            "NEXTACT_REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "NEXTACT_REDIS_TIMEOUT_SECONDS": str(REDIS_TIMEOUT),
        },
    ).start()
    server = EmbeddedRedis(tmp_path / "late-redis", port=port)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{svc.base_url}/readyz")).status_code == 503
            started = time.monotonic()
            r = await http.post(f"{svc.base_url}/v1/users/u/events", json={"action": "pv"})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert time.monotonic() - started < FAIL_FAST
            assert "Redis" in r.json()["message"] and "Traceback" not in r.text
            server.start()
            await _eventually(http, f"{svc.base_url}/readyz", 200, timeout=10)
            r = await http.post(f"{svc.base_url}/v1/users/u/events", json={"action": "pv", "event_id": "e1"})
            assert r.status_code == 200
    finally:
        svc.kill()
        server.stop()


async def test_a_hung_redis_gives_503_within_the_timeout(
    service: ServiceProcess, durable_redis: EmbeddedRedis
) -> None:
    """SIGSTOP: Redis accepts connections but never answers. Requests must not hang: bounded by the socket
    timeout and the retries, they answer 503, and the service carries on once Redis resumes."""
    assert durable_redis.process is not None
    async with httpx.AsyncClient(timeout=30) as http:
        assert (
            await http.post(f"{service.base_url}/v1/users/h/events", json={"action": "pv"})
        ).status_code == 200
        durable_redis.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            answers = await asyncio.gather(
                *(
                    http.post(f"{service.base_url}/v1/users/h{i}/events", json={"action": "pv"})
                    for i in range(6)
                )
            )
            elapsed = time.monotonic() - started
            ready = await http.get(f"{service.base_url}/readyz")
        finally:
            durable_redis.process.send_signal(signal.SIGCONT)
        assert [r.status_code for r in answers] == [503] * 6
        assert all(r.headers["retry-after"] and r.json()["error"] == "redis_unavailable" for r in answers)
        # connect/read timeout 0.5 s, 2 retries with short backoff: ~1.5 s; the bound leaves room for busy CPUs
        assert elapsed < 3 * REDIS_TIMEOUT * 3, f"requests to a hung Redis took {elapsed:.1f}s"
        assert ready.status_code == 503
        await _eventually(http, f"{service.base_url}/readyz", 200, timeout=10)
        assert (
            await http.post(f"{service.base_url}/v1/users/h/events", json={"action": "pv"})
        ).status_code == 200

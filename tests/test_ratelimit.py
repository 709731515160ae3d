"""The Redis rate limiter against the real server: budgets, rollover arithmetic, atomicity, 429s, fail-open."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.ratelimit import RateLimiter, enforce_rate_limit
from app.redis_client import connect
from app.redis_server import EmbeddedRedis, free_port
from app.security import ApiKeyAuth, require_api_key
from tests.app_client import running_app

pytestmark = pytest.mark.anyio

DAY = 86_400


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    yield r
    await r.aclose()


async def _hits(limiter: RateLimiter, identity: str, n: int) -> list[bool]:
    return [(await limiter.hit(identity)).allowed for _ in range(n)]


async def test_fixed_window_budget_per_identity(client: aioredis.Redis) -> None:
    limiter = RateLimiter(client, limit=3, window_seconds=DAY, algorithm="fixed")
    assert await _hits(limiter, "ip:1.2.3.4", 5) == [True, True, True, False, False]
    assert await _hits(limiter, "key:abc", 1) == [True]  # another identity has its own budget
    decision = await limiter.hit("ip:1.2.3.4")
    assert not decision.allowed and 1 <= decision.retry_after_seconds <= DAY
    ttl = await client.pttl(limiter.key("ip:1.2.3.4"))
    assert 0 < ttl <= 2 * DAY * 1000  # buckets expire by themselves


async def test_rejected_requests_are_not_counted(client: aioredis.Redis) -> None:
    limiter = RateLimiter(client, limit=2, window_seconds=DAY, algorithm="fixed")
    await _hits(limiter, "u", 10)
    assert await client.hget(limiter.key("u"), "c") == b"2"


async def _server_elapsed_ms(client: aioredis.Redis, window_ms: int) -> int:
    seconds, micros = await client.time()
    return (seconds * 1000 + micros // 1000) % window_ms


async def test_sliding_window_weighs_the_previous_window(client: aioredis.Redis) -> None:
    limit, window_ms = 1000, DAY * 1000
    limiter = RateLimiter(client, limit=limit, window_seconds=DAY, algorithm="sliding")
    seconds, _ = await client.time()
    index = seconds * 1000 // window_ms
    # the previous window used the whole budget; the current one is empty
    await client.hset(limiter.key("s"), mapping={"w": index - 1, "c": limit, "p": 0})
    elapsed = await _server_elapsed_ms(client, window_ms)
    allowed = sum(await _hits(limiter, "s", 200))
    # allowed while c + limit * (1 - elapsed/window) + 1 <= limit, i.e. c < limit * elapsed / window
    expected = min(200, int(limit * elapsed / window_ms))
    assert abs(allowed - expected) <= 1
    if allowed < 200:
        decision = await limiter.hit("s")
        assert not decision.allowed
        # the wait is until enough of the previous window has slid out: below one window
        assert 1 <= decision.retry_after_seconds <= DAY


async def test_sliding_window_without_history_is_the_plain_budget(client: aioredis.Redis) -> None:
    limiter = RateLimiter(client, limit=5, window_seconds=DAY, algorithm="sliding")
    assert await _hits(limiter, "fresh", 6) == [True] * 5 + [False]


async def test_concurrent_hits_never_exceed_the_budget(client: aioredis.Redis) -> None:
    limiter = RateLimiter(client, limit=10, window_seconds=DAY, algorithm="sliding")
    results = await asyncio.gather(*(limiter.hit("burst") for _ in range(60)))
    assert sum(d.allowed for d in results) == 10


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 request"):
        RateLimiter(object(), limit=0, window_seconds=60)
    with pytest.raises(ValueError, match="at least 1 second"):
        RateLimiter(object(), limit=1, window_seconds=0.5)


def _app(limiter: RateLimiter | None, auth: ApiKeyAuth) -> FastAPI:
    app = FastAPI()
    app.state.auth = auth
    app.state.rate_limiter = limiter

    @app.get("/v1/thing", dependencies=[Depends(require_api_key), Depends(enforce_rate_limit)])
    async def thing() -> dict[str, str]:
        return {"ok": "yes"}

    return app


async def _statuses(app: FastAPI, n: int, headers: dict[str, str] | None = None) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return [await c.get("/v1/thing", headers=headers) for _ in range(n)]


async def test_429_with_retry_after_and_json_body(client: aioredis.Redis) -> None:
    limiter = RateLimiter(client, limit=2, window_seconds=60, algorithm="fixed")
    responses = await _statuses(_app(limiter, ApiKeyAuth(())), 3)
    assert [r.status_code for r in responses] == [200, 200, 429]
    last = responses[-1]
    assert 1 <= int(last.headers["retry-after"]) <= 60
    assert "rate limit exceeded" in last.json()["detail"]


async def test_budget_is_per_api_key(client: aioredis.Redis) -> None:
    limiter = RateLimiter(client, limit=1, window_seconds=60, algorithm="fixed")
    app = _app(limiter, ApiKeyAuth(("key-one", "key-two")))
    assert [r.status_code for r in await _statuses(app, 2, {"X-API-Key": "key-one"})] == [200, 429]
    assert [r.status_code for r in await _statuses(app, 1, {"X-API-Key": "key-two"})] == [200]
    # unauthenticated requests are refused before they can spend anyone's budget
    assert [r.status_code for r in await _statuses(app, 1)] == [401]


async def test_limiter_fails_open_when_redis_is_unreachable() -> None:
    dead = aioredis.Redis(
        host="127.0.0.1",
        port=free_port(),
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        limiter = RateLimiter(dead, limit=1, window_seconds=60)
        responses = await asyncio.wait_for(_statuses(_app(limiter, ApiKeyAuth(())), 3), timeout=10)
        assert [r.status_code for r in responses] == [200, 200, 200]
    finally:
        await dead.aclose()


# --- the real app ---------------------------------------------------------------------------------------------


async def test_app_rate_limit_is_off_by_default_and_429s_when_set(
    behavior_artifact: Path, redis_url: str
) -> None:
    async with running_app(behavior_artifact, redis_url) as (app, client):
        assert app.state.rate_limiter is None
        assert [(await client.get("/v1/model")).status_code for _ in range(20)] == [200] * 20
    async with running_app(
        behavior_artifact,
        redis_url,
        rate_limit_requests=3,
        rate_limit_window_seconds=60,
        api_keys="rl-key-1,rl-key-2",
    ) as (app, client):
        one, two = {"X-API-Key": "rl-key-1"}, {"X-API-Key": "rl-key-2"}
        statuses = [(await client.get("/v1/users/u/predictions", headers=one)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        refused = await client.post("/v1/users/u/events", json={"action": "pv"}, headers=one)
        # sliding: the spent window has to slide partly out of the next one, so up to two windows
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 120
        assert refused.json()["error"] == "rate_limited"
        assert (await client.get("/v1/model", headers=two)).status_code == 200  # its own budget
        assert [(await client.get("/readyz")).status_code for _ in range(5)] == [200] * 5  # not limited
        metrics = (await client.get("/metrics")).text
        assert "nextact_rate_limited_total 2.0" in metrics
        window = await client.get("/v1/users/u/events", headers=two)
        assert window.json()["events"] == []  # the refused post stored nothing


async def test_the_direct_path_keeps_the_budget_survives_a_script_flush_and_fails_open(
    redis_url: str, stopped_redis: EmbeddedRedis
) -> None:
    conn = connect(redis_url, max_connections=4, timeout_seconds=2, retries=1)
    assert conn.direct is not None
    try:
        limiter = RateLimiter(conn.client, limit=3, window_seconds=DAY, algorithm="fixed", direct=conn.direct)
        before = conn.direct.pipelined
        assert await _hits(limiter, "direct:1", 2) == [True, True]
        assert conn.direct.pipelined - before == 2  # the calls went the direct way
        await conn.client.script_flush()  # NOSCRIPT: loaded again, then counted once
        assert [(await limiter.check("direct:1")).allowed for _ in range(2)] == [True, False]
        results = await asyncio.gather(*(limiter.check("direct:burst") for _ in range(20)))
        assert sum(r.allowed for r in results) == 3  # issued together (one pipeline): still the budget
    finally:
        await conn.close()
    hung = connect(stopped_redis.url, max_connections=4, timeout_seconds=0.3, retries=2)
    try:
        assert stopped_redis.process is not None
        os.kill(stopped_redis.process.pid, signal.SIGSTOP)
        try:
            limiter = RateLimiter(
                hung.client, limit=1, window_seconds=60, timeout_seconds=0.3, direct=hung.direct
            )
            responses = await asyncio.wait_for(_statuses(_app(limiter, ApiKeyAuth(())), 2), timeout=10)
            assert [r.status_code for r in responses] == [200, 200]  # one timeout each, then let through
        finally:
            os.kill(stopped_redis.process.pid, signal.SIGCONT)
    finally:
        await hung.close()

"""Per-key (or per-client-address) request rate limit kept in Redis, so every replica shares one budget.

One hash per identity holds the current window's index and count and the previous window's count. The
"sliding" algorithm weighs the previous window by how much of it still overlaps the sliding window (the
sliding-window-counter approximation: O(1) memory, never lets more than `limit` through in any window-long
interval by more than the approximation's small error); "fixed" counts per calendar window only.
Reading, rolling over, counting and expiring happen in one Lua script using the Redis server's clock,
so replicas with skewed clocks agree. Rejected requests are not counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from fastapi import HTTPException, Request, status
from redis.exceptions import NoScriptError, RedisError

from app.redis_client import DirectCommands, bounded
from app.security import client_identity

log = logging.getLogger(__name__)

Algorithm = Literal["sliding", "fixed"]

# KEYS[1] the identity's bucket; ARGV: limit, window in ms, algorithm.
# Returns {allowed 0/1, retry-after ms, remaining}.
RATE_LIMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local sliding = ARGV[3] == 'sliding'
local idx = math.floor(now / window)
local elapsed = now - idx * window
local v = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local w = tonumber(v[1])
local c = tonumber(v[2]) or 0
local p = tonumber(v[3]) or 0
if w ~= idx then
  if w == idx - 1 then p = c else p = 0 end
  c = 0
end
if not sliding then p = 0 end
local weighted = p * (window - elapsed) / window
local allowed = 1
local wait = 0
if c + weighted + 1 > limit then
  allowed = 0
  if c + 1 > limit then
    -- this window is spent: wait for the next one, and there for enough of this one to slide out
    wait = window - elapsed
    if sliding and c > 0 then
      local later = window * (1 - (limit - 1) / c)
      if later > 0 then wait = wait + later end
    end
  else
    -- wait until enough of the previous window has slid out
    wait = window * (1 - (limit - c - 1) / p) - elapsed
  end
else
  c = c + 1
end
redis.call('HSET', KEYS[1], 'w', idx, 'c', c, 'p', p)
redis.call('PEXPIRE', KEYS[1], window * 2)
return {allowed, math.ceil(math.max(wait, 1)), math.floor(math.max(limit - c - weighted, 0))}
"""


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_seconds: int  # 0 when allowed
    remaining: int


class RateLimiter:
    """`limit` requests per `window_seconds` per identity, counted in Redis."""

    def __init__(
        self,
        redis: Any,
        *,
        limit: int,
        window_seconds: float,
        key_prefix: str = "nextact",
        algorithm: Algorithm = "sliding",
        timeout_seconds: float | None = None,
        direct: DirectCommands | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError(f"rate limit must be at least 1 request per window, got {limit}")
        if window_seconds < 1:
            raise ValueError(f"rate limit window must be at least 1 second, got {window_seconds}")
        self.limit = limit
        self.window_ms = int(window_seconds * 1000)
        self.algorithm = algorithm
        self.key_prefix = key_prefix
        self.timeout_seconds = timeout_seconds  # a slower answer lets the request through (fail open)
        self._redis = redis
        self._script = redis.register_script(RATE_LIMIT_LUA)
        # a single server: the script goes through the coalesced direct calls, like the window scripts (about a
        # tenth of redis-py's CPU per call, and a plain deadline holds there: see check)
        self._direct = direct

    def key(self, identity: str) -> str:
        # hash tag: one slot per identity on Redis Cluster
        return f"{self.key_prefix}:ratelimit:{{{identity}}}"

    async def check(self, identity: str) -> RateDecision:
        """hit(), given up after `timeout_seconds` (TimeoutError), retries included."""
        if (
            self._direct is None
        ):  # redis-py's own call: in a task of its own, so the deadline holds (see bounded)
            return await bounded(lambda: self.hit(identity), self.timeout_seconds)
        async with asyncio.timeout(self.timeout_seconds):  # direct calls await a future only: this is a bound
            return await self.hit(identity)

    async def hit(self, identity: str) -> RateDecision:
        """Count one request for `identity` unless it is over its budget."""
        keys, args = [self.key(identity)], [self.limit, self.window_ms, self.algorithm]
        if self._direct is None:
            reply = await self._script(keys=keys, args=args)
        else:
            command = ("EVALSHA", self._script.sha, 1, *keys, *args)
            try:
                reply = await self._direct.execute(*command)
            except NoScriptError:  # Redis restarted, failed over or flushed its scripts
                await bounded(partial(self._redis.script_load, RATE_LIMIT_LUA), self.timeout_seconds)
                reply = await self._direct.execute(*command)
        allowed, wait_ms, remaining = reply
        if int(allowed):
            return RateDecision(True, 0, int(remaining))
        return RateDecision(False, max(1, math.ceil(int(wait_ms) / 1000)), 0)


async def enforce_rate_limit(request: Request) -> None:
    """FastAPI dependency (after authentication): 429 with Retry-After when the caller is over its budget.

    A Redis failure, or no answer within NEXTACT_REDIS_TIMEOUT_SECONDS, lets the request through (fail open):
    the routes that need Redis answer 503 on their own, and the ones that do not (e.g. /v1/model) keep
    working during an outage.
    """
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        return
    identity = client_identity(request)
    metrics = getattr(request.app.state, "metrics", None)
    try:
        # one Redis timeout at most, retries included (see RateLimiter.check)
        decision = await limiter.check(identity)
    except (RedisError, OSError) as e:  # TimeoutError is an OSError
        log.warning("rate limiter unavailable, letting the request through: %s", type(e).__name__)
        if metrics is not None:
            metrics.redis_errors.labels(op="ratelimit").inc()
        return
    if not decision.allowed:
        if metrics is not None:
            metrics.rate_limited.inc()
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=(
                f"rate limit exceeded: {limiter.limit} requests per {limiter.window_ms / 1000:g} s; "
                f"retry after {decision.retry_after_seconds} s"
            ),
            headers={
                "Retry-After": str(decision.retry_after_seconds),
                "X-RateLimit-Limit": str(limiter.limit),
            },
        )

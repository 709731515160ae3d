"""The asyncio Redis client for a URL: one server (redis://, rediss://, unix://) or a cluster (redis+cluster://)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


@dataclass
class RedisConnection:
    """A client plus what the rest of the service needs to know about it."""

    client: Any  # redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
    address: str  # host:port (or socket path) for messages; never the password
    cluster: bool

    async def close(self) -> None:
        await self.client.aclose()


def redacted_address(url: str) -> str:
    """host:port (or the socket path) of a Redis URL, without credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    return f"{host}:{parts.port or 6379}"


def connect(url: str, max_connections: int, timeout_seconds: float, retries: int) -> RedisConnection:
    """A client for `url` with bounded timeouts, a pool of `max_connections` and a short retry on errors.

    redis+cluster://host:port[,...] uses redis-py's cluster client (max_connections per node); every
    other scheme a single-server client whose pool makes callers wait (up to the timeout) for a connection.
    """
    scheme = urlsplit(url).scheme
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries)
    common: dict[str, Any] = {
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "retry": retry,
    }
    if scheme in CLUSTER_SCHEMES:
        plain = CLUSTER_SCHEMES[scheme] + url[len(scheme) :]
        client = RedisCluster.from_url(plain, max_connections=max_connections, **common)
        return RedisConnection(client, redacted_address(plain), cluster=True)
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_seconds, **common)
    return RedisConnection(Redis.from_pool(pool), redacted_address(url), cluster=False)

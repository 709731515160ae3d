"""The asyncio Redis client for a URL: one server (redis://, rediss://, unix://) or a cluster (redis+cluster://)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    AskError,
    ClusterError,
    InvalidResponse,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

V = TypeVar("V")

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
BACKOFF_CAP_SECONDS = 0.1  # longest pause between two tries of one Redis call

# error replies that say "not now" (busy script, loading, failover, cluster reconfiguring, out of memory)
_TRANSIENT_REPLIES = frozenset(
    {
        "BUSY",
        "LOADING",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "READONLY",
        "NOREPLICAS",
        "OOM",
        "MOVED",
        "ASK",
    }
)


def is_transient(error: BaseException) -> bool:
    """Could the same call succeed later? Connection trouble, timeouts and "not now" replies: yes (a 503).

    Anything else (a cross-slot refusal, WRONGTYPE, a script error, bad arguments) fails the same way every
    time, so it must not be reported as an outage to retry.
    """
    if isinstance(
        error,
        RedisConnectionError
        | RedisTimeoutError
        | OSError
        | InvalidResponse
        | ClusterError
        | SlotNotCoveredError
        | ReadOnlyError
        | TryAgainError
        | OutOfMemoryError
        | AskError
        | TimeoutError,
    ):
        return True
    if isinstance(error, ResponseError):
        words = str(error).split(maxsplit=1)
        return bool(words) and words[0].upper() in _TRANSIENT_REPLIES
    if isinstance(error, RedisClusterException):  # "all keys must map to the same key slot", ...
        return False
    return False


def call_deadline(timeout_seconds: float, retries: int) -> float:
    """Longest one Redis call may take, all tries included: (retries + 1) timeouts plus the pauses between."""
    return timeout_seconds * (retries + 1) + BACKOFF_CAP_SECONDS * retries


async def bounded(call: Callable[[], Awaitable[V]], seconds: float | None) -> V:
    """`await call()`, but in a task of its own and for at most `seconds`; TimeoutError after that.

    `asyncio.timeout` around a redis-py call is not a bound on Python 3.11: redis-py awaits each socket write
    with `asyncio.wait_for`, which swallows a cancellation that arrives as the write completes, and the call
    then goes on, its timeouts retried by redis-py (seen: a rate-limit check under `asyncio.timeout(0.8)` took
    4.9 s while Redis was stopped). Waiting on a task holds whatever the call does; at the deadline the task
    is cancelled and left to finish on its own.
    """
    if seconds is None:
        return await call()
    task = asyncio.ensure_future(call())
    try:
        done, _ = await asyncio.wait([task], timeout=seconds)
    except BaseException:  # the caller was cancelled: so is its call
        task.cancel()
        task.add_done_callback(_retrieve)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise TimeoutError(f"no answer within {seconds:g}s")
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Read an abandoned call's outcome, so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


class DirectCommands:
    """The hot path's commands on connections of their own, without redis-py's per-command machinery.

    redis-py's client spends more CPU per command on its pool, retry and telemetry wrappers than on
    sending and parsing (134 vs 60 us per EVALSHA, measured); the service's scripts go through here instead.

    Calls are coalesced: every `execute` issued in one event-loop iteration (a micro-batch's appends and
    state saves, say) is sent as one pipeline on one connection, at most `max_pipeline` per write, and each
    caller gets its own reply or its own error reply raised (NOSCRIPT included, so the caller's reload-and-retry
    still works per call). Many users' appends then cost one round trip and, with `appendfsync always`, one
    fsync. Callers bound concurrency (WindowStore's semaphore), so at most that many connections are opened.
    Connection errors and timeouts retry the whole pipeline `retries` times on fresh connections (safe for
    the scripts sent here: event ids make a repeated append a no-op, the saves are compare-and-set, reads
    change nothing); after the last try every caller gets the error. These are the only retries: the
    connections do not retry their own connect and handshake (redis-py's would, `retries` times per try).
    A pipeline whose callers have all given up (their deadlines passed) is cancelled and its connection
    dropped, so it neither retries for nobody nor keeps a connection open. (The cancellation can be lost:
    Python 3.11's `asyncio.wait_for`, which redis-py awaits a socket write with, swallows a cancellation
    that arrives as the write completes; so a try that fails also checks that someone still waits.)
    """

    def __init__(self, pool: BlockingConnectionPool, retries: int, max_pipeline: int = 64) -> None:
        self._pool = pool
        self._retries = retries
        self._max_pipeline = max_pipeline
        self._idle: deque[AbstractConnection] = deque()
        self._open: set[AbstractConnection] = set()
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._senders: set[asyncio.Task[None]] = set()
        self.pipelines = 0  # writes sent by execute (pipelined / pipelines = mean calls per round trip)
        self.pipelined = 0  # calls they carried
        self._closed = False

    @property
    def in_flight(self) -> list[asyncio.Task[None]]:
        """The pipelines being sent now."""
        return list(self._senders)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def execute(self, *args: Any) -> Any:
        """Send one command (with whatever else is issued in this loop iteration) and return its reply."""
        if self._closed:
            raise RedisConnectionError("the Redis client is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._max_pipeline == 1:  # coalescing off: this call alone, sent at once
            self._start([(args, future)])
        else:
            if not self._pending:  # the first call of this turn: flush once the turn's callers are in
                loop.call_soon(self._flush)
            self._pending.append((args, future))
        return await future  # only the reply: a caller's deadline holds whatever its pipeline does

    def _flush(self) -> None:
        calls = [(args, f) for args, f in self._pending if not f.done()]  # skip callers that gave up
        self._pending = []
        for i in range(0, len(calls), self._max_pipeline):
            self._start(calls[i : i + self._max_pipeline])

    def _start(self, calls: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        task = asyncio.get_running_loop().create_task(self._send(calls))
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)
        _cancel_when_abandoned(task, [f for _, f in calls])

    async def _send(self, calls: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        """One write, one read per call; resolve each caller's future with its reply or its error reply.
        Cancelled anywhere (shutdown, all callers gone), even during a retry's backoff: every caller still
        waiting gets an error at once."""
        try:
            await self._tries(calls)
        except BaseException as e:
            _fail([f for _, f in calls], RedisConnectionError(f"Redis call abandoned: {e!r}"))
            raise

    async def _tries(self, calls: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        for attempt in range(self._retries + 1):
            conn = self._idle.pop() if self._idle else self._new()
            replies: list[Any] = []
            try:
                if len(calls) == 1:
                    await conn.send_command(*calls[0][0])
                else:
                    await conn.send_packed_command(conn.pack_commands([args for args, _ in calls]))
                for _ in calls:
                    try:
                        replies.append(await conn.read_response())
                    except (
                        ResponseError
                    ) as e:  # an error reply (NOSCRIPT, ...) read in full: the next follows
                        replies.append(e)
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                await self._drop(conn)
                if all(f.done() for _, f in calls):  # every caller gave up: no retry for nobody
                    return
                if attempt == self._retries:
                    _fail([f for _, f in calls], e)
                    return
                # the idle connections most likely died with this one (Redis restarted): start afresh
                stale, self._idle = self._idle, deque()
                for idle in stale:
                    await self._drop(idle)
                await asyncio.sleep(min(0.01 * (attempt + 1), BACKOFF_CAP_SECONDS))
                continue
            except BaseException:  # cancelled mid-reply (shutdown), say: the connection's state is unknown (_send fails the callers)
                await self._drop(conn)
                raise
            self._idle.append(conn)
            self.pipelines += 1
            self.pipelined += len(calls)
            for (_, future), reply in zip(calls, replies, strict=True):
                if future.done():  # the caller gave up (its deadline passed)
                    continue
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
            return

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send `commands` in one write and read their replies (an error reply is returned, not raised).

        No retry: for best-effort writes only (live quality's stored predictions).
        """
        conn = self._idle.pop() if self._idle else self._new()
        replies: list[Any] = []
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as e:  # read in full: the next reply follows
                    replies.append(e)
        except BaseException:
            await self._drop(conn)
            raise
        self._idle.append(conn)
        return replies

    def _new(self) -> AbstractConnection:
        # no retry of its own: a try is one connect, one handshake, one write and its reads (see the class)
        kwargs = {**self._pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
        conn: AbstractConnection = self._pool.connection_class(**kwargs)
        self._open.add(conn)
        return conn

    async def _drop(self, conn: AbstractConnection) -> None:
        self._open.discard(conn)
        await conn.disconnect()

    async def close(self) -> None:
        self._closed = True
        _fail([f for _, f in self._pending], RedisConnectionError("the Redis client is closed"))
        self._pending = []
        for task in list(self._senders):
            task.cancel()
        if self._senders:
            await asyncio.wait(list(self._senders))
        self._idle.clear()
        for conn in list(self._open):
            await self._drop(conn)


def _cancel_when_abandoned(sender: asyncio.Task[None], futures: list[asyncio.Future[Any]]) -> None:
    """Cancel `sender` once every one of `futures` is done while it still runs: all its callers gave up."""
    left = len(futures)

    def one_done(_: asyncio.Future[Any]) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not sender.done():
            sender.cancel()

    for future in futures:
        future.add_done_callback(one_done)


def _fail(futures: list[asyncio.Future[Any]], error: BaseException) -> None:
    """Give each waiting caller its own copy of `error` (one exception object must not be raised twice)."""
    for future in futures:
        if future.done():
            continue
        try:
            copy = type(error)(*error.args)
        except TypeError:  # an exception class with another signature: a plain connection error
            copy = RedisConnectionError(str(error))
        copy.__cause__ = error
        future.set_exception(copy)


@dataclass
class RedisConnection:
    """A client plus what the rest of the service needs to know about it."""

    client: Any  # redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
    address: str  # host:port (or socket path) for messages; never the password
    cluster: bool
    direct: DirectCommands | None = None  # single server only: the cluster client routes by slot itself
    embedded: bool = False  # the development server started by this process group (NEXTACT_EMBEDDED_REDIS)

    async def close(self) -> None:
        if self.direct is not None:
            await self.direct.close()
        await self.client.aclose()


def redacted_address(url: str) -> str:
    """host:port (or the socket path) of a Redis URL, without credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    return f"{host}:{parts.port or 6379}"


def connect(
    url: str, max_connections: int, timeout_seconds: float, retries: int, max_pipeline: int = 64
) -> RedisConnection:
    """A client for `url` with bounded timeouts, a pool of `max_connections` and a short retry on errors.

    redis+cluster://host:port[,...] uses redis-py's cluster client (max_connections per node); every
    other scheme a single-server client whose pool makes callers wait (up to the timeout) for a connection;
    its script calls are coalesced into pipelines of at most `max_pipeline` (1: one round trip per call).
    """
    scheme = urlsplit(url).scheme
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=BACKOFF_CAP_SECONDS), retries)
    common: dict[str, Any] = {
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "retry": retry,
    }
    if scheme in CLUSTER_SCHEMES:
        plain = CLUSTER_SCHEMES[scheme] + url[len(scheme) :]
        client = RedisCluster.from_url(plain, max_connections=max_connections, **common)
        return RedisConnection(client, redacted_address(plain), cluster=True)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_seconds, **common
    )
    return RedisConnection(
        Redis.from_pool(pool),
        redacted_address(url),
        cluster=False,
        direct=DirectCommands(pool, retries, max_pipeline),
    )

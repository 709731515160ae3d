"""The asyncio Redis client for a URL: one server (redis://, rediss://, unix://) or a cluster (redis+cluster://)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hiredis
from redis._parsers.base import BaseParser
from redis._parsers.encoders import Encoder
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


_NOT_YET = object()  # hiredis.Reader.gets(): no complete reply buffered yet
_PUSH: type = getattr(hiredis, "PushNotification", ())  # a RESP3 push frame, as the reader returns it


class _Link:
    """One direct connection: redis-py connects it and runs the handshake (AUTH, SELECT, TLS...); the pipelines
    are then written to its stream as they are and their replies parsed by a hiredis reader of its own."""

    __slots__ = ("conn", "parser")

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        self.parser = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error, notEnoughData=_NOT_YET
        )

    async def exchange(self, payload: bytes, count: int, timeout: float | None) -> list[Any]:
        """Write `payload` (`count` commands) and read their `count` replies, all within `timeout` seconds.
        An error reply is returned in its place (NoScriptError, ResponseError...), not raised, unless redis-py
        counts it as a connection error (BusyLoadingError: Redis is loading its data): then the try fails."""
        conn = self.conn
        if not conn.is_connected:
            await conn.connect()  # redis-py's connect and handshake, bounded by its own timeouts
        writer, reader, parser = conn._writer, conn._reader, self.parser  # redis-py's streams, once connected
        assert writer is not None and reader is not None
        replies: list[Any] = []
        try:
            async with asyncio.timeout(timeout):
                writer.write(payload)
                await writer.drain()
                while len(replies) < count:
                    reply = parser.gets()
                    if reply is _NOT_YET:
                        data = await reader.read(65536)
                        if not data:
                            raise RedisConnectionError("Connection closed by server.")
                        parser.feed(data)
                    elif isinstance(reply, RedisConnectionError):  # LOADING, say: raised, as redis-py does
                        raise reply
                    elif isinstance(reply, _PUSH):  # RESP3 out-of-band (invalidations, maintenance notices):
                        continue  # not a reply to any command; counting it would shift every later reply
                    else:
                        replies.append(reply)
        except TimeoutError as e:
            raise RedisTimeoutError(f"no reply from Redis within {timeout:g}s") from e
        return replies


class DirectCommands:
    """The hot path's commands on connections of their own, without redis-py's per-command machinery.

    redis-py's client spends more CPU per command on its pool, retry and telemetry wrappers than on
    sending and parsing (134 vs 60 us per EVALSHA, measured); the service's scripts go through here instead.
    Packing and parsing are done here too (`_pack`, a hiredis reader per connection, one bound per try instead
    of a timer per reply): 5.1 instead of 13.2 us of client CPU per call (bench/redis_client_cost.py).

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
        self._idle: deque[_Link] = deque()
        self._open: set[_Link] = set()
        kwargs = pool.connection_kwargs
        self._timeout: float | None = kwargs.get("socket_timeout")  # one try's write and reads, together
        self._encoding = kwargs.get("encoding", "utf-8")
        self._encoding_errors = kwargs.get("encoding_errors", "strict")
        self._encoder = Encoder(self._encoding, self._encoding_errors, False)
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
        # only the reply is awaited: a caller's deadline holds whatever its pipeline does
        return await self._enqueue(args)

    async def execute_all(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """`execute` for many commands at once, without a coroutine each: every command's reply in order, or its
        error in its place (its error reply, or the connection's error after the last try), never raised."""
        futures = [self._enqueue(args) for args in commands]
        try:
            await asyncio.wait(futures)
        except BaseException:  # the caller gave up: so do its calls (an abandoned pipeline is then cancelled)
            for future in futures:
                future.cancel()
            raise
        return [f.exception() or f.result() for f in futures]

    def _enqueue(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
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
        return future

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
        payload = b"".join([self._pack(args) for args, _ in calls])  # packed once for every try
        for attempt in range(self._retries + 1):
            link = self._idle.pop() if self._idle else self._new()
            try:
                replies = await link.exchange(payload, len(calls), self._timeout)
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                await self._drop(link)
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
                await self._drop(link)
                raise
            self._idle.append(link)
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
        link = self._idle.pop() if self._idle else self._new()
        try:
            replies = await link.exchange(
                b"".join([self._pack(args) for args in commands]), len(commands), self._timeout
            )
        except BaseException:
            await self._drop(link)
            raise
        self._idle.append(link)
        return replies

    def _pack(self, args: tuple[Any, ...]) -> bytes:
        """One command in RESP: what redis-py's pack_command sends for these arguments, at a third of its cost."""
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            kind = type(arg)
            if kind is bytes:
                value = arg
            elif kind is str:
                value = arg.encode(self._encoding, self._encoding_errors)
            elif kind is int:
                value = b"%d" % arg
            else:  # floats, memoryviews, ...: redis-py's own rules (it refuses bool and None)
                value = bytes(self._encoder.encode(arg))
            out += (b"$%d\r\n" % len(value), value, b"\r\n")
        return b"".join(out)

    def _new(self) -> _Link:
        # no retry of its own: a try is one connect, one handshake, one write and its reads (see the class)
        kwargs = {**self._pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
        link = _Link(self._pool.connection_class(**kwargs))
        self._open.add(link)
        return link

    async def _drop(self, link: _Link) -> None:
        self._open.discard(link)
        await link.conn.disconnect()

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

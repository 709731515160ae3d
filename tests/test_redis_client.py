"""The direct command path against the real Redis: calls issued together go as one pipeline, and each caller
still gets its own reply, its own error reply and the retry on a dropped connection."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import AsyncIterator

import pytest
import redis
from redis.exceptions import BusyLoadingError, NoScriptError, ResponseError

from app.redis_client import DirectCommands, RedisConnection, bounded, connect
from app.redis_server import EmbeddedRedis, free_port
from app.windows import NewEvent, WindowStore

pytestmark = pytest.mark.anyio
ECHO = "return ARGV[1]"


@pytest.fixture
async def conn(redis_url: str) -> AsyncIterator[RedisConnection]:
    connection = connect(redis_url, max_connections=16, timeout_seconds=2, retries=2)
    yield connection
    await connection.close()


def _direct(conn: RedisConnection) -> DirectCommands:
    assert conn.direct is not None
    return conn.direct


async def test_calls_issued_together_share_one_round_trip_and_keep_their_own_replies(
    conn: RedisConnection, redis_url: str
) -> None:
    sha = await conn.client.script_load(ECHO)
    redis.Redis.from_url(redis_url).set("pipe:str", "not a number")
    direct = _direct(conn)
    before = direct.pipelines, direct.pipelined
    calls = [direct.execute("EVALSHA", sha, 0, f"r{i}") for i in range(20)]
    calls.insert(5, direct.execute("EVALSHA", "0" * 40, 0, "x"))  # unknown script
    calls.insert(9, direct.execute("INCR", "pipe:str"))  # an error reply of another kind
    got = await asyncio.gather(*calls, return_exceptions=True)
    assert (direct.pipelines - before[0], direct.pipelined - before[1]) == (1, 22)
    assert isinstance(got[5], NoScriptError)
    assert isinstance(got[9], ResponseError) and "not an integer" in str(got[9])
    assert got[5] is not got[9]
    assert [g for i, g in enumerate(got) if i not in (5, 9)] == [f"r{i}".encode() for i in range(20)]
    assert await direct.execute("EVALSHA", sha, 0, "after") == b"after"  # the connection is still usable


async def test_a_dropped_connection_retries_the_whole_pipeline(conn: RedisConnection, redis_url: str) -> None:
    sha = await conn.client.script_load(ECHO)
    direct = _direct(conn)
    assert await direct.execute("EVALSHA", sha, 0, "warm") == b"warm"  # an idle connection now exists
    killed = redis.Redis.from_url(redis_url).client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    got = await asyncio.gather(*(direct.execute("EVALSHA", sha, 0, str(i)) for i in range(8)))
    assert got == [str(i).encode() for i in range(8)]


async def test_concurrent_appends_share_a_pipeline_and_reload_a_flushed_script(
    conn: RedisConnection, redis_url: str
) -> None:
    store = WindowStore(conn.client, "pipe", 100, conn.address, max_concurrency=16, direct=conn.direct)
    await store.load_script()
    redis.Redis.from_url(redis_url).script_flush()  # every call gets NOSCRIPT and reloads on its own
    direct = _direct(conn)
    before = direct.pipelines
    users = [f"u{i}" for i in range(12)]
    got = await asyncio.gather(
        *(store.append(u, [NewEvent(f"{u}-e", f"a-{u}", 10.0)], capacity=5) for u in users)
    )
    assert [(g.accepted, g.actions) for g in got] == [(1, [f"a-{u}"]) for u in users]
    assert direct.pipelines - before < 2 * len(users)  # the first tries shared one
    before = direct.pipelines
    again = await asyncio.gather(
        *(store.append(u, [NewEvent(f"{u}-e", "x", 10.0)], capacity=5) for u in users)
    )
    assert all(g.accepted == 0 and g.duplicates == 1 for g in again)
    assert direct.pipelines - before == 1  # twelve users' appends, one round trip


async def test_a_closed_client_fails_pending_calls(redis_url: str) -> None:
    connection = connect(redis_url, max_connections=4, timeout_seconds=2, retries=0)
    direct = _direct(connection)
    call = asyncio.ensure_future(direct.execute("PING"))
    await asyncio.sleep(0)  # queued, not yet sent
    await connection.close()
    with pytest.raises(redis.exceptions.ConnectionError):
        await call
    with pytest.raises(redis.exceptions.ConnectionError, match="closed"):
        await direct.execute("PING")


async def test_pipeline_max_one_sends_each_call_on_its_own(redis_url: str) -> None:
    connection = connect(redis_url, max_connections=8, timeout_seconds=2, retries=0, max_pipeline=1)
    direct = _direct(connection)
    try:
        got = await asyncio.gather(
            *(direct.execute("ECHO", str(i)) for i in range(5)),
            direct.execute("NOPE"),
            return_exceptions=True,
        )
        assert got[:5] == [str(i).encode() for i in range(5)] and isinstance(got[5], ResponseError)
        assert (direct.pipelines, direct.pipelined) == (6, 6)
    finally:
        await connection.close()


async def test_a_pipeline_whose_callers_all_gave_up_is_cancelled_and_drops_its_connection(
    stopped_redis: EmbeddedRedis,
) -> None:
    """fails on the code before: yes (the pipeline went on reading and retrying, T x (R + 1) = 8 s, for nobody)."""
    connection = connect(stopped_redis.url, max_connections=4, timeout_seconds=2, retries=3)
    direct = _direct(connection)
    try:
        assert await direct.execute("PING") == b"PONG"
        assert stopped_redis.process is not None
        os.kill(stopped_redis.process.pid, signal.SIGSTOP)
        calls = [asyncio.ensure_future(direct.execute("ECHO", str(i))) for i in range(3)]
        for _ in range(3):  # a few loop turns: the three calls go out as one pipeline and wait for replies
            await asyncio.sleep(0)
        (sender,) = direct.in_flight
        assert direct.open_connections == 1
        calls[0].cancel()
        calls[1].cancel()
        await asyncio.sleep(0)
        assert sender.cancelling() == 0  # one caller still waits: the pipeline goes on
        calls[2].cancel()  # the last caller gives up (its deadline passed, say)
        await asyncio.sleep(0)
        assert sender.cancelling() == 1
        await asyncio.wait([sender])
        assert direct.pipelines == 1  # the warm-up PING only
        # cancelled, or (the cancellation lost in redis-py's write) ended after this one try: no retries
        assert direct.open_connections == 0 and not direct.in_flight
        assert all(c.cancelled() for c in calls)
    finally:
        await connection.close()


async def test_bounded_holds_even_when_the_call_ignores_its_cancellation() -> None:
    """The case redis-py's retry makes (a timeout's cancellation turned into a retried TimeoutError): the
    caller is still answered at its deadline, which `asyncio.timeout` alone cannot promise."""
    release = asyncio.Event()

    async def stubborn() -> str:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # swallowed, as a retry loop would
        return "late"

    with pytest.raises(TimeoutError):
        await bounded(stubborn, 0.05)
    release.set()
    assert await bounded(lambda: asyncio.sleep(0, "fast"), 1.0) == "fast"


@pytest.mark.parametrize("pipeline_max", [1, 64])
async def test_close_during_a_retry_backoff_fails_the_waiting_caller(pipeline_max: int) -> None:
    """A call retrying against a refused port (between two tries when close() comes) gets an error at once,
    not at its deadline."""
    connection = connect(
        f"redis://127.0.0.1:{free_port()}/0",
        max_connections=2,
        timeout_seconds=0.5,
        retries=50,
        max_pipeline=pipeline_max,
    )
    direct = _direct(connection)
    call = asyncio.ensure_future(direct.execute("PING"))
    await asyncio.sleep(0.05)  # refused connects: a sender is retrying
    assert direct.in_flight and not call.done()
    await connection.close()
    done, _ = await asyncio.wait([call], timeout=1.0)
    assert done, "the caller is still waiting after close()"
    with pytest.raises(redis.exceptions.ConnectionError):
        call.result()


async def test_bounded_reads_the_outcome_of_a_call_whose_caller_was_cancelled() -> None:
    """A cancelled caller's abandoned call that fails later: its error is read (asyncio logs nothing)."""
    loop = asyncio.get_running_loop()
    unread: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: unread.append(context))

    async def fails_after_cancellation() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            pass  # swallowed, as redis-py's wait_for can
        await asyncio.sleep(0.01)
        raise ConnectionError("Redis went away")

    caller = asyncio.ensure_future(bounded(fails_after_cancellation, 5.0))
    await asyncio.sleep(0.02)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0.1)
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not unread, unread


async def test_an_error_reply_redis_py_counts_as_a_connection_error_fails_the_try_and_is_retried(
    conn: RedisConnection,
) -> None:
    direct = _direct(conn)
    loading = "return redis.error_reply('LOADING Redis is loading the dataset in memory')"
    before = direct.pipelines
    with pytest.raises(BusyLoadingError):  # raised after every try, never handed back as a reply
        await direct.execute("EVAL", loading, 0)
    assert direct.pipelines == before  # no try counted as answered
    assert await direct.execute("EVAL", "return ARGV[1]", 0, "fine") == b"fine"  # a fresh connection works


async def test_a_push_frame_on_a_direct_link_is_not_taken_for_a_reply(redis_url: str) -> None:
    """RESP3 pushes (client-side caching invalidations, a managed Redis's maintenance notices) arrive between
    replies; each caller must still get its own reply."""
    connection = connect(redis_url, max_connections=1, timeout_seconds=2, retries=0)
    plain = redis.Redis.from_url(redis_url)
    plain.set("push:k", "v1")
    try:
        direct = connection.direct
        assert direct is not None
        assert await direct.execute("HELLO", "3")  # RESP3 on this link: pushes arrive between replies
        assert await direct.execute("CLIENT", "TRACKING", "ON") == b"OK"
        assert await direct.execute("GET", "push:k") == b"v1"  # now tracked: a change pushes an invalidation
        plain.set("push:k", "v2")
        await asyncio.sleep(0.1)  # the push is in the link's buffer before the next replies
        assert await direct.execute("ECHO", "first") == b"first"
        assert await direct.execute("ECHO", "second") == b"second"
    finally:
        plain.close()
        await connection.close()

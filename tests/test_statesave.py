"""Incremental state saved behind the answer: bounded, every outcome counted, failures logged, per-user settle
(with the pending prediction write, in one wait)."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis
from prometheus_client import CollectorRegistry

from app.observability import Metrics
from app.quality import LiveQuality, PredictionLog
from app.redis_client import RedisConnection, connect
from app.redis_server import EmbeddedRedis, free_port
from app.statesave import StateSaver, settle_all
from app.windows import NewEvent, WindowStore

pytestmark = pytest.mark.anyio


def _count(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("nextact_state_saves_total", {"outcome": outcome})
    return value or 0.0


async def test_saves_are_bounded_counted_and_settled(redis_url: str) -> None:
    conn = connect(redis_url, 8, 2.0, 1)
    store = WindowStore(conn.client, "ss", 100, conn.address, direct=conn.direct)
    await store.load_script()
    metrics = Metrics()
    saver = StateSaver(store, metrics, max_pending=2)
    try:
        seqs = {}
        for u in ("a", "b", "c"):
            seqs[u] = (await store.append_with_state(u, [NewEvent("e1", "x", 1.0)], 5, "v")).seq
        saver.save("a", seqs["a"], "v", b"A")
        saver.save("b", seqs["b"] - 1, "v", b"old")  # behind the counter: compare-and-set refuses it
        saver.save("c", seqs["c"], "v", b"C")  # a third in flight: over the bound
        assert saver.pending == 2 and _count(metrics, "dropped") == 1
        await saver.settle("a")
        assert (await store.append_with_state("a", [NewEvent("e2", "y", 2.0)], 5, "v")).state == b"A"
        await saver.drain()
        assert saver.pending == 0
        assert (_count(metrics, "stored"), _count(metrics, "stale")) == (1, 1)
        assert (
            await store.append_with_state("c", [NewEvent("e2", "y", 2.0)], 5, "v")
        ).state is None  # dropped
    finally:
        await conn.close()


async def test_a_failed_save_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    conn = connect(f"redis://127.0.0.1:{free_port()}/0", 2, 0.2, 0)  # nothing listens there
    store = WindowStore(conn.client, "ss", 100, conn.address, direct=conn.direct, call_timeout_seconds=1.0)
    metrics = Metrics()
    saver = StateSaver(store, metrics)
    try:
        with caplog.at_level(logging.WARNING, logger="app.statesave"):
            saver.save("u", 1, "v", b"S")
            await saver.drain()
        assert _count(metrics, "failed") == 1
        assert "incremental state not stored" in caplog.text and "'u'" not in caplog.text  # no user id logged
    finally:
        await conn.close()


async def test_settle_all_waits_for_both_pending_writes_of_the_user_and_gives_up_on_a_hung_redis(
    stopped_redis: EmbeddedRedis,
) -> None:
    conn = connect(stopped_redis.url, 8, 2.0, 0)
    store = WindowStore(conn.client, "ss", 100, conn.address, direct=conn.direct, call_timeout_seconds=2.0)
    await store.load_script()
    saver = StateSaver(store, Metrics())
    log = PredictionLog(store, LiveQuality(CollectorRegistry()))
    try:
        seq = (await store.append_with_state("u", [NewEvent("e1", "x", 1.0)], 5, "v")).seq
        saver.save("u", seq, "v", b"S")
        log.remember("u", seq, b"P")
        pending = [saver.pending_for("u"), log.pending_for("u")]
        assert all(p is not None for p in pending) and saver.pending_for("other") is None
        await settle_all("u", log, saver, None)  # Redis answers: both writes land
        assert all(p is not None and p.done() for p in pending)
        assert saver.pending_for("u") is None and log.pending_for("u") is None

        seq = (await store.append_with_state("u", [NewEvent("e2", "y", 2.0)], 5, "v")).seq
        saver.save("u", seq, "v", b"S2")
        log.remember("u", seq, b"P2")
        assert stopped_redis.process is not None
        os.kill(stopped_redis.process.pid, signal.SIGSTOP)
        await settle_all("u", log, saver)  # Redis hangs: one wait for both, then on without them
        late = [saver.pending_for("u"), log.pending_for("u")]
        assert all(p is not None and not p.done() for p in late)
        os.kill(stopped_redis.process.pid, signal.SIGCONT)
        await saver.drain()
        await log.drain()
        assert saver.pending_for("u") is None and log.pending_for("u") is None
    finally:
        await conn.close()


@asynccontextmanager
async def _direct_saver(
    redis_url: str, prefix: str
) -> AsyncIterator[tuple[RedisConnection, WindowStore, Metrics, StateSaver, redis.Redis]]:
    """A state saver on a direct-path window store, its metrics, and a plain client to read Redis with."""
    conn = connect(redis_url, 8, 2.0, 1)
    assert conn.direct is not None
    store = WindowStore(conn.client, prefix, 100, conn.address, direct=conn.direct)
    await store.load_script()
    metrics = Metrics()
    plain = redis.Redis.from_url(redis_url)
    try:
        yield conn, store, metrics, StateSaver(store, metrics), plain
    finally:
        plain.close()
        await conn.close()


async def test_one_turns_saves_go_in_one_write_each_with_its_users_predictions(redis_url: str) -> None:
    async with _direct_saver(redis_url, "ssp") as (conn, store, metrics, saver, plain):
        assert conn.direct is not None
        seqs = {}
        for u in ("a", "b", "c", "d"):
            seqs[u] = (await store.append_with_state(u, [NewEvent("e1", "x", 1.0)], 5, "v")).seq
        before = conn.direct.pipelines
        assert saver.save("a", seqs["a"], "v", b"A", b"PA")  # state and predictions, one call
        assert saver.save("b", seqs["b"], "v", b"B")  # state alone
        assert saver.save("c", seqs["c"] - 1, "v", b"old", b"PC")  # stale: neither is written
        assert saver.save("d", seqs["d"], "v", b"D", b"PD")
        assert saver.pending == 4
        await saver.drain()
        assert conn.direct.pipelines - before == 1  # the four saves of this turn: one round trip
        assert (_count(metrics, "stored"), _count(metrics, "stale"), saver.pending) == (3, 1, 0)
        a = plain.hgetall(store.state_key("a"))
        assert (a[b"x"], a[b"p"], int(a[b"pn"]), int(a[b"n"])) == (b"A", b"PA", seqs["a"], seqs["a"])
        assert (
            b"p" not in plain.hgetall(store.state_key("b")) and plain.hget(store.state_key("b"), "x") == b"B"
        )
        assert not {b"x", b"p"} & set(plain.hgetall(store.state_key("c")))
        assert plain.hget(store.state_key("d"), "p") == b"PD"
        # the predictions stored with the state score the next event, as SAVE_PREDICTION_LUA's would
        nxt = await store.append_with_state("a", [NewEvent("e2", "y", 2.0)], 5, "v")
        assert (nxt.result.last.records, nxt.state) == (b"PA", b"A")


async def test_saves_survive_a_flushed_script_cache_and_report_each_users_refusal(redis_url: str) -> None:
    async with _direct_saver(redis_url, "ssf") as (_, store, metrics, saver, plain):
        seq = (await store.append_with_state("u", [NewEvent("e1", "x", 1.0)], 5, "v")).seq
        plain.set(store.keys("w")[0], "not a packed window")  # this user's save is refused (WRONGTYPE)
        plain.script_flush()  # every call of the write gets NOSCRIPT: loaded again, sent again
        saver.save("u", seq, "v", b"S")
        saver.save("w", 1, "v", b"W")
        await saver.drain()
        assert (_count(metrics, "stored"), _count(metrics, "failed")) == (1, 1)
        assert plain.hget(store.state_key("u"), "x") == b"S"

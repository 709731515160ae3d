"""The window store against the real Redis: order, ties, dedupe, trim, TTL, erase, script reload, concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.redis_client import RedisConnection, connect
from app.redis_server import free_port
from app.windows import NewEvent, StoreUnavailable, WindowStore

pytestmark = pytest.mark.anyio
TTL = 1000


@pytest.fixture
async def conn(redis_url: str) -> AsyncIterator[RedisConnection]:
    connection = connect(redis_url, max_connections=16, timeout_seconds=2, retries=1)
    yield connection
    await connection.close()


@pytest.fixture
def store(conn: RedisConnection) -> WindowStore:
    return WindowStore(conn.client, "t", TTL, conn.address, max_concurrency=16, direct=conn.direct)


def ev(event_id: str, action: str, ts: float) -> NewEvent:
    return NewEvent(event_id, action, ts)


async def test_keys_share_the_users_hash_slot(store: WindowStore) -> None:
    from redis.crc import key_slot

    for user in ["u1", "a}b", "{x}", "ünï", "x" * 300]:
        keys = (*store.keys(user), store.state_key(user), *store.old_keys(user))
        tag = user if "{" not in user and "}" not in user else user.encode().hex()  # braces: hex tag
        assert len(set(keys)) == 4 and all(tag in k for k in keys)
        assert len({key_slot(k.encode()) for k in keys}) == 1
    assert store.keys("u1") == ("t:{u1}:e",)
    assert store.old_keys("u1") == ("t:{u1}:w", "t:{u1}:i")


async def test_events_are_ordered_by_timestamp_and_ties_keep_arrival_order(store: WindowStore) -> None:
    got = await store.append("u", [ev("a", "x1", 30), ev("b", "x2", 10)], capacity=10)
    assert got.actions == ["x2", "x1"]
    got = await store.append(
        "u", [ev("c", "late", 20), ev("d", "tie1", 10), ev("e", "tie2", 10)], capacity=10
    )
    assert got.actions == ["x2", "tie1", "tie2", "late", "x1"]
    events = await store.events("u")
    assert [(e.event_id, e.action, e.timestamp) for e in events] == [
        ("b", "x2", 10.0),
        ("d", "tie1", 10.0),
        ("e", "tie2", 10.0),
        ("c", "late", 20.0),
        ("a", "x1", 30.0),
    ]


async def test_known_event_ids_are_skipped(store: WindowStore) -> None:
    got = await store.append("u", [ev("a", "x", 1), ev("a", "y", 2), ev("b", "z", 3)], capacity=10)
    assert (got.accepted, got.duplicates, got.actions) == (2, 1, ["x", "z"])
    again = await store.append("u", [ev("b", "z", 3), ev("a", "x", 1)], capacity=10)
    assert (again.accepted, again.duplicates, again.actions) == (0, 2, ["x", "z"])
    other = await store.append("v", [ev("a", "x", 1)], capacity=10)  # ids are per user
    assert other.accepted == 1


async def test_the_window_is_trimmed_to_capacity_with_its_index(store: WindowStore, redis_url: str) -> None:
    for start in range(0, 30, 7):
        got = await store.append("u", [ev(f"e{i}", f"a{i}", i) for i in range(start, start + 7)], capacity=5)
        assert len(got.actions) <= 5
    assert got.actions == [f"a{i}" for i in range(30, 35)]
    sync = redis.Redis.from_url(redis_url)
    try:
        assert [e.event_id for e in await store.events("u")] == [f"e{n}" for n in range(30, 35)]
        assert sync.exists(*store.old_keys("u")) == 0  # one key holds the window, its ids and the counter
    finally:
        sync.close()
    old = await store.append(
        "u", [ev("e0", "again", 0)], capacity=5
    )  # trimmed away: stored, then trimmed again
    assert old.actions == [f"a{i}" for i in range(30, 35)]
    assert await store.actions("u", capacity=3) == ["a32", "a33", "a34"]


async def test_both_keys_expire_after_the_ttl(store: WindowStore, redis_url: str) -> None:
    await store.append("u", [ev("a", "x", 1)], capacity=5)
    sync = redis.Redis.from_url(redis_url)
    try:
        for key in store.keys("u"):
            assert TTL - 5 <= sync.ttl(key) <= TTL
        sync.expire(store.keys("u")[0], 5)
        await store.append("u", [ev("b", "y", 2)], capacity=5)  # activity refreshes it
        assert sync.ttl(store.keys("u")[0]) > 5
    finally:
        sync.close()


async def test_delete_erases_both_keys(store: WindowStore, redis_url: str) -> None:
    await store.append("u", [ev("a", "x", 1)], capacity=5)
    await store.delete("u")
    await store.delete("never-seen")
    assert await store.events("u") == []
    sync = redis.Redis.from_url(redis_url)
    try:
        assert sync.exists(*store.keys("u")) == 0
    finally:
        sync.close()
    again = await store.append("u", [ev("a", "x", 1)], capacity=5)
    assert again.accepted == 1


async def test_any_strings_round_trip(store: WindowStore) -> None:
    weird = [("ïd|1\x1f", "act|ion\n\x00"), ("😀" * 50, ""), ("x" * 4000, "y" * 5000), ("0000", "0001")]
    await store.append("üser}{", [ev(i, a, n) for n, (i, a) in enumerate(weird)], capacity=10)
    assert [(e.event_id, e.action) for e in await store.events("üser}{")] == weird


async def test_the_script_is_reloaded_after_redis_forgets_it(store: WindowStore, redis_url: str) -> None:
    await store.load_script()
    sync = redis.Redis.from_url(redis_url)
    try:
        sync.script_flush()
    finally:
        sync.close()
    got = await store.append("u", [ev("a", "x", 1)], capacity=5)
    assert got.actions == ["x"]


async def test_concurrent_appends_for_one_user_lose_nothing(store: WindowStore) -> None:
    results = await asyncio.gather(
        *(store.append("u", [ev(f"e{i}", f"a{i}", i % 7)], capacity=500) for i in range(200))
    )
    assert sum(r.accepted for r in results) == 200
    events = await store.events("u")
    assert sorted(e.event_id for e in events) == sorted(f"e{i}" for i in range(200))
    assert [e.timestamp for e in events] == sorted(e.timestamp for e in events)


async def test_an_unreachable_redis_is_store_unavailable() -> None:
    port = free_port()
    conn = connect(f"redis://127.0.0.1:{port}/0", max_connections=4, timeout_seconds=0.5, retries=1)
    store = WindowStore(conn.client, "t", TTL, conn.address, max_concurrency=4, direct=conn.direct)
    try:
        for call in (
            store.append("u", [ev("a", "x", 1)], 5),
            store.actions("u", 5),
            store.events("u"),
            store.delete("u"),
            store.ping(),
        ):
            with pytest.raises(StoreUnavailable, match=f"Redis at 127.0.0.1:{port} is unavailable"):
                await call
    finally:
        await conn.close()


events_strategy = st.lists(
    st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 6), st.sampled_from(["pv", "cart", "buy"])),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(events_strategy, min_size=1, max_size=4), capacity=st.integers(1, 8))
def test_the_window_matches_a_simple_model(
    redis_url: str, batches: list[list[tuple[str, int, str]]], capacity: int
) -> None:
    """After each append the window is the newest `capacity` events by (timestamp, arrival), ids distinct."""

    async def check() -> None:
        conn = connect(redis_url, max_connections=2, timeout_seconds=2, retries=0)
        store = WindowStore(conn.client, "h", TTL, conn.address, max_concurrency=2)
        try:
            await store.delete("p")
            kept: list[tuple[float, int, str, str]] = []  # (ts, arrival, id, action), the model
            arrival = 0
            for batch in batches:
                await store.append("p", [ev(i, a, t) for i, t, a in batch], capacity)
                for i, t, a in batch:  # dedupe against the window plus this batch, then trim once
                    if i not in {k[2] for k in kept}:
                        arrival += 1
                        kept.append((t, arrival, i, a))
                kept = sorted(kept)[-capacity:]
            stored = await store.events("p")
            assert [(e.timestamp, e.event_id, e.action) for e in stored] == [(t, i, a) for t, _, i, a in kept]
        finally:
            await conn.close()

    asyncio.run(check())


async def test_a_cluster_keeps_each_users_window_on_one_node(tmp_path: Path) -> None:
    from tests.redis_cluster import LocalRedisCluster

    cluster = LocalRedisCluster(tmp_path).start()
    conn = connect(cluster.url, max_connections=4, timeout_seconds=2, retries=1)
    try:
        assert conn.cluster
        store = WindowStore(conn.client, "c", TTL, conn.address, max_concurrency=4)
        await store.load_script()
        users = [f"user-{n}" for n in range(12)]  # spread over the three masters
        results = await asyncio.gather(
            *(store.append(u, [ev(f"{u}-{i}", f"a{i}", 5 - i) for i in range(5)], 3) for u in users)
        )
        assert all(r.actions == ["a2", "a1", "a0"] for r in results)  # newest three by timestamp
        assert [e.event_id for e in await store.events("user-3")] == ["user-3-2", "user-3-1", "user-3-0"]
        await store.delete("user-3")
        assert await store.actions("user-3", 3) == []
        await conn.client.script_flush()
        assert (await store.append("user-4", [ev("new", "z", 9)], 3)).actions == ["a1", "a0", "z"]
    finally:
        await conn.close()
        cluster.stop()


async def test_the_store_recovers_its_connections_after_a_redis_restart(tmp_path: Path) -> None:
    from app.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp_path, port=free_port()).start()
    conn = connect(server.url, max_connections=8, timeout_seconds=1, retries=1)
    store = WindowStore(conn.client, "t", TTL, conn.address, max_concurrency=8, direct=conn.direct)
    try:
        await asyncio.gather(
            *(store.append("u", [ev(f"a{i}", "x", i)], 50) for i in range(16))
        )  # 8 idle conns
        server.stop()
        server.start()  # replays its append-only file; every pooled connection is dead
        got = await store.append("u", [ev("b", "y", 100)], 50)
        assert (got.accepted, len(got.actions)) == (1, 17)
        server.stop()
        with pytest.raises(StoreUnavailable, match="is unavailable"):
            await store.append("u", [ev("lost", "x", 99)], 50)
        server.start()
        assert (await store.append("u", [ev("c", "z", 101)], 50)).actions[-2:] == ["y", "z"]
    finally:
        await conn.close()
        server.stop()


async def test_the_append_hands_back_the_prediction_for_the_window_before_it(store: WindowStore) -> None:
    from app.windows import LATE, NO_PREDICTION, NOTHING_NEW, SCORED

    first = await store.append("q", [ev("a", "x", 1)], capacity=5)
    assert first.last.outcome == NO_PREDICTION and first.seq == 1  # a new user: nothing stored yet
    assert await store.save_prediction("q", first.seq, b"records-1")
    # two new events: the earliest (by timestamp, not by position in the request) is the one scored
    got = await store.append("q", [ev("c", "z", 3), ev("b", "y", 2)], capacity=5)
    assert (got.last.outcome, got.last.event, got.last.records) == (SCORED, 1, b"records-1")
    assert not await store.save_prediction("q", first.seq, b"stale")  # another event arrived since: refused
    assert await store.save_predictions([("q", got.seq, b"records-2"), ("r", 0, b"no such window")]) == 1
    dup = await store.append("q", [ev("c", "z", 3)], capacity=5)
    assert dup.last.outcome == NOTHING_NEW and dup.seq == got.seq
    late = await store.append("q", [ev("d", "w", 2.5)], capacity=5)
    assert late.last.outcome == LATE
    after = await store.append("q", [ev("e", "v", 4)], capacity=5)
    assert after.last.outcome == NO_PREDICTION  # the prediction after the late event was never stored
    assert await store.save_prediction("q", after.seq, b"records-3")
    await store.delete("q")  # erased with the window
    assert (await store.append("q", [ev("f", "u", 5)], capacity=5)).last.outcome == NO_PREDICTION

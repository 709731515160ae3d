"""Windows written by earlier versions (sorted set + dedupe hash) keep working: read as they are, converted by
the next append into the packed window with order, ids, counter, state and TTL kept."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator

import pytest
import redis

from app import windows_legacy as legacy
from app.redis_client import RedisConnection, connect
from app.windows import NewEvent, WindowStore

pytestmark = pytest.mark.anyio
PREFIX, TTL, CAP = "up", 1000, 8


@pytest.fixture
async def conn(redis_url: str) -> AsyncIterator[RedisConnection]:
    connection = connect(redis_url, max_connections=8, timeout_seconds=2, retries=1)
    yield connection
    await connection.close()


@pytest.fixture
def store(conn: RedisConnection) -> WindowStore:
    return WindowStore(conn.client, PREFIX, TTL, conn.address, direct=conn.direct)


@pytest.fixture
def sync(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    client.script_load(legacy.APPEND_LUA)
    return client


def old_append(sync: redis.Redis, user: str, events: list[NewEvent], capacity: int = CAP) -> int:
    """An append by an earlier version; returns its arrival counter after."""
    reply = sync.execute_command(*legacy.append_command(PREFIX, user, events, capacity, TTL))
    return int(reply[3])


def random_events(rng: random.Random, n: int, start: float) -> list[NewEvent]:
    """Every kind of id and action the packed format encodes differently, ties and late events included."""
    out = []
    for i in range(n):
        event_id = rng.choice(
            [
                uuid.uuid4().hex,  # server-assigned: stored as 16 bytes
                uuid.uuid4().hex.upper(),  # 32 hex digits, not lowercase: stored as sent
                uuid.uuid4().hex[:31],
                str(uuid.uuid4()),  # a UUID: 16 bytes too
                str(uuid.uuid4()).upper(),  # stored as sent
                f"e-{rng.randrange(40)}",  # often repeated: duplicates
                "ï" * rng.choice([63, 64, 200]),  # 126, 128, 400 bytes
            ]
        )
        action = rng.choice(
            ["pv", "", "e" * 62, "f" * 63, "ü" * 63, "a" * 127, "b" * 254, "c" * 255, "d" * 300, str(i)]
        )
        ts = start + rng.choice([0, 0, 1.5, -3, 10]) + i  # ties and late events
        out.append(NewEvent(event_id, action, ts))
    return out


def old_window(sync: redis.Redis, user: str) -> list[tuple[str, str, float]]:
    members = sync.zrange(legacy.keys(PREFIX, user)[0], 0, -1, withscores=True)
    out = []
    for member, score in members:
        n = int(member[12:16], 16)
        out.append((member[16 : 16 + n].decode(), member[16 + n :].decode(), float(score)))
    return out


async def window(store: WindowStore, user: str) -> list[tuple[str, str, float]]:
    return [(e.event_id, e.action, e.timestamp) for e in await store.events(user)]


async def test_an_old_window_is_read_as_it_is_without_touching_it(
    store: WindowStore, sync: redis.Redis
) -> None:
    rng = random.Random(1)
    for batch in range(4):
        old_append(sync, "u", random_events(rng, 5, 100.0 * batch))
    sync.expire(legacy.keys(PREFIX, "u")[0], 500)
    before = old_window(sync, "u")
    assert len(before) == CAP
    assert await window(store, "u") == before
    assert await store.actions("u", CAP) == [a for _, a, _ in before]
    assert await store.actions("u", 3) == [a for _, a, _ in before[-3:]]
    assert 490 <= sync.ttl(legacy.keys(PREFIX, "u")[0]) <= 500  # reads do not refresh the TTL
    assert not sync.exists(*store.keys("u"))


async def test_the_next_append_converts_the_window_with_order_ids_and_counter(
    store: WindowStore, sync: redis.Redis
) -> None:
    """Random histories, switched from the old script to the new one at a random point, end exactly where
    the same history written by the new script alone ends: the same events, actions, counts and counter;
    and that is where the old script alone ends too."""
    rng = random.Random(7)
    for trial in range(16):
        batches = [random_events(rng, rng.randint(1, 6), 50.0 * b) for b in range(rng.randint(2, 7))]
        switch = rng.randint(1, len(batches) - 1)
        sub, ref, old = f"sub{trial}", f"ref{trial}", f"old{trial}"
        for b, events in enumerate(batches):
            expected = await store.append(ref, events, CAP)
            assert old_append(sync, old, events) == expected.seq
            if b < switch:
                assert old_append(sync, sub, events) == expected.seq
                continue
            got = await store.append(sub, events, CAP)
            assert (got.accepted, got.duplicates, got.actions, got.seq) == (
                expected.accepted,
                expected.duplicates,
                expected.actions,
                expected.seq,
            )
            assert got.last.outcome == expected.last.outcome
        assert await window(store, sub) == await window(store, ref) == old_window(sync, old)
        assert got.actions == [a for _, a, _ in old_window(sync, old)]
        assert sync.exists(*store.old_keys(sub)) == 0  # converted: the old keys are gone
        # the same bytes as a window the new script wrote, counter included
        assert sync.get(store.keys(sub)[0]) == sync.get(store.keys(ref)[0])
        assert TTL - 5 <= sync.ttl(store.keys(sub)[0]) <= TTL


async def test_ids_of_a_converted_window_are_still_duplicates(store: WindowStore, sync: redis.Redis) -> None:
    server_id = uuid.uuid4().hex
    old_append(sync, "u", [NewEvent(server_id, "pv", 1), NewEvent("client-1", "cart", 2)])
    got = await store.append("u", [NewEvent("client-1", "x", 3), NewEvent(server_id, "y", 4)], CAP)
    assert (got.accepted, got.duplicates, got.actions, got.seq) == (0, 2, ["pv", "cart"], 2)
    assert sync.exists(*store.old_keys("u")) == 0 and sync.exists(*store.keys("u")) == 1


async def test_incremental_state_and_predictions_survive_the_upgrade(
    store: WindowStore, sync: redis.Redis
) -> None:
    """The old layout's arrival counter carries over, so the state stored for it is still usable."""
    seq = old_append(sync, "u", [NewEvent("a", "pv", 1), NewEvent("b", "cart", 2)])
    state_keys = legacy.keys(PREFIX, "u")[1:]
    assert sync.eval(legacy.SAVE_STATE_LUA, 2, *state_keys, seq, "v1", b"STATE", TTL) == 1
    assert sync.eval(legacy.SAVE_PREDICTION_LUA, 2, *state_keys, seq, b"PRED", TTL) == 1
    got = await store.append_with_state("u", [NewEvent("c", "buy", 3)], CAP, "v1")
    assert got.state == b"STATE" and got.result.actions == ["pv", "cart", "buy"] and got.seq == seq + 1
    assert got.result.last.records == b"PRED" and got.result.last.event == 0
    assert await store.save_state("u", got.seq, "v1", b"NEXT")
    assert not await store.save_state("u", seq, "v1", b"STALE")  # compare-and-set on the counter
    again = await store.append_with_state("u", [NewEvent("d", "pv", 4)], CAP, "v1")
    assert again.state == b"NEXT"


async def test_events_an_older_replica_writes_after_the_conversion_are_merged(
    store: WindowStore, sync: redis.Redis
) -> None:
    """A rolling upgrade: an old replica recreates the sorted set after the window was converted; the next
    append by a new one folds those events in (as new arrivals, deduped by id) and deletes the old keys."""
    old_append(sync, "u", [NewEvent("a", "pv", 1)])
    assert (await store.append("u", [NewEvent("b", "cart", 2)], CAP)).seq == 2
    old_append(sync, "u", [NewEvent("a", "dup", 1), NewEvent("c", "fav", 3)])  # the old replica's view: empty
    got = await store.append("u", [NewEvent("d", "buy", 4)], CAP)
    assert (got.accepted, got.duplicates, got.actions) == (1, 0, ["pv", "cart", "fav", "buy"])
    assert got.seq == 4  # a, b, then c merged, then d
    assert sync.exists(*store.old_keys("u")) == 0


async def test_delete_erases_both_layouts(store: WindowStore, sync: redis.Redis) -> None:
    old_append(sync, "old", [NewEvent("a", "pv", 1)])
    await store.append("new", [NewEvent("a", "pv", 1)], CAP)
    old_append(sync, "new", [NewEvent("b", "pv", 2)])  # both layouts at once (an older replica)
    for user in ("old", "new"):
        await store.delete(user)
        assert sync.exists(*store.keys(user), *store.old_keys(user), store.state_key(user)) == 0
        assert await store.events(user) == []


async def test_no_state_is_saved_without_a_packed_window(store: WindowStore, sync: redis.Redis) -> None:
    seq = old_append(sync, "u", [NewEvent("a", "pv", 1)])
    assert not await store.save_state("u", seq, "v1", b"S")  # the next append converts, then state is saved
    assert not await store.save_prediction("u", seq, b"P")
    assert not sync.exists(store.state_key("u"))

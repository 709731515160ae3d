"""The benchmark's peer service keeps its windows exactly as nextact does (bench/peer_window.py vs app.windows).

Runs without BentoML: only the peer's window module, which needs redis-py, against the real embedded Redis.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from app.redis_client import connect
from app.windows import APPEND_LUA, NewEvent, WindowStore, _actions, _record
from bench.peer_window import PeerEvent, PeerWindows, actions_of, pack_record, script_text, window_keys

CAPACITY, TTL = 5, 1000

# (event_id, action, timestamp) per append: in order, a tie, a late event, duplicates (in the window and
# within one batch), a trim past the capacity, an id trimmed away and sent again, a user id with braces
APPENDS = [
    ("e1", "view", 10.0),
    ("e2", "cart", 11.0),
    ("e3", "view", 11.0),
    ("e4", "buy", 9.0),
    ("e2", "cart", 11.0),
    ("e5", "view", 12.0),
    ("e6", "cart", 13.0),
    ("e7", "buy", 14.0),
    ("e4", "buy", 9.0),
    ("e8", "ü-view", 15.0),
]
USERS = ["u-1", "u{2}"]


def test_the_script_is_nextacts() -> None:
    assert script_text() == APPEND_LUA


def test_peer_windows_equal_nextacts_on_the_real_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    peer = PeerWindows(client, "peer", TTL, CAPACITY)
    peer.load()
    conn = connect(redis_url, max_connections=4, timeout_seconds=2, retries=1)
    store = WindowStore(conn.client, "next", TTL, conn.address, direct=conn.direct)

    async def nextact_windows() -> list[list[str]]:
        out = []
        try:
            await store.load_script()
            for event_id, action, ts in APPENDS:
                for user in USERS:
                    got = await store.append(user, [NewEvent(event_id, action, ts)], CAPACITY)
                    out.append(got.actions)
        finally:
            await conn.close()
        return out

    try:
        want = asyncio.run(nextact_windows())
        got = []
        for event_id, action, ts in APPENDS:  # both users' events in one pipeline, as a batch would
            got += peer.append_many([PeerEvent(u, event_id, action, ts) for u in USERS])
        assert got == want
        assert got[-1] == ["cart", "view", "view", "cart", "buy", "ü-view"][-CAPACITY:]
        for user in USERS:
            mine, theirs = window_keys("peer", user), window_keys("next", user)
            assert client.get(mine[0]) == client.get(theirs[0])  # the same packed window, byte for byte
            assert 0 < client.ttl(mine[0]) <= TTL
        # one batch with the same event twice for one user: stored once, both requests see the window
        twice = peer.append_many([PeerEvent("u-3", "x1", "view", 1.0), PeerEvent("u-3", "x1", "view", 1.0)])
        assert twice == [["view"], ["view"]]
    finally:
        client.delete(*(k for u in [*USERS, "u-3"] for p in ("peer", "next") for k in window_keys(p, u)))
        client.close()


@pytest.mark.parametrize(
    "event_id",
    ["e1", "0123456789abcdef0123456789abcdef", "01234567-89ab-cdef-0123-456789abcdef", "x" * 200, "ü"],
)
@pytest.mark.parametrize("action", ["view", "a" * 70, "b" * 300, "ü-view"])
def test_records_and_actions_are_encoded_as_nextact_does(event_id: str, action: str) -> None:
    record = pack_record(1.5, event_id, action)
    assert record == _record(NewEvent(event_id, action, 1.5))
    window = bytes(7) + record + record
    assert actions_of(window) == _actions(window) == [action, action]


def test_the_script_loader_refuses_a_missing_constant(tmp_path: Path) -> None:
    source = tmp_path / "w.py"
    source.write_text('A = "x"\nB = A + "y"\n')
    assert script_text("B", source) == "xy"
    with pytest.raises(ValueError, match="no string constant C"):
        script_text("C", source)

"""Issue 13 item 3: any user id maps its keys to one cluster slot, no two ids share a key, old keys stay readable."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from app.ratelimit import RateLimiter
from app.windows import WindowStore, legacy_keys
from tests.app_client import running_app

PREFIX = "nextact"
ids = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=60)
brace_heavy = st.text(st.sampled_from("{}:*x\u00e9"), min_size=1, max_size=12)


def all_keys(user_id: str) -> tuple[str, ...]:
    store = WindowStore(None, PREFIX, 1, "")
    return (*store.keys(user_id), store.state_key(user_id), *store.old_keys(user_id))


@given(ids | brace_heavy)
@settings(max_examples=500, deadline=None)
def test_every_key_of_a_user_is_in_one_slot(user_id: str) -> None:
    """fails on main: yes (an id starting with '}' gives keys in different slots)."""
    slots = {key_slot(key.encode()) for key in all_keys(user_id)}
    assert len(slots) == 1, (user_id, all_keys(user_id))


@given(ids | brace_heavy, ids | brace_heavy)
@settings(max_examples=500, deadline=None)
def test_two_ids_never_share_a_key(a: str, b: str) -> None:
    if a != b:
        assert not set(all_keys(a)) & set(all_keys(b)), (a, b)
    limiter_keys = {f"{PREFIX}:ratelimit:{{{i}}}" for i in (a, b)}
    assert not limiter_keys & set(all_keys(a) + all_keys(b))


@given(ids.filter(lambda s: "{" not in s and "}" not in s))
@settings(max_examples=200, deadline=None)
def test_ids_without_braces_keep_the_earlier_keys(user_id: str) -> None:
    """Windows written by earlier versions stay readable: the same key names for every id without braces
    (the packed window `:e` replaces `:w` and `:i`, which are read and converted)."""
    assert all_keys(user_id) == tuple(f"{PREFIX}:{{{user_id}}}:{kind}" for kind in "eswi")
    assert legacy_keys(PREFIX, user_id) == ()


def test_rate_limiter_keys_live_outside_the_window_namespace() -> None:
    limiter = RateLimiter(redis.Redis(), limit=1, window_seconds=1, key_prefix=PREFIX)
    assert limiter.key("ip:127.0.0.1").startswith(f"{PREFIX}:ratelimit:")


@pytest.mark.anyio
async def test_a_request_that_can_never_succeed_is_500_not_503(
    behavior_artifact: Path, redis_url: str
) -> None:
    """A key of the wrong type (WRONGTYPE) fails on every retry: 500 store_error, no Retry-After.
    fails on main: yes (503 redis_unavailable with Retry-After)."""
    with redis.Redis.from_url(redis_url) as r:
        r.set(all_keys("broken")[0], "not a window")
    async with running_app(behavior_artifact, redis_url) as (_, client):
        response = await client.post("/v1/users/broken/events", json={"action": "pv"})
        assert response.status_code == 500, response.text
        assert response.json()["error"] == "store_error" and "WRONGTYPE" in response.json()["message"]
        assert "retry-after" not in response.headers
        ok = await client.post("/v1/users/fine/events", json={"action": "pv"})
        assert ok.status_code == 200


@pytest.mark.anyio
async def test_delete_erases_windows_written_under_the_old_keys(
    behavior_artifact: Path, redis_url: str
) -> None:
    """An id with braces stored by an earlier version (old key layout) is erased by DELETE too."""
    user = "a{b}c"
    old = legacy_keys(PREFIX, user)
    with redis.Redis.from_url(redis_url) as r:
        r.zadd(old[0], {"x": 1.0})
        r.hset(old[1], "", "1")
        async with running_app(behavior_artifact, redis_url) as (_, client):
            assert (
                await client.post("/v1/events", json={"events": [{"user_id": user, "action": "pv"}]})
            ).status_code == 200
            assert (await client.delete("/v1/users/a%7Bb%7Dc")).status_code == 204
        assert r.exists(*old, *all_keys(user)) == 0

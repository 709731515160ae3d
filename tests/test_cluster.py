"""The service on a real three-master Redis Cluster (redis+cluster://) gives what it gives on one Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from redis.cluster import RedisCluster

from app.settings import Settings
from app.windows import WindowStore
from tests.app_client import probabilities, running_app
from tests.redis_cluster import SLOTS, LocalRedisCluster
from tests.workload import Request, Workload, make_workload, rows, window_of

ACTIONS = ["pv", "cart", "fav", "buy", "never-seen-action"]  # the last one is outside every vocabulary
PREFIX = str(Settings.model_fields["key_prefix"].default)


def user_keys(user_id: str) -> tuple[str, ...]:
    """The service's Redis keys for a user, from its own key layout (window, state, the earlier layout's)."""
    store = WindowStore(None, PREFIX, 1, "")
    return (*store.keys(user_id), store.state_key(user_id), *store.old_keys(user_id))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """Three cluster-enabled redis-server processes on loopback, joined and serving all 16384 slots."""
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: LocalRedisCluster) -> str:
    """The cluster's service URL, every master emptied first."""
    for port in redis_cluster.ports:
        with redis.Redis(host="127.0.0.1", port=port) as node:
            node.flushall()
    return redis_cluster.url


@pytest.fixture
def cluster_client(redis_cluster: LocalRedisCluster) -> Iterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    yield client
    client.close()


def test_cluster_has_three_masters_covering_every_slot(cluster_client: RedisCluster) -> None:
    info = cluster_client.cluster_info()
    assert info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == SLOTS
    assert int(info["cluster_size"]) == 3 and len(cluster_client.get_primaries()) == 3


def test_each_users_keys_share_one_slot_and_users_spread_over_all_masters(
    cluster_client: RedisCluster,
) -> None:
    owners = set()
    for i in range(60):
        keys = user_keys(f"user-{i}")
        assert len({cluster_client.keyslot(key) for key in keys}) == 1
        owners.add(cluster_client.get_node_from_key(keys[0]).name)
    assert len(owners) == 3


async def _send(client: httpx.AsyncClient, requests: list[Request], concurrency: int) -> None:
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(request: Request) -> None:
        async with limiter:
            response = await client.post(request.path, json=request.json())
            assert response.status_code == 200, response.text

    async with anyio.create_task_group() as tg:
        for request in requests:
            tg.start_soon(one, request)


async def _state(client: httpx.AsyncClient, users: list[str], k: int) -> dict[str, Any]:
    """Per user: the stored window and the full prediction."""
    out = {}
    for user in users:
        window = await client.get(f"/v1/users/{user}/events")
        prediction = await client.get(f"/v1/users/{user}/predictions", params={"k": k})
        assert window.status_code == 200 and prediction.status_code == 200, (window.text, prediction.text)
        out[user] = (window_of(window.json()), prediction.json())
    return out


@pytest.mark.anyio
async def test_events_and_predictions_on_the_cluster_match_one_redis(
    cluster_url: str,
    redis_url: str,
    behavior_artifact: Path,
    cluster_client: RedisCluster,
    redis_cluster: LocalRedisCluster,
) -> None:
    workload: Workload = make_workload(users=40, actions=ACTIONS, seed=11)
    async with (
        running_app(behavior_artifact, cluster_url) as (_, cluster),
        running_app(behavior_artifact, redis_url) as (_, single),
    ):
        model = (await cluster.get("/v1/model")).json()
        capacity, k = model["window_size"], model["vocabulary_size"] - 2
        ready = await cluster.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] == f"127.0.0.1:{redis_cluster.ports[0]}"

        await _send(cluster, workload.requests, concurrency=16)
        await _send(single, workload.requests, concurrency=4)
        on_cluster = await _state(cluster, workload.users, k)
        on_single = await _state(single, workload.users, k)

        for user in workload.users:
            expected = rows(workload.expected_window(user, capacity))
            window, prediction = on_cluster[user]
            assert window == expected, user
            assert window == on_single[user][0], user
            assert prediction["window_size"] == len(expected)
            assert prediction["unknown_actions"] == sum(a == ACTIONS[-1] for _, a, _ in expected)
            assert probabilities(prediction) == pytest.approx(probabilities(on_single[user][1]), abs=1e-6)
            ranked = [p["probability"] for p in prediction["predictions"]]
            assert ranked == sorted(ranked, reverse=True) and len(ranked) == k

        # the data really lives on all three masters
        for port in redis_cluster.ports:
            with redis.Redis(host="127.0.0.1", port=port) as node:
                assert node.dbsize() > 0, f"master on port {port} holds no window"

        # re-sending a user's whole window changes nothing: every event id is a duplicate
        user = workload.users[0]
        again = [
            e for e in workload.events if (e.event_id, e.action, e.timestamp) in set(on_cluster[user][0])
        ]
        resent = await cluster.post("/v1/events", json={"events": [e.bulk_body() for e in again]})
        assert resent.json()["accepted"] == 0 and resent.json()["duplicates"] == len(again)

        # delete half the users: their keys are gone from the cluster, the others are untouched
        gone, kept = workload.users[::2], workload.users[1::2]
        for user in gone:
            assert (await cluster.delete(f"/v1/users/{user}")).status_code == 204
        after = await _state(cluster, workload.users, 3)
        for user in gone:
            assert after[user][0] == [] and after[user][1]["window_size"] == 0
            assert cluster_client.exists(*user_keys(user)) == 0
        for user in kept:
            assert after[user][0] == on_cluster[user][0]


# --- issue 13: ids with braces, and errors that retrying cannot fix ---------------------------------------------

BRACE_IDS = ["}x", "{a}", "a{b}c", "{}", "}{", "{{}}", "*:{x}*", "\u00e9{\u2603}"]


def test_redis_py_key_slot_agrees_with_the_cluster(cluster_client: RedisCluster) -> None:
    """The property tests use redis-py's CRC16 key_slot: check it against CLUSTER KEYSLOT of a real cluster."""
    from redis.crc import key_slot

    for user in [*BRACE_IDS, "u-1", "plain", "x" * 200]:
        store = WindowStore(None, PREFIX, 1, "")
        for key in (*store.keys(user), store.state_key(user)):
            assert cluster_client.execute_command("CLUSTER KEYSLOT", key) == key_slot(key.encode()), key


@pytest.mark.anyio
async def test_ids_with_braces_work_on_the_cluster(cluster_url: str, behavior_artifact: Path) -> None:
    """fails on main: yes ('}x' gives cross-slot keys: 503 redis_unavailable with Retry-After, forever)."""
    from urllib.parse import quote

    async with running_app(behavior_artifact, cluster_url) as (_, client):
        for user in BRACE_IDS:
            posted = await client.post(f"/v1/users/{quote(user, safe='')}/events", json={"action": "pv"})
            assert posted.status_code == 200, (user, posted.text)
            window = await client.get(f"/v1/users/{quote(user, safe='')}/events")
            assert [e["action"] for e in window.json()["events"]] == ["pv"], user
            assert (await client.delete(f"/v1/users/{quote(user, safe='')}")).status_code == 204
            assert (await client.get(f"/v1/users/{quote(user, safe='')}/events")).json()["events"] == []


class _OldLayout(WindowStore):
    """The key layout before issue 13: `{prefix}:{<user_id>}:w`, whatever the id holds."""

    def keys(self, user_id: str) -> tuple[str, str]:
        return f"{self.prefix}:{{{user_id}}}:w", f"{self.prefix}:{{{user_id}}}:i"


@pytest.mark.anyio
async def test_a_cross_slot_refusal_is_a_store_error_not_unavailable(cluster_url: str) -> None:
    """A request that can never succeed is never reported as an outage (503)."""
    from app.redis_client import connect
    from app.windows import NewEvent, StoreError, StoreUnavailable

    conn = connect(cluster_url, max_connections=4, timeout_seconds=2, retries=1)
    try:
        store = _OldLayout(conn.client, PREFIX, 60, conn.address)
        await store.load_script()
        with pytest.raises(StoreError, match="same key slot") as info:
            await store.append("}x", [NewEvent("e", "pv", 1.0)], 10)
        assert not isinstance(info.value, StoreUnavailable)
    finally:
        await conn.close()

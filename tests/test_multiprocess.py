"""Two service processes on one Redis answer exactly as one process fed the same events."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.redis_server import EmbeddedRedis
from tests.app_client import probabilities
from tests.service_proc import ServiceProcess
from tests.workload import Request, make_workload, rows, window_of

ACTIONS = ["pv", "cart", "fav", "buy", "not-in-vocabulary"]


@pytest.fixture(scope="module")
def two_services(
    redis_server: EmbeddedRedis, behavior_artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """`python -m app` twice, on two loopback ports, sharing the session's Redis and one artifact."""
    log_dir = tmp_path_factory.mktemp("services")
    env = {"NEXTACT_REDIS_URL": redis_server.url, "NEXTACT_ARTIFACT_DIR": str(behavior_artifact)}
    services = [ServiceProcess(log_dir / f"api-{i}.log", env) for i in range(2)]
    try:
        for svc in services:
            svc.start()
        yield services[0], services[1]
    finally:
        for svc in services:
            svc.kill()


def _send(targets: list[httpx.Client], requests: list[Request], workers: int) -> None:
    """Each request to the next target in turn, `workers` at a time."""

    def post(pair: tuple[httpx.Client, Request]) -> None:
        client, request = pair
        response = client.post(request.path, json=request.json())
        assert response.status_code == 200, response.text

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(post, zip(itertools.cycle(targets), requests)))


def _state(client: httpx.Client, users: list[str], k: int) -> dict[str, tuple[Any, dict[str, Any]]]:
    out = {}
    for user in users:
        window = client.get(f"/v1/users/{user}/events")
        prediction = client.get(f"/v1/users/{user}/predictions", params={"k": k})
        assert window.status_code == 200 and prediction.status_code == 200
        out[user] = (window_of(window.json()), prediction.json())
    return out


def test_interleaved_posts_to_two_processes_equal_one_process(
    two_services: tuple[ServiceProcess, ServiceProcess], redis_server: EmbeddedRedis
) -> None:
    workload = make_workload(users=24, actions=ACTIONS, seed=5, max_events=28)
    a, b = (httpx.Client(base_url=s.base_url, timeout=10) for s in two_services)
    with a, b, redis.Redis.from_url(redis_server.url) as r:
        model = a.get("/v1/model").json()
        assert model == b.get("/v1/model").json(), "both processes serve the same artifact"
        capacity, k = model["window_size"], model["vocabulary_size"] - 2

        r.flushall()
        _send([a, b], workload.requests, workers=8)  # the same users hit both processes, concurrently
        from_a, from_b = _state(a, workload.users, k), _state(b, workload.users, k)

        r.flushall()
        _send([a], workload.requests, workers=1)  # one process, one request at a time
        alone = _state(a, workload.users, k)
        r.flushall()

    for user in workload.users:
        expected = rows(workload.expected_window(user, capacity))
        assert from_a[user][0] == from_b[user][0] == alone[user][0] == expected, user
        assert from_a[user][1] == from_b[user][1], user  # same window, same model: the same answer
        shared, single = from_a[user][1], alone[user][1]
        assert (shared["window_size"], shared["unknown_actions"]) == (
            single["window_size"],
            single["unknown_actions"],
        )
        assert probabilities(shared) == pytest.approx(probabilities(single), abs=1e-6), user

"""Windows outlive the service (and the embedded Redis); concurrent posts lose nothing; `python -m app` serves."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.manifest import read_manifest
from app.redis_server import _answers, free_port
from tests.app_client import running_app

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


async def test_a_restarted_service_keeps_the_windows(behavior_artifact: Path, redis_url: str) -> None:
    events = [
        {"action": a, "timestamp": t, "event_id": f"e{t}"} for t, a in enumerate(["pv", "cart", "pv", "buy"])
    ]
    async with running_app(behavior_artifact, redis_url) as (_, client):
        before = (await client.post("/v1/users/r/events", json={"events": events})).json()
        window = (await client.get("/v1/users/r/events")).json()
    async with running_app(behavior_artifact, redis_url) as (_, client):
        assert (await client.get("/v1/users/r/events")).json() == window
        assert (await client.get("/v1/users/r/predictions")).json() == before


async def test_the_embedded_redis_keeps_windows_across_restarts(
    behavior_artifact: Path, tmp_path: Path
) -> None:
    embedded = {"data_dir": tmp_path / "data", "embedded_redis_port": free_port()}
    async with running_app(behavior_artifact, None, **embedded) as (app, client):
        assert app.state.services.redis.address == f"127.0.0.1:{embedded['embedded_redis_port']}"
        await client.post("/v1/users/p/events", json={"action": "cart", "event_id": "kept", "timestamp": 5})
    # the lifespan stopped the server (SIGTERM: the append-only file is flushed); a new one replays it
    async with running_app(behavior_artifact, None, **embedded) as (_, client):
        events = (await client.get("/v1/users/p/events")).json()["events"]
        assert [(e["event_id"], e["action"]) for e in events] == [("kept", "cart")]
    assert list((tmp_path / "data").glob("appendonly*"))


async def test_200_concurrent_posts_for_one_user_lose_nothing(
    behavior_artifact: Path, redis_url: str
) -> None:
    async with running_app(behavior_artifact, redis_url, window_size=500, batch_max_size=32) as (_, client):
        posts = [
            client.post(
                "/v1/users/hot/events",
                json={"action": "pv", "timestamp": 1000 + (i * 7919) % 200, "event_id": f"e{i}"},
            )
            for i in range(200)
        ]
        answers = await asyncio.gather(*posts)
        assert all(a.status_code == 200 for a in answers)
        assert max(a.json()["window_size"] for a in answers) == 200
        events = (await client.get("/v1/users/hot/events")).json()["events"]
    assert sorted(e["event_id"] for e in events) == sorted(f"e{i}" for i in range(200))
    assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)


async def test_concurrent_posts_keep_the_newest_window(behavior_artifact: Path, redis_url: str) -> None:
    window = read_manifest(behavior_artifact).window
    async with running_app(behavior_artifact, redis_url) as (_, client):
        order = [(i * 37) % 120 for i in range(120)]  # every timestamp once, in a scrambled order
        answers = await asyncio.gather(
            *(
                client.post("/v1/users/w/events", json={"action": "fav", "timestamp": t, "event_id": f"t{t}"})
                for t in order
            )
        )
        assert all(a.status_code == 200 and a.json()["window_size"] <= window for a in answers)
        events = (await client.get("/v1/users/w/events")).json()["events"]
    assert [e["event_id"] for e in events] == [f"t{t}" for t in range(120 - window, 120)]


def test_python_m_app_serves_with_an_embedded_redis(behavior_artifact: Path, tmp_path: Path) -> None:
    port, redis_port = free_port(), free_port()
    env = {
        **os.environ,
        "NEXTACT_ARTIFACT_DIR": str(behavior_artifact),
        "NEXTACT_PORT": str(port),
        "NEXTACT_DATA_DIR": str(tmp_path),
        "NEXTACT_EMBEDDED_REDIS_PORT": str(redis_port),
        "NEXTACT_LOG_LEVEL": "warning",
    }
    env.pop("NEXTACT_REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not become ready in 60s"
            time.sleep(0.1)
        r = httpx.post(f"{url}/v1/users/z/events", json={"action": "pv"}, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json()["window_size"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert list(tmp_path.glob("appendonly*"))
    assert not _answers(redis_port)  # the lifespan stopped the embedded server

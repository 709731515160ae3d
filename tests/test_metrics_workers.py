"""Issue 13: with NEXTACT_WORKERS=2 one scrape of /metrics sees every worker (prometheus-client multiprocess
mode, directory managed by `python -m app`), with process and GC metrics; over a real socket."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.redis_server import EmbeddedRedis
from tests.service_proc import ServiceProcess

POSTS = 24


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prom")
    (path / "counter_1.db").write_bytes(b"left over from an earlier run")
    return path


@pytest.fixture(scope="module")
def two_workers(
    behavior_artifact: Path,
    redis_server: EmbeddedRedis,
    metrics_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(
        tmp_path_factory.mktemp("workers") / "service.log",
        {
            "NEXTACT_REDIS_URL": redis_server.url,
            "NEXTACT_ARTIFACT_DIR": str(behavior_artifact),
            "NEXTACT_WORKERS": "2",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        },
    )
    try:
        yield svc.start(timeout=120)
    finally:
        svc.kill()


def _total(text: str, metric: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((metric + "{", metric + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_one_scrape_sees_every_worker(two_workers: ServiceProcess, metrics_dir: Path) -> None:
    """fails on main: yes (each worker has its own registry: a scrape counts one worker's requests)."""
    assert not (metrics_dir / "counter_1.db").exists(), "the directory is emptied at start"
    pids = set()
    for i in range(POSTS):  # a new connection each time, so the kernel spreads them over both workers
        with httpx.Client(base_url=two_workers.base_url, timeout=30) as client:
            r = client.post(f"/v1/users/w{i}/events", json={"action": "pv"})
            assert r.status_code == 200, r.text
    for _ in range(4):
        with httpx.Client(base_url=two_workers.base_url, timeout=30) as client:
            text = client.get("/metrics").text
        posted = _total(text, "nextact_http_requests_total", method="POST", status="200")
        assert posted == POSTS, text[:2000]  # whichever worker answered the scrape
        assert _total(text, "nextact_events_ingested_total") == POSTS
        pids |= set(re.findall(r'process_resident_memory_bytes\{pid="(\d+)"\}', text))
        assert "python_gc_collections_total{" in text
    assert len(pids) == 2, f"process metrics of both workers expected, got pids {pids}"

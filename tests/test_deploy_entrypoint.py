"""The service starts the way the image starts it (CMD + image ENV + compose environment) and stops on SIGTERM."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy_files import ROOT, Dockerfile
from tests.service_process import ServiceProcess, image_command


@pytest.fixture
def service(redis_url: str, behavior_artifact: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    svc = ServiceProcess.start(redis_url, behavior_artifact, tmp_path)
    yield svc
    svc.terminate()


def test_image_command_serves_and_is_ready(service: ServiceProcess, redis_url: str) -> None:
    assert image_command()[1:] == ["-m", "app"]
    service.wait_ready()
    ready = httpx.get(f"{service.url}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["redis"] == redis_url.removeprefix("redis://").removesuffix("/0")
    posted = httpx.post(f"{service.url}/v1/users/u-1/events", json={"action": "pv", "event_id": "e1"}, timeout=5)
    assert posted.status_code == 200 and posted.json()["window_size"] == 1


def test_image_healthcheck_command_passes(service: ServiceProcess) -> None:
    """The Dockerfile's HEALTHCHECK command, run as Docker would run it, exits 0 against the service."""
    service.wait_ready()
    check = Dockerfile.parse().last("serve", "HEALTHCHECK").exec_form()
    assert check
    done = subprocess.run(
        [sys.executable if check[0] == "python" else check[0], *check[1:]],
        env=service.env, capture_output=True, text=True, timeout=10, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr


def test_sigterm_stops_it_cleanly(service: ServiceProcess) -> None:
    service.wait_ready()
    assert service.terminate() == 0, service.log()
    log = service.log()
    assert "Traceback" not in log and "Application shutdown complete" in log, log


def test_missing_artifact_exits_at_once_naming_it(redis_url: str, tmp_path: Path) -> None:
    """Compose's restart policy then retries until the trainer has written the artifact."""
    svc = ServiceProcess.start(redis_url, tmp_path / "no-model", tmp_path)
    try:
        code = svc.process.wait(30)
    finally:
        svc.terminate()
    assert code != 0
    assert str(tmp_path / "no-model") in svc.log()

"""The service starts as the image starts it (CMD, image ENV, compose environment) and stops on SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.redis_server import EmbeddedRedis
from tests.deploy_files import ROOT, Dockerfile, image_command, image_environment
from tests.service_proc import ServiceProcess


def container_like(redis_server: EmbeddedRedis, artifact: Path, log_dir: Path) -> ServiceProcess:
    """The api container's process, on a free loopback port instead of 0.0.0.0:8000."""
    svc = ServiceProcess(log_dir / "api.log", image_environment(redis_server.url, artifact))
    assert image_command() == [sys.executable, "-m", "app"], "tests.service_proc runs exactly the image's CMD"
    return svc


@pytest.fixture(scope="module")
def service(
    redis_server: EmbeddedRedis, behavior_artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """One service process for the read-only checks of this module."""
    svc = container_like(redis_server, behavior_artifact, tmp_path_factory.mktemp("service"))
    try:
        yield svc.start()
    finally:
        svc.kill()


def test_image_command_and_environment_give_a_ready_service(
    service: ServiceProcess, redis_server: EmbeddedRedis
) -> None:
    for key in ("NEXTACT_WORKERS", "NEXTACT_LOG_LEVEL", "NEXTACT_DATA_DIR"):
        assert key in service.env, f"{key} from the image/compose environment did not reach the process"
    ready = httpx.get(f"{service.base_url}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    assert ready.json()["redis"] == f"127.0.0.1:{redis_server.port}"
    user = f"entrypoint-{service.port}"
    posted = httpx.post(f"{service.base_url}/v1/users/{user}/events", json={"action": "pv"}, timeout=5)
    assert posted.status_code == 200 and posted.json()["window_size"] == 1
    assert httpx.delete(f"{service.base_url}/v1/users/{user}", timeout=5).status_code == 204


def test_image_healthcheck_command_passes(service: ServiceProcess) -> None:
    """The Dockerfile's HEALTHCHECK command, run as Docker runs it (inside the container's env), exits 0."""
    check = Dockerfile.parse().last("serve", "HEALTHCHECK").exec_form()
    assert check and check[0] == "python"
    done = subprocess.run(
        [sys.executable, *check[1:]],
        env=service.env,
        capture_output=True,
        text=True,
        timeout=10,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_sigterm_stops_it_cleanly(
    redis_server: EmbeddedRedis, behavior_artifact: Path, tmp_path: Path
) -> None:
    """`docker stop` sends SIGTERM: the lifespan closes everything and the process exits 0."""
    svc = container_like(redis_server, behavior_artifact, tmp_path)
    try:
        svc.start()
        started = time.monotonic()
        code = svc.terminate()
        took = time.monotonic() - started
    finally:
        svc.kill()
    log = svc.log()
    assert code == 0, log
    assert took < float(svc.env.get("NEXTACT_SHUTDOWN_TIMEOUT_SECONDS", "10")), log
    assert "Application shutdown complete" in log and "Finished server process" in log, log
    assert "Traceback" not in log and "ERROR" not in log, log


def test_missing_artifact_exits_at_once_naming_it(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    """Compose's restart policy then retries until the trainer has written the artifact."""
    missing = tmp_path / "no-model"
    svc = container_like(redis_server, missing, tmp_path)
    try:
        with pytest.raises(RuntimeError, match="service exited with 2") as failed:
            svc.start(timeout=30)
    finally:
        svc.kill()
    assert str(missing) in str(failed.value)

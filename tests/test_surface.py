"""Issue 13: what a caller without a key can learn, failed-authentication limiting, the embedded-Redis switch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.main import RedisSettingsError
from app.redis_server import free_port
from app.security import FailedAuthLimiter
from tests.app_client import running_app

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
KEY = "k-surface-0123456789"


def _no_deployment_details(r: httpx.Response, *hidden: str) -> None:
    assert "x-model-version" not in r.headers, (r.status_code, dict(r.headers))
    for text in hidden:
        assert text not in r.text, (r.status_code, r.text)


async def test_unauthenticated_answers_say_nothing_about_the_deployment(
    behavior_artifact: Path, redis_url: str
) -> None:
    """fails on main: yes (X-Model-Version on 401/404, model version and Redis address in /readyz)."""
    host_port = redis_url.removeprefix("redis://").split("/")[0]
    async with running_app(behavior_artifact, redis_url, api_keys=KEY) as (app, client):
        version = app.state.services.models.current.version
        for r in (
            await client.get("/v1/model"),
            await client.get("/nope"),
            await client.get("/readyz"),
            await client.get("/v1/users/u/events", headers={"X-API-Key": "wrong"}),
        ):
            _no_deployment_details(r, version, host_port)
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        full = await client.get("/readyz", headers={"X-API-Key": KEY})
        assert full.json() == {
            "status": "ready",
            "model_version": version,
            "redis": host_port,
            "embedded_redis": False,
        }
        assert (await client.get("/v1/model", headers={"X-API-Key": KEY})).headers[
            "x-model-version"
        ] == version


async def test_unauthenticated_not_ready_hides_the_redis_address_and_error(behavior_artifact: Path) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    async with running_app(
        behavior_artifact, down, api_keys=KEY, redis_timeout_seconds=0.2, redis_retries=0
    ) as (
        _,
        client,
    ):
        anonymous = await client.get("/readyz")
        assert anonymous.status_code == 503 and anonymous.headers["retry-after"] == "1"
        assert anonymous.json() == {"error": "not_ready", "message": "not ready: Redis does not answer"}
        detailed = await client.get("/readyz", headers={"Authorization": f"Bearer {KEY}"})
        assert detailed.status_code == 503 and down.split("/")[2] in detailed.json()["message"]


async def test_failed_authentication_is_limited_per_client_address(
    behavior_artifact: Path, redis_url: str
) -> None:
    """fails on main: yes (30 wrong keys in a row all get 401)."""
    async with running_app(
        behavior_artifact, redis_url, api_keys=KEY, auth_failure_limit=3, auth_failure_window_seconds=60
    ) as (app, client):
        statuses = [
            (await client.get("/v1/model", headers={"X-API-Key": f"guess-{i}"})).status_code for i in range(5)
        ]
        assert statuses == [401, 401, 401, 429, 429]
        blocked = await client.get(
            "/v1/model", headers={"X-API-Key": KEY}
        )  # even the right key, while blocked
        assert blocked.status_code == 429 and blocked.json()["error"] == "rate_limited"
        assert 1 <= int(blocked.headers["retry-after"]) <= 60
        assert "too many failed authentication attempts" in blocked.json()["message"]
        other = httpx.ASGITransport(app=app, client=("10.1.2.3", 5555))
        async with httpx.AsyncClient(transport=other, base_url="http://nextact") as elsewhere:
            assert (await elsewhere.get("/v1/model", headers={"X-API-Key": KEY})).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'nextact_auth_failures_total{reason="blocked"} 3.0' in metrics


def test_failed_auth_limiter_window_and_memory_bound() -> None:
    now = [0.0]
    limiter = FailedAuthLimiter(limit=2, window_seconds=10, max_clients=3, clock=lambda: now[0])
    limiter.failed("a")
    assert limiter.retry_after("a") is None
    limiter.failed("a")
    now[0] = 4.0
    assert limiter.retry_after("a") == 6
    now[0] = 10.0
    assert limiter.retry_after("a") is None  # a new window
    for client in "bcde":
        limiter.failed(client)
    assert len(limiter._failures) == 3 and "a" not in limiter._failures


async def test_without_redis_url_and_embedded_off_start_up_is_refused(behavior_artifact: Path) -> None:
    with pytest.raises(
        RedisSettingsError, match="NEXTACT_REDIS_URL is not set and NEXTACT_EMBEDDED_REDIS is false"
    ):
        async with running_app(behavior_artifact, None, embedded_redis=False):
            pass


def test_python_m_app_refuses_to_start_without_a_redis(behavior_artifact: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "NEXTACT_ARTIFACT_DIR": str(behavior_artifact),
        "NEXTACT_EMBEDDED_REDIS": "false",
    }
    done = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "set NEXTACT_REDIS_URL" in done.stderr and "NEXTACT_EMBEDDED_REDIS=true" in done.stderr


async def test_a_process_on_the_embedded_redis_says_so(behavior_artifact: Path, tmp_path: Path) -> None:
    async with running_app(behavior_artifact, None, data_dir=tmp_path, embedded_redis_port=0) as (_, client):
        assert (await client.get("/v1/model")).json()["embedded_redis"] is True
        assert (await client.get("/readyz")).json()["embedded_redis"] is True


async def test_a_process_on_an_external_redis_says_so(behavior_artifact: Path, redis_url: str) -> None:
    async with running_app(behavior_artifact, redis_url) as (_, client):
        assert (await client.get("/v1/model")).json()["embedded_redis"] is False

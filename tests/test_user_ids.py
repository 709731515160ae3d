"""Issue 13 item 2: every user id the API stores can be read and erased through the API (and over a real socket)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.main import create_app
from app.settings import Settings
from tests.app_client import running_app
from tests.service_proc import ServiceProcess

pytestmark = pytest.mark.anyio

TRICKY = [
    "a/b",
    "a/",
    "/a",
    "//",
    ".",
    "..",
    "a/../b",
    "x/events",
    "x/predictions",
    "%2F",
    "?q=1",
    "#frag",
    "a b",
    "line\nbreak",
    "tab\there",
    "\u00e9/\u2603",
    "}x",
    "{a}",
    "*",
    "nul\x00",
]


def encode_id(user_id: str) -> str:
    """Percent-encode every character but [A-Za-z0-9_~-] ('.' too: clients remove '.' and '..' path segments)."""
    return "".join(
        ch if ch.isascii() and (ch.isalnum() or ch in "-_~") else "".join(f"%{b:02X}" for b in ch.encode())
        for ch in user_id
    )


async def _round_trip(client: httpx.AsyncClient, user_id: str) -> None:
    stored = await client.post(
        "/v1/events", json={"events": [{"user_id": user_id, "action": "pv", "event_id": "e1"}]}
    )
    assert stored.status_code == 200 and stored.json()["accepted"] == 1, (user_id, stored.text)
    path = f"/v1/users/{encode_id(user_id)}"
    window = await client.get(f"{path}/events")
    assert window.status_code == 200, (user_id, window.text)
    assert window.json()["user_id"] == user_id and [e["event_id"] for e in window.json()["events"]] == ["e1"]
    prediction = await client.get(f"{path}/predictions")
    assert prediction.status_code == 200 and prediction.json()["window_size"] == 1, (user_id, prediction.text)
    more = await client.post(f"{path}/events", json={"action": "cart", "event_id": "e2"})
    assert more.status_code == 200 and more.json()["window_size"] == 2, (user_id, more.text)
    assert (await client.delete(path)).status_code == 204
    after = await client.get(f"{path}/events")
    assert after.status_code == 200 and after.json()["events"] == [], (user_id, after.text)


@pytest.fixture
async def client(behavior_artifact: Path, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(behavior_artifact, redis_url) as (_, c):
        yield c


@pytest.mark.parametrize("user_id", TRICKY)
async def test_a_stored_user_can_be_read_and_erased(client: httpx.AsyncClient, user_id: str) -> None:
    """fails on main: yes ('a/b' is stored, then GET/DELETE /v1/users/a%2Fb answer 404)."""
    await _round_trip(client, user_id)


@given(user_id=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_any_user_id_round_trips(client: httpx.AsyncClient, user_id: str) -> None:
    await _round_trip(client, user_id)


def test_openapi_states_the_user_id_rule() -> None:
    doc = create_app(Settings()).openapi()
    params = doc["paths"]["/v1/users/{user_id}/events"]["get"]["parameters"]
    description = next(p["description"] for p in params if p["name"] == "user_id")
    assert "Any string of 1 to NEXTACT_MAX_ID_LENGTH" in description and "%2F" in description


@pytest.fixture(scope="module")
def service(
    behavior_artifact: Path, redis_server: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    env = {"NEXTACT_REDIS_URL": redis_server.url, "NEXTACT_ARTIFACT_DIR": str(behavior_artifact)}  # type: ignore[attr-defined]
    svc = ServiceProcess(tmp_path_factory.mktemp("ids") / "service.log", env).start()
    yield svc
    svc.kill()


async def test_tricky_ids_round_trip_over_a_real_socket(service: ServiceProcess) -> None:
    """uvicorn decodes %2F before routing: the same ids work through the real server."""
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        for user_id in TRICKY:
            await _round_trip(client, f"socket-{user_id}")

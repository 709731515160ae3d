"""The /ui status page: served static, no external assets, and rendered by a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.manifest import read_manifest
from tests.service_proc import ServiceProcess

KEY = "ui-test-key"
LIVE_COLOUR = (0xE4, 0x57, 0x2E)  # COLORS[0] in app/static/ui.html: the live model's line
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-headless-shell", "google-chrome")) if p), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install -y chromium)"
)


@pytest.mark.anyio
async def test_the_page_is_static_and_self_contained() -> None:
    from app.main import create_app
    from app.settings import Settings

    transport = httpx.ASGITransport(
        app=create_app(Settings())
    )  # a static page: no lifespan (Redis, model) needed
    async with httpx.AsyncClient(transport=transport, base_url="http://nextact") as client:
        r = await client.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    assert "<link" not in page and "@import" not in page
    assert 'id="chart"' in page and "/v1/model/quality" in page


@pytest.fixture
def service(behavior_artifact: Path, redis_url: str, tmp_path: Path) -> Iterator[ServiceProcess]:
    env = {
        "NEXTACT_ARTIFACT_DIR": str(behavior_artifact),
        "NEXTACT_REDIS_URL": redis_url,
        "NEXTACT_API_KEYS": KEY,
        "NEXTACT_QUALITY_SNAPSHOT_SECONDS": "0.2",
    }
    proc = ServiceProcess(tmp_path / "service.log", env)
    try:
        yield proc.start()
    finally:
        proc.kill()


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=8000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@needs_chromium
def test_chromium_renders_models_quality_and_the_chart(
    service: ServiceProcess, behavior_artifact: Path, tmp_path: Path
) -> None:
    from PIL import Image

    auth = {"Authorization": f"Bearer {KEY}"}
    base = service.base_url
    assert httpx.get(f"{base}/ui").status_code == 200  # the page itself is open; its data calls need the key
    assert httpx.get(f"{base}/v1/model/quality").status_code == 401
    for n in range(30):
        r = httpx.post(
            f"{base}/v1/users/ui{n % 3}/events",
            json={"action": ["pv", "cart", "buy"][n % 3], "timestamp": n},
            headers=auth,
        )
        assert r.status_code == 200
    for _ in range(100):  # until the snapshots (every 0.2 s) hold at least two points with scored events
        points = httpx.get(f"{base}/v1/model/quality", headers=auth).json()["points"]
        if sum(1 for p in points for m in p["models"].values() if m["events_scored"]) >= 2:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the live figures were never snapshotted")

    url = f"{base}/ui#key={KEY}"
    dom = _chromium("--dump-dom", url, profile=tmp_path / "p1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    version = read_manifest(behavior_artifact).model_version
    assert 'data-ready="1"' in dom.stdout, dom.stdout[-3000:]
    assert version in dom.stdout and "hr@10" in dom.stdout and "<polyline" in dom.stdout

    shot = tmp_path / "ui.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1000,1100", url, profile=tmp_path / "p2")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)  # (H, W, 3)
    near = int((np.abs(pixels - np.array(LIVE_COLOUR)).max(axis=2) <= 12).sum())
    assert near > 100, f"the chart's line colour covers only {near} pixels"


@needs_chromium
def test_without_the_key_the_page_asks_for_it(service: ServiceProcess, tmp_path: Path) -> None:
    dom = _chromium("--dump-dom", f"{service.base_url}/ui", profile=tmp_path / "p")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "an API key is needed" in dom.stdout
    assert 'data-ready="1"' not in dom.stdout


class DevTools:
    """A minimal Chrome DevTools Protocol client over the page's websocket (the websockets package)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params: object) -> dict[str, object]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return dict(reply["result"])

    def eval(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")  # type: ignore[union-attr]

    def wait_for(self, expression: str) -> object:
        for _ in range(300):  # bounded: 30 s
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"never true in the page: {expression}")


@needs_chromium
def test_the_playground_posts_an_event_and_shows_the_answer(service: ServiceProcess, tmp_path: Path) -> None:
    from websockets.sync.client import connect

    assert CHROMIUM is not None
    profile = tmp_path / "profile"
    browser = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=2**24) as ws:
            page = DevTools(ws)
            page.call("Page.navigate", url=f"{service.base_url}/ui#key={KEY}")
            page.wait_for("document.body.dataset.ready === '1'")
            page.eval(
                "document.getElementById('user').value = 'play-1';"
                "document.getElementById('action').value = 'cart';"
                "document.querySelector('#play button[type=submit]').click(); true"
            )
            served = page.wait_for(
                "document.querySelectorAll('#predictions tr').length > 1 && "
                "document.getElementById('served').textContent"
            )
            rows = page.eval(
                "[...document.querySelectorAll('#predictions tr')].slice(1).map(r => r.cells[0].textContent)"
            )
    finally:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.wait(10)
    window = httpx.get(f"{service.base_url}/v1/users/play-1/events", headers={"X-API-Key": KEY}).json()
    assert [e["action"] for e in window["events"]] == ["cart"]  # the page's POST really stored the event
    assert "served by the live model" in str(served) and "window of 1 events" in str(served)
    assert isinstance(rows, list) and 0 < len(rows) <= 5 and set(rows) <= {"pv", "cart", "fav", "buy"}

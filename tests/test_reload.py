"""Hot reload: the artifact self-check on real trained models, refusal of broken ones, swap and file watch."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from app.manifest import MANIFEST_FILE, MODEL_FILE, read_manifest
from app.observability import Metrics
from app.reload import Reloader, ReloadError, artifact_stamp, check_artifact, pad_rows, probe_rows
from tests.app_client import running_app
from tests.artifact_edits import copy_artifact, edit_model, new_version, scale_output

pytestmark = pytest.mark.anyio


@pytest.fixture
def artifact(behavior_artifact: Path, tmp_path: Path) -> Path:
    """A private copy of the trained artifact that a test may overwrite."""
    return copy_artifact(behavior_artifact, tmp_path / "live")


def test_probe_batch_covers_empty_and_full_windows(behavior_artifact: Path) -> None:
    manifest = read_manifest(behavior_artifact)
    ids, lengths = pad_rows(probe_rows(manifest), manifest)
    assert ids.shape == (len(lengths), manifest.window)
    assert 0 in lengths and manifest.window in lengths
    assert (ids[lengths == 0] == manifest.pad_id).all()


def test_trained_artifact_passes_the_self_check(behavior_artifact: Path) -> None:
    assert check_artifact(behavior_artifact).model_version == read_manifest(behavior_artifact).model_version


def test_truncated_model_is_refused_naming_the_file(artifact: Path) -> None:
    data = (artifact / MODEL_FILE).read_bytes()
    (artifact / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ReloadError, match=rf"{MODEL_FILE}.*does not match model_version"):
        check_artifact(artifact)


def test_invalid_manifest_is_refused_naming_the_file(artifact: Path) -> None:
    (artifact / MANIFEST_FILE).write_text('{"model_version": ')
    with pytest.raises(ReloadError, match=MANIFEST_FILE):
        check_artifact(artifact)


def test_missing_model_is_refused(artifact: Path) -> None:
    (artifact / MODEL_FILE).unlink()
    with pytest.raises(ReloadError, match="model file not found"):
        check_artifact(artifact)


@pytest.mark.parametrize(("factor", "message"), [(float("nan"), "NaN"), (0.5, "sum to"), (-1.0, "outside")])
def test_model_with_bad_outputs_is_refused(
    behavior_artifact: Path, tmp_path: Path, factor: float, message: str
) -> None:
    broken = tmp_path / "broken"
    edit_model(behavior_artifact, broken, scale_output(factor))  # hash fixed up: only the self-check can tell
    with pytest.raises(ReloadError, match=message):
        check_artifact(broken)


def _reloads(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("nextact_model_reloads_total", {"result": result}) or 0.0


class Holder:
    """Stands in for the app's model slot: load = check_artifact, version = model_version."""

    def __init__(self, artifact: Path, metrics: Metrics | None = None) -> None:
        self.current = check_artifact(artifact)
        self.loads_running = 0
        self.max_loads_running = 0
        self.lock = threading.Lock()
        self.reloader = Reloader(
            artifact,
            load=self.load,
            install=self.install,
            version=lambda m: m.model_version,
            current=lambda: self.current,
            metrics=metrics,
        )

    def load(self, path: Path):  # type: ignore[no-untyped-def]
        with self.lock:
            self.loads_running += 1
            self.max_loads_running = max(self.max_loads_running, self.loads_running)
        try:
            time.sleep(0.05)
            return check_artifact(path)
        finally:
            with self.lock:
                self.loads_running -= 1

    def install(self, manifest) -> None:  # type: ignore[no-untyped-def]
        self.current = manifest


async def test_reload_swaps_in_a_new_version(artifact: Path, tmp_path: Path) -> None:
    holder = Holder(artifact)
    old = holder.current.model_version
    version = new_version(artifact, tmp_path / "v2", "two")
    copy_artifact(tmp_path / "v2", artifact)
    outcome = await holder.reloader.reload()
    assert outcome.ok and outcome.previous_version == old and outcome.model_version == version
    assert holder.current.model_version == version


async def test_broken_artifact_is_refused_and_the_old_model_kept(artifact: Path, tmp_path: Path) -> None:
    metrics = Metrics()
    holder = Holder(artifact, metrics)
    old = holder.current
    edit_model(artifact, tmp_path / "nan", scale_output(float("nan")))
    copy_artifact(tmp_path / "nan", artifact)
    with pytest.raises(ReloadError, match="NaN"):
        await holder.reloader.reload()
    assert holder.current is old
    assert _reloads(metrics, "refused") == 1
    assert holder.reloader.last_outcome is not None and not holder.reloader.last_outcome.ok


async def test_reloads_run_one_at_a_time_off_the_event_loop(artifact: Path) -> None:
    holder = Holder(artifact)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        outcomes = await asyncio.gather(*(holder.reloader.reload() for _ in range(3)))
    finally:
        task.cancel()
    assert all(o.ok for o in outcomes)
    assert holder.max_loads_running == 1
    assert ticks >= 10  # the loop kept running while the loads (>= 150 ms in all) happened in threads


async def _wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return False


async def test_file_watch_reloads_changes_and_does_not_retry_a_broken_one(
    artifact: Path, tmp_path: Path
) -> None:
    metrics = Metrics()
    holder = Holder(artifact, metrics)
    holder.reloader.start_watch(0.05)
    try:
        await asyncio.sleep(0.15)
        assert _reloads(metrics, "ok") == 0  # nothing changed: no reload
        version = new_version(artifact, tmp_path / "v2", "watch")
        copy_artifact(tmp_path / "v2", artifact)
        assert await _wait_for(lambda: holder.current.model_version == version)

        edit_model(artifact, tmp_path / "bad", scale_output(0.5))
        copy_artifact(tmp_path / "bad", artifact)
        assert await _wait_for(lambda: _reloads(metrics, "refused") == 1)
        await asyncio.sleep(0.3)
        assert _reloads(metrics, "refused") == 1  # the same broken files are not retried
        assert holder.current.model_version == version
    finally:
        await holder.reloader.stop_watch()


def test_stamp_changes_with_content(artifact: Path) -> None:
    before = artifact_stamp(artifact)
    (artifact / MODEL_FILE).write_bytes((artifact / MODEL_FILE).read_bytes() + b"\0")
    assert before is not None and artifact_stamp(artifact) != before
    assert artifact_stamp(artifact / "nowhere") is None


# --- the real app ---------------------------------------------------------------------------------------------

KEY = {"Authorization": "Bearer reload-key"}


async def test_reload_endpoint_swaps_models_without_failing_requests(
    artifact: Path, tmp_path: Path, redis_url: str
) -> None:
    old = read_manifest(artifact).model_version
    async with running_app(artifact, redis_url, api_keys="reload-key") as (app, client):
        assert (await client.post("/v1/model/reload")).status_code == 401
        await client.post("/v1/users/r/events", json={"action": "pv"}, headers=KEY)
        new = new_version(artifact, tmp_path / "v2", "endpoint")
        copy_artifact(tmp_path / "v2", artifact)

        async def predict() -> tuple[int, str, str]:
            r = await client.get("/v1/users/r/predictions", headers=KEY)
            return r.status_code, r.json().get("model_version", ""), r.headers.get("x-model-version", "")

        # predictions keep flowing while the reload loads and swaps
        racing = [asyncio.create_task(predict()) for _ in range(40)]
        reload = await client.post("/v1/model/reload", headers=KEY)
        answers = await asyncio.gather(*racing)
        assert reload.status_code == 200, reload.text
        assert reload.json()["model_version"] == new and reload.json()["previous_version"] == old
        for status, body_version, header_version in answers:
            assert status == 200 and body_version == header_version and body_version in (old, new)
        after = await client.get("/v1/users/r/predictions", headers=KEY)
        assert after.json()["model_version"] == new == after.headers["x-model-version"]
        assert (await client.get("/v1/model", headers=KEY)).json()["model_version"] == new
        assert _reloads(app.state.metrics, "ok") == 1
        info = [
            s.labels["model_version"]
            for family in app.state.metrics.registry.collect()
            if family.name == "nextact_model_info"
            for s in family.samples
        ]
        assert info == [new]


@pytest.mark.parametrize("breakage", ["nan", "truncated", "manifest"])
async def test_reload_endpoint_refuses_broken_artifacts(
    artifact: Path, tmp_path: Path, redis_url: str, breakage: str
) -> None:
    old = read_manifest(artifact).model_version
    async with running_app(artifact, redis_url, api_keys="reload-key") as (app, client):
        if breakage == "nan":
            edit_model(artifact, tmp_path / "nan", scale_output(float("nan")))
            copy_artifact(tmp_path / "nan", artifact)
        elif breakage == "truncated":
            data = (artifact / MODEL_FILE).read_bytes()
            (artifact / MODEL_FILE).write_bytes(data[:-100])
        else:
            (artifact / MANIFEST_FILE).write_text("{}")
        r = await client.post("/v1/model/reload", headers=KEY)
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "reload_refused" and old in r.json()["message"]
        p = await client.post("/v1/users/r/events", json={"action": "pv"}, headers=KEY)
        assert p.status_code == 200 and p.json()["model_version"] == old  # the old model keeps serving
        assert _reloads(app.state.metrics, "refused") == 1


async def test_app_file_watch_picks_up_a_new_artifact(artifact: Path, tmp_path: Path, redis_url: str) -> None:
    async with running_app(artifact, redis_url, artifact_watch_seconds=0.05) as (_, client):
        new = new_version(artifact, tmp_path / "v2", "app-watch")
        copy_artifact(tmp_path / "v2", artifact)

        async def serving() -> str:
            return str((await client.get("/v1/model")).json()["model_version"])

        deadline = time.monotonic() + 10
        while await serving() != new and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await serving() == new

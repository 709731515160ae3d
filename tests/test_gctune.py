"""The garbage-collector tuning (NEXTACT_GC_TUNING): set once the app has started, undone when it stops."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from app import gctune
from tests.app_client import running_app

pytestmark = pytest.mark.anyio


async def test_start_up_freezes_the_heap_and_raises_the_thresholds(
    behavior_artifact: Path, redis_url: str
) -> None:
    default = gc.get_threshold()
    assert default != gctune.THRESHOLD
    async with running_app(behavior_artifact, redis_url, key_prefix="gc") as (_, client):
        assert gc.get_threshold() == gctune.THRESHOLD
        assert gc.get_freeze_count() > 10_000  # the model, routes and schemas at least
        assert (await client.get("/healthz")).status_code == 200
        async with running_app(behavior_artifact, redis_url, key_prefix="gc2"):  # a second app in the process
            assert gc.get_threshold() == gctune.THRESHOLD
        assert gc.get_threshold() == gctune.THRESHOLD  # still held by the first
    assert gc.get_threshold() == default and gc.get_freeze_count() == 0


async def test_gc_tuning_off_leaves_the_defaults(behavior_artifact: Path, redis_url: str) -> None:
    default = gc.get_threshold()
    async with running_app(behavior_artifact, redis_url, key_prefix="gc", gc_tuning=False):
        assert gc.get_threshold() == default and gc.get_freeze_count() == 0

"""NEXTACT_STAGE_TIMINGS: real requests (real Redis, real model) are broken into stages on GET /debug/timings."""

from __future__ import annotations

import asyncio
import gc
import sys
from pathlib import Path

import pytest

from app.timings import DEBUG_PATH, STAGES
from tests.app_client import running_app

pytestmark = pytest.mark.anyio


async def test_stage_timings_record_every_stage_of_a_real_request(
    behavior_artifact: Path, redis_url: str
) -> None:
    async with running_app(behavior_artifact, redis_url, stage_timings=True) as (_, client):
        for i in range(3):
            posted = await client.post(
                f"/v1/users/timed-{i}/events", json={"action": "cart", "timestamp": 100 + i}
            )
            assert posted.status_code == 200, posted.text
        gc.collect()  # one pause the GC callback must have seen
        got = await client.get(DEBUG_PATH, params={"reset": "true"})
        assert got.status_code == 200, got.text
        snap = got.json()
        assert set(snap["stages_ms"]) == set(STAGES)
        for stage in STAGES:
            s = snap["stages_ms"][stage]
            assert s["count"] == 3, (stage, s)
            assert 0 <= s["p50"] <= s["p99"] <= s["max"], (stage, s)
        total = snap["stages_ms"]["total"]["max"]
        assert all(snap["stages_ms"][stage]["max"] <= total for stage in STAGES if stage != "inference")
        stages = snap["stages_ms"]
        # the thread's CPU time fits in its wall time (thread_time's tick is far below a millisecond)
        assert stages["infer_cpu"]["max"] <= stages["inference"]["max"] + 0.5, stages
        assert snap["gc"]["pauses"] >= 1 and len(snap["gc"]["by_generation_ms"]) == 3
        assert set(snap["loop_lag_ms"]) >= {"count"}
        after = (await client.get(DEBUG_PATH)).json()  # the reset emptied every series
        assert all(after["stages_ms"][stage]["count"] == 0 for stage in STAGES)
        reads = await client.get("/v1/users/timed-0/events")
        assert reads.status_code == 200
        assert (await client.get(DEBUG_PATH)).json()["stages_ms"]["total"][
            "count"
        ] == 1  # every route has a total


async def test_stage_timings_are_off_by_default(behavior_artifact: Path, redis_url: str) -> None:
    async with running_app(behavior_artifact, redis_url) as (app, client):
        assert app.state.stage_timings is None
        assert (await client.get(DEBUG_PATH)).status_code == 404
        posted = await client.post("/v1/users/untimed/events", json={"action": "cart", "timestamp": 100})
        assert posted.status_code == 200, posted.text


async def test_inline_calls_serve_the_same_answers_without_thread_hand_offs(
    behavior_artifact: Path, redis_url: str
) -> None:
    """NEXTACT_BATCH_INLINE_MAX_MS: an idle service scores on the loop's thread (no hand-off, no return stage),
    with the same answers as the inference thread gives; NEXTACT_SWITCH_INTERVAL_MS is set and put back."""
    default_interval = sys.getswitchinterval()
    answers: list[list[dict[str, object]]] = []
    for inline_ms, interval_ms, prefix in ((0.0, 5.0, "thread"), (1000.0, 1.0, "inline")):  # off, then on
        async with running_app(
            behavior_artifact,
            redis_url,
            stage_timings=True,
            inference_on="thread",  # what is measured here is the inference thread's hand-offs
            batch_inline_max_ms=inline_ms,
            switch_interval_ms=interval_ms,
            key_prefix=f"timings-{prefix}",
        ) as (_, client):
            assert sys.getswitchinterval() == pytest.approx(interval_ms / 1000)
            await client.get(DEBUG_PATH, params={"reset": "true"})
            got = []
            for i, action in enumerate(("pv", "cart", "pv", "fav")):
                posted = await client.post(
                    "/v1/users/u-inline/events", json={"action": action, "timestamp": i}
                )
                assert posted.status_code == 200, posted.text
                got.append(posted.json()["predictions"])
                await asyncio.sleep(0.05)  # idle between requests
            stages = (await client.get(DEBUG_PATH)).json()["stages_ms"]
            answers.append(got)
            if inline_ms:  # the first call goes to the inference thread (its cost is unknown), then the
                # other three run on the loop's thread: nothing handed off, nothing to return
                assert stages["handoff"]["p50"] == 0 and stages["return"]["p50"] == 0, stages
                assert stages["handoff"]["max"] > 0, stages
            else:
                assert stages["handoff"]["max"] > 0, stages
        assert sys.getswitchinterval() == default_interval
    assert answers[0] == answers[1]

"""A candidate model beside the live one: sticky canary shares, shadow scoring, atomic promotion."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from app.candidate import bucket, in_canary
from app.manifest import read_manifest
from app.model import ModelLoadError
from tests.app_client import running_app
from tests.artifact_edits import new_version


@pytest.fixture(scope="module")
def candidate(behavior_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The behaviour model under a new version: same answers, told apart by model_version."""
    out = tmp_path_factory.mktemp("candidate")
    new_version(behavior_artifact, out, "candidate")
    return out


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5])
def test_canary_share_holds_over_10000_users_and_is_sticky(share: float) -> None:
    users = [f"user-{i}" for i in range(10_000)]
    chosen = [u for u in users if in_canary(u, share)]
    assert abs(len(chosen) / len(users) - share) < 0.015  # 4 standard deviations at share 0.5
    assert chosen == [u for u in users if in_canary(u, share)]  # the same users every time
    assert all(in_canary(u, share + 0.1) for u in chosen)  # a larger share keeps the users it had
    assert 0 <= min(bucket(u) for u in users) and max(bucket(u) for u in users) < 1


@pytest.mark.anyio
async def test_canary_answers_say_which_model_served_them(
    behavior_artifact: Path, candidate: Path, redis_url: str
) -> None:
    live_v, cand_v = read_manifest(behavior_artifact).model_version, read_manifest(candidate).model_version
    settings = {"candidate_artifact_dir": candidate, "candidate_mode": "canary", "candidate_share": 0.5}
    async with running_app(behavior_artifact, redis_url, **settings) as (_, client):
        roles = set()
        for i in range(40):
            user = f"c{i}"
            want = ("candidate", cand_v) if in_canary(user, 0.5) else ("live", live_v)
            for _ in range(2):  # sticky across requests
                r = await client.post(f"/v1/users/{user}/events", json={"action": "pv"})
                assert (r.json()["served_by"], r.json()["model_version"]) == want
                assert r.headers["X-Model-Version"] == want[1]
            g = (await client.get(f"/v1/users/{user}/predictions")).json()
            assert (g["served_by"], g["model_version"]) == want
            roles.add(want[0])
        info = (await client.get("/v1/model")).json()
    assert roles == {"live", "candidate"}
    assert info["model_version"] == live_v
    assert info["candidate"]["model_version"] == cand_v and info["candidate"]["mode"] == "canary"
    assert (
        info["candidate"]["live_metrics"]["events_scored"] > 0 and info["live_metrics"]["events_scored"] > 0
    )


@pytest.mark.anyio
async def test_shadow_never_changes_an_answer(
    behavior_artifact: Path, item_artifact: Path, redis_url: str
) -> None:
    """A shadow candidate with another vocabulary: every answer equals the one without it; both are scored."""
    vocab = read_manifest(behavior_artifact).vocabulary[2:]
    item_vocab = read_manifest(item_artifact).vocabulary[2:]
    shadow = {"candidate_artifact_dir": item_artifact, "candidate_mode": "shadow", "key_prefix": "shadow"}
    async with (
        running_app(behavior_artifact, redis_url, **shadow) as (_, with_shadow),
        running_app(behavior_artifact, redis_url, key_prefix="plain") as (_, plain),
    ):
        for n in range(60):
            user = f"s{n % 6}"
            action = vocab[n % len(vocab)] if n % 3 else item_vocab[n]  # actions of either vocabulary
            event = {"action": action, "timestamp": n, "event_id": f"e{n}"}
            params = {"k": 3, "exclude": vocab[0]} if n % 4 == 0 else {"k": 10}
            a = await with_shadow.post(f"/v1/users/{user}/events", json=event, params=params)
            b = await plain.post(f"/v1/users/{user}/events", json=event, params=params)
            assert a.status_code == b.status_code == 200
            assert a.json() == b.json() and a.json()["served_by"] == "live"
            ga = await with_shadow.get(f"/v1/users/{user}/predictions")
            assert ga.json() == (await plain.get(f"/v1/users/{user}/predictions")).json()
        info = (await with_shadow.get("/v1/model")).json()
    shadow_live = info["candidate"]["live_metrics"]
    assert info["candidate"]["mode"] == "shadow"
    assert shadow_live["events_scored"] == info["live_metrics"]["events_scored"] > 40
    assert shadow_live["unknown_rate"] > 0  # behaviour actions are unknown to the item model


@pytest.mark.anyio
async def test_promote_is_atomic_under_concurrent_load(
    behavior_artifact: Path, candidate: Path, redis_url: str
) -> None:
    live_v, cand_v = read_manifest(behavior_artifact).model_version, read_manifest(candidate).model_version
    settings = {"candidate_artifact_dir": candidate, "candidate_mode": "canary", "candidate_share": 0.5}
    async with running_app(behavior_artifact, redis_url, **settings) as (_, client):
        slots, done, halfway = asyncio.Semaphore(16), [0], asyncio.Event()

        async def one(i: int) -> tuple[str, str, str]:
            user = f"p{i % 50}"
            async with slots:  # 16 in flight at a time, so the promote lands among running requests
                r = await client.post(f"/v1/users/{user}/events", json={"action": "cart"})
            assert r.status_code == 200, r.text
            done[0] += 1
            if done[0] == 100:
                halfway.set()
            return user, r.json()["served_by"], r.json()["model_version"]

        async def promote() -> dict[str, str]:
            await halfway.wait()
            r = await client.post("/v1/model/promote")
            assert r.status_code == 200, r.text
            return dict(r.json())

        results = await asyncio.gather(promote(), *(one(i) for i in range(240)))
        promoted, answers = results[0], results[1:]
        after = [await one(i) for i in range(50)]
        again = await client.post("/v1/model/promote")
        info = (await client.get("/v1/model")).json()
    assert promoted == {"model_version": cand_v, "previous_version": live_v}
    for user, role, version in answers:  # each answer from one whole pair: the old one or the new one
        old = ("candidate", cand_v) if in_canary(user, 0.5) else ("live", live_v)
        assert (role, version) in {old, ("live", cand_v)}, (user, role, version)
    seen = {(r, v) for _, r, v in answers}
    assert ("live", live_v) in seen and ("live", cand_v) in seen  # promote did land mid-load
    assert {(r, v) for _, r, v in after} == {("live", cand_v)}
    assert again.status_code == 409 and again.json()["error"] == "no_candidate"
    assert info["model_version"] == cand_v and info["candidate"] is None


@pytest.mark.anyio
async def test_reload_loads_the_candidate_again(
    behavior_artifact: Path, candidate: Path, redis_url: str
) -> None:
    settings = {"candidate_artifact_dir": candidate, "candidate_mode": "shadow"}
    async with running_app(behavior_artifact, redis_url, **settings) as (_, client):
        assert (await client.post("/v1/model/promote")).status_code == 200
        assert (await client.get("/v1/model")).json()["candidate"] is None
        r = await client.post("/v1/model/reload", params={"target": "candidate"})
        assert r.status_code == 200, r.text
        assert (await client.get("/v1/model")).json()["candidate"]["model_version"] == r.json()[
            "model_version"
        ]
    async with running_app(behavior_artifact, redis_url) as (_, client):
        r = await client.post("/v1/model/reload", params={"target": "candidate"})
        assert r.status_code == 409 and "NEXTACT_CANDIDATE_ARTIFACT_DIR" in r.json()["message"]


@pytest.mark.anyio
async def test_candidate_with_incremental_state_is_refused_at_start(
    behavior_artifact: Path, candidate: Path, redis_url: str
) -> None:
    with pytest.raises(ModelLoadError, match="NEXTACT_CANDIDATE_ARTIFACT_DIR.*NEXTACT_INCREMENTAL_STATE"):
        async with running_app(
            behavior_artifact, redis_url, candidate_artifact_dir=candidate, incremental_state=True
        ):
            pass
    assert not redis.Redis.from_url(redis_url).keys("*")
    async with running_app(behavior_artifact, redis_url, candidate_artifact_dir=candidate) as (app, _):
        assert app.state.services.step_batcher is None  # left at its default, it is off beside a candidate

"""End to end over HTTP: the real app, the real Redis, a model trained by the training package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from app.batching import choose_inference_on, usable_cpus
from app.manifest import read_manifest
from tests.app_client import probabilities, running_app

pytestmark = pytest.mark.anyio
TTL = 3600


def _check_distribution(body: dict[str, Any], vocab: list[str]) -> None:
    probs = [p["probability"] for p in body["predictions"]]
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert probs == sorted(probs, reverse=True)
    assert {p["action"] for p in body["predictions"]} <= set(vocab[2:])  # never <pad> / <unk>


async def test_posting_events_changes_the_prediction(behavior_artifact: Path, redis_url: str) -> None:
    vocab = read_manifest(behavior_artifact).vocabulary
    async with running_app(behavior_artifact, redis_url) as (_, client):
        empty = await client.get("/v1/users/alice/predictions", params={"k": len(vocab)})
        assert empty.status_code == 200, empty.text
        assert empty.json()["window_size"] == 0
        posted = await client.post(
            "/v1/users/alice/events",
            json={
                "events": [
                    {"action": "cart", "timestamp": 100},
                    {"action": "cart", "timestamp": 101},
                    {"action": "buy", "timestamp": 102},
                ]
            },
            params={"k": len(vocab)},
        )
        assert posted.status_code == 200, posted.text
        body = posted.json()
        assert body["user_id"] == "alice"
        assert body["window_size"] == 3 and body["unknown_actions"] == 0
        assert body["model_version"] == read_manifest(behavior_artifact).model_version
        assert probabilities(body) != probabilities(empty.json())
        again = await client.get("/v1/users/alice/predictions", params={"k": len(vocab)})
        assert again.json() == body  # reading predicts from the same stored window


async def test_probabilities_are_a_sorted_distribution(behavior_artifact: Path, redis_url: str) -> None:
    vocab = read_manifest(behavior_artifact).vocabulary
    async with running_app(behavior_artifact, redis_url) as (_, client):
        for n, action in enumerate(["pv", "pv", "fav", "cart", "no-such-action"]):
            r = await client.post(
                "/v1/users/bob/events", json={"action": action, "timestamp": n}, params={"k": 1000}
            )
            body = r.json()
            _check_distribution(body, vocab)
            assert len(body["predictions"]) == len(vocab) - 2  # k is capped at the real actions
            assert abs(sum(probabilities(body).values()) - 1.0) < 1e-4
        assert body["unknown_actions"] == 1
        top = await client.get("/v1/users/bob/predictions", params={"k": 2})
        assert len(top.json()["predictions"]) == 2
        assert top.json()["predictions"] == body["predictions"][:2]
        default = await client.get("/v1/users/bob/predictions")
        assert len(default.json()["predictions"]) == min(10, len(vocab) - 2)


async def test_late_events_land_in_timestamp_order(behavior_artifact: Path, redis_url: str) -> None:
    async with running_app(behavior_artifact, redis_url) as (_, client):
        for ts, action in [(30, "buy"), (10, "pv"), ("1970-01-01T00:00:20Z", "cart"), (10, "fav")]:
            assert (
                await client.post("/v1/users/c/events", json={"action": action, "timestamp": ts})
            ).status_code == 200
        events = (await client.get("/v1/users/c/events")).json()["events"]
        assert [(e["action"], e["timestamp"]) for e in events] == [
            ("pv", 10.0),
            ("fav", 10.0),
            ("cart", 20.0),
            ("buy", 30.0),
        ]  # the tie keeps arrival order
        assert all(len(e["event_id"]) == 32 for e in events)  # assigned by the server


async def test_duplicate_event_ids_are_ignored(behavior_artifact: Path, redis_url: str) -> None:
    batch = {
        "events": [
            {"action": "pv", "timestamp": 1, "event_id": "e1"},
            {"action": "cart", "timestamp": 2, "event_id": "e2"},
            {"action": "cart", "timestamp": 2, "event_id": "e2"},
        ]
    }
    async with running_app(behavior_artifact, redis_url) as (_, client):
        first = await client.post("/v1/users/d/events", json=batch)
        second = await client.post("/v1/users/d/events", json=batch)
        assert first.json() == second.json()
        assert first.json()["window_size"] == 2
        events = (await client.get("/v1/users/d/events")).json()["events"]
        assert [e["event_id"] for e in events] == ["e1", "e2"]
        bulk = await client.post(
            "/v1/events",
            json={
                "events": [
                    {"user_id": "d", "action": "pv", "timestamp": 1, "event_id": "e1"},
                    {"user_id": "d", "action": "buy", "timestamp": 3, "event_id": "e3"},
                ]
            },
        )
        assert bulk.json() == {"accepted": 1, "duplicates": 1}


async def test_the_window_never_exceeds_its_length(behavior_artifact: Path, redis_url: str) -> None:
    window = read_manifest(behavior_artifact).window
    async with running_app(behavior_artifact, redis_url) as (_, client):
        for start in range(0, 3 * window, window // 2 + 1):
            events = [
                {"action": "pv", "timestamp": t, "event_id": f"e{t}"}
                for t in range(start, start + window // 2 + 1)
            ]
            r = await client.post("/v1/users/e/events", json={"events": events})
            assert r.json()["window_size"] <= window
        stored = (await client.get("/v1/users/e/events")).json()["events"]
        assert len(stored) == window
        last = start + window // 2
        assert [e["event_id"] for e in stored] == [f"e{t}" for t in range(last - window + 1, last + 1)]
        model = (await client.get("/v1/model")).json()
        assert model["window"] == model["window_size"] == window
    async with running_app(behavior_artifact, redis_url, window_size=3) as (_, client):
        r = await client.post("/v1/users/e/events", json={"action": "buy", "timestamp": 10_000})
        assert r.json()["window_size"] == 3
        assert len((await client.get("/v1/users/e/events")).json()["events"]) == 3


async def test_the_window_expires_after_the_ttl(behavior_artifact: Path, redis_url: str) -> None:
    async with running_app(behavior_artifact, redis_url, window_ttl_seconds=TTL, key_prefix="ttl") as (
        _,
        client,
    ):
        await client.post("/v1/users/f/events", json={"action": "pv"})
    sync = redis.Redis.from_url(redis_url)
    try:
        keys = sync.keys("ttl:{f}:*")
        assert sorted(keys) == [b"ttl:{f}:e", b"ttl:{f}:s"]  # e: the window; s: the stored prediction
        assert all(TTL - 10 <= sync.ttl(k) <= TTL for k in keys)
    finally:
        sync.close()


async def test_delete_erases_the_user(behavior_artifact: Path, redis_url: str) -> None:
    async with running_app(behavior_artifact, redis_url, key_prefix="del") as (_, client):
        await client.post("/v1/users/g/events", json={"action": "pv", "event_id": "x"})
        await client.post("/v1/users/h/events", json={"action": "pv"})
        r = await client.delete("/v1/users/g")
        assert r.status_code == 204 and r.content == b""
        assert (await client.get("/v1/users/g/events")).json() == {"user_id": "g", "events": []}
        assert (await client.get("/v1/users/g/predictions")).json()["window_size"] == 0
        assert (await client.delete("/v1/users/nobody")).status_code == 204
        again = await client.post("/v1/users/g/events", json={"action": "pv", "event_id": "x"})
        assert again.json()["window_size"] == 1  # its ids are forgotten too
    sync = redis.Redis.from_url(redis_url)
    try:
        assert sorted(sync.keys("del:*")) == [b"del:{g}:e", b"del:{g}:s", b"del:{h}:e", b"del:{h}:s"]
    finally:
        sync.close()


async def test_bulk_ingestion_and_per_user_predictions(behavior_artifact: Path, redis_url: str) -> None:
    events = [
        {"user_id": u, "action": a, "timestamp": t}
        for t, (u, a) in enumerate([("u1", "pv"), ("u2", "cart"), ("u1", "buy"), ("u3", "pv"), ("u2", "??")])
    ]
    async with running_app(behavior_artifact, redis_url) as (_, client):
        r = await client.post("/v1/events", json={"events": events}, params={"predict": "true", "k": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["accepted"], body["duplicates"]) == (5, 0)
        assert [
            (p["user_id"], p["window_size"], p["unknown_actions"], len(p["predictions"]))
            for p in body["predictions"]
        ] == [("u1", 2, 0, 2), ("u2", 2, 1, 2), ("u3", 1, 0, 2)]
        for p in body["predictions"]:
            single = (await client.get(f"/v1/users/{p['user_id']}/predictions", params={"k": 2})).json()
            assert single == p
        u1 = (await client.get("/v1/users/u1/events")).json()["events"]
        assert [e["action"] for e in u1] == ["pv", "buy"]


async def test_model_health_and_readiness(behavior_artifact: Path, redis_url: str) -> None:
    manifest = read_manifest(behavior_artifact)
    async with running_app(behavior_artifact, redis_url) as (_, client):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["model_version"] == manifest.model_version
        model = (await client.get("/v1/model")).json()
        assert model["model_version"] == manifest.model_version
        assert model["cell"] == manifest.cell and model["vocabulary_size"] == manifest.vocab_size
        assert model["metrics"] == manifest.metrics
        # this build has no usable CUDA: auto falls back and says so
        assert model["execution_provider"] == "CPUExecutionProvider" == model["providers"][0]
        assert model["device"] == "auto"
    async with running_app(behavior_artifact, redis_url, inference_on="auto") as (_, client):
        model = (await client.get("/v1/model")).json()
        # NEXTACT_INFERENCE_ON=auto resolved for this host (one worker), with its reason
        want = choose_inference_on("auto", "CPUExecutionProvider", usable_cpus())
        assert (model["inference_on"], model["inference_on_reason"]) == want
        assert want[1].startswith("auto: ")
    for on in ("thread", "loop"):  # either, set explicitly, is kept whatever the host
        async with running_app(behavior_artifact, redis_url, inference_on=on) as (app, client):
            model = (await client.get("/v1/model")).json()
            assert (model["inference_on"], model["inference_on_reason"]) == (
                on,
                "set by NEXTACT_INFERENCE_ON",
            )
            posted = await client.post(f"/v1/users/u9-{on}/events", json={"action": "pv"})
            assert posted.status_code == 200 and posted.json()["predictions"]
            assert app.state.services.batcher.on_loop is (on == "loop")


async def test_openapi_describes_every_field_with_an_example(behavior_artifact: Path, redis_url: str) -> None:
    async with running_app(behavior_artifact, redis_url) as (_, client):
        spec = (await client.get("/openapi.json")).json()
        assert (await client.get("/docs")).status_code == 200
    missing = []
    for name, schema in spec["components"]["schemas"].items():
        if name in {"HTTPValidationError", "ValidationError"}:
            continue
        for field, prop in schema.get("properties", {}).items():
            if "description" not in prop:
                missing.append(f"{name}.{field}: description")
            if "examples" not in prop and "example" not in prop and not _is_object_list(prop):
                missing.append(f"{name}.{field}: example")
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op.get("description") or op.get("summary"), f"{method} {path}"
            for param in op.get("parameters", []):
                if not (
                    param.get("description") and (param.get("examples") or param["schema"].get("examples"))
                ):
                    missing.append(f"{method} {path} {param['name']}")
    assert not missing, missing


def _is_object_list(prop: dict[str, Any]) -> bool:
    """A list of documented objects (its items carry the examples)."""
    items = prop.get("items", {})
    return prop.get("type") == "array" and "$ref" in items

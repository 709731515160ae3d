"""Request-time filters: never an excluded action, k beyond what remains, the model's probabilities (or renormalised)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from app.filters import Filters
from app.manifest import read_manifest
from app.model import ServingModel, load_model
from tests.app_client import probabilities, running_app


@pytest.fixture(scope="module")
def item_model(item_artifact: Path) -> ServingModel:
    return load_model(item_artifact, device="cpu")


def test_filtered_answers_are_the_models_own_over_what_is_allowed(item_model: ServingModel) -> None:
    vocab = item_model.manifest.vocabulary[2:]
    rng = random.Random(3)
    for trial in range(60):
        window = rng.sample(vocab, rng.randint(0, 15))
        exclude = set(rng.sample(vocab, rng.randint(0, 40))) | {"not-an-action"}
        include = set(rng.sample(vocab, rng.randint(1, 30))) | {"<pad>", "<unk>"} if trial % 2 else None
        k = rng.choice([1, 5, 10, 40, 10_000])
        f = Filters.of(exclude, include, exclude_window=trial % 3 == 0, renormalize=trial % 4 == 0)
        assert f is not None
        (full,) = item_model.predict([(window, 10**6)])
        (got,) = item_model.predict([(window, k, f)])
        model_p = dict(zip(full.actions, full.probabilities, strict=True))
        allowed = [
            a
            for a in full.actions
            if a not in exclude
            and (include is None or a in include)
            and not (f.exclude_window and a in window)
        ]
        assert got.actions == allowed[:k]  # the same order as the model's ranking: filtered before top-k
        assert "<pad>" not in got.actions and "<unk>" not in got.actions
        mass = sum(model_p[a] for a in allowed)
        for a, p in zip(got.actions, got.probabilities, strict=True):
            assert p == pytest.approx(model_p[a] / mass if f.renormalize else model_p[a], rel=1e-5, abs=1e-9)
            assert 0.0 <= p <= 1.0 + 1e-6
        if f.renormalize and k >= len(allowed) and allowed:
            assert sum(got.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_a_batch_mixes_filtered_and_plain_rows(item_model: ServingModel) -> None:
    vocab = item_model.manifest.vocabulary
    window = [vocab[5], vocab[9]]
    (plain,) = item_model.predict([(window, 10)])
    together = item_model.predict(
        [(window, 10), (window, 10, Filters.of(exclude=plain.actions[:3])), (window, 10)]
    )
    assert together[0] == plain and together[2] == plain
    assert together[1].actions[:7] == plain.actions[3:]
    assert np.allclose(together[1].probabilities[:7], plain.probabilities[3:])


@pytest.mark.anyio
async def test_filters_over_http(behavior_artifact: Path, redis_url: str) -> None:
    vocab = read_manifest(behavior_artifact).vocabulary[2:]
    async with running_app(behavior_artifact, redis_url) as (_, client):
        events = {"events": [{"action": "pv", "timestamp": 1}, {"action": "cart", "timestamp": 2}]}
        plain = (await client.post("/v1/users/f/events", json=events, params={"k": 100})).json()
        assert set(probabilities(plain)) == set(vocab)

        got = await client.get("/v1/users/f/predictions", params={"k": 100, "exclude_window": "true"})
        assert got.status_code == 200, got.text
        assert set(probabilities(got.json())) == set(vocab) - {"pv", "cart"}
        for a, p in probabilities(got.json()).items():
            assert p == probabilities(plain)[a]  # the model's probabilities, not renormalised

        only = await client.get(
            "/v1/users/f/predictions",
            params=[("include", "buy"), ("include", "nope"), ("renormalize", "true")],
        )
        assert only.json()["predictions"] == [{"action": "buy", "probability": pytest.approx(1.0)}]

        none_left = await client.get("/v1/users/f/predictions", params=[("exclude", a) for a in vocab])
        assert none_left.status_code == 200 and none_left.json()["predictions"] == []

        one = await client.post(
            "/v1/users/f/events",
            params=[("k", "1"), ("exclude", plain["predictions"][0]["action"])],
            json={"action": "fav", "timestamp": 3},
        )
        assert one.status_code == 200
        assert one.json()["predictions"][0]["action"] != plain["predictions"][0]["action"]

        bulk = await client.post(
            "/v1/events",
            params={"predict": "true", "k": 100, "exclude_window": "true"},
            json={"events": [{"user_id": "g", "action": "buy", "timestamp": 1}]},
        )
        assert bulk.status_code == 200
        assert "buy" not in probabilities(bulk.json()["predictions"][0])

        too_long = await client.get("/v1/users/f/predictions", params={"exclude": "x" * 300})
        assert too_long.status_code == 422
        assert "query.exclude[0]" in too_long.json()["message"]


def test_filters_are_documented_with_examples(behavior_artifact: Path) -> None:
    from app.main import create_app
    from tests.app_client import settings_for

    spec = create_app(settings_for(behavior_artifact, None)).openapi()
    for path, method in [
        ("/v1/users/{user_id}/predictions", "get"),
        ("/v1/users/{user_id}/events", "post"),
        ("/v1/events", "post"),
    ]:
        params = {p["name"]: p for p in spec["paths"][path][method]["parameters"]}
        for name in ("exclude_window", "exclude", "include", "renormalize"):
            assert params[name]["description"] and "examples" in params[name]["schema"], (path, name)

"""Live quality: hit@k of the API's replayed event stream equals an offline computation over the same stream."""

from __future__ import annotations

import bisect
import csv
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis

from app.model import ServingModel, load_model
from app.quality import DEPTH, KS, pack, unpack
from tests.app_client import running_app
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.anyio


@dataclass
class Offline:
    """The same bookkeeping as the service, done by hand: windows in timestamp order, one prediction per post."""

    model: ServingModel
    capacity: int
    windows: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    seen: dict[str, set[str]] = field(default_factory=dict)
    predicted: dict[str, list[str] | None] = field(default_factory=dict)  # top-20 after the user's last post
    scored: int = 0
    hits: list[int] = field(default_factory=lambda: [0] * len(KS))
    rr: float = 0.0
    unknown: int = 0
    late: int = 0
    duplicate: int = 0

    def post(self, user: str, action: str, ts: float, event_id: str, predict: bool = True) -> None:
        window, seen = self.windows.setdefault(user, []), self.seen.setdefault(user, set())
        if event_id in seen:
            self.duplicate += 1
            return
        if window and ts < window[-1][0]:
            self.late += 1
        elif self.predicted.get(user) is not None:
            top = self.predicted[user]
            assert top is not None
            self.scored += 1
            if not self.model.knows(action):
                self.unknown += 1
            if action in top:
                rank = top.index(action) + 1
                self.rr += 1 / rank
                self.hits = [h + (rank <= k) for h, k in zip(self.hits, KS, strict=True)]
        seen.add(event_id)
        window.insert(bisect.bisect_right([t for t, _ in window], ts), (ts, action))
        del window[: max(0, len(window) - self.capacity)]
        if predict:
            (p,) = self.model.predict([([a for _, a in window], DEPTH)])
            self.predicted[user] = p.actions
        else:
            self.predicted[user] = None


def _start(users: int, per_user: int) -> list[tuple[str, str, float]]:
    """Real Beauty sequences: (user, item, timestamp) of the first `users` users with enough events."""
    rows: dict[str, list[tuple[str, float]]] = {}
    with (EXAMPLES / "beauty_sample.csv").open() as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["user_id"], []).append((r["item_id"], float(r["timestamp"])))
    chosen = [u for u, evs in rows.items() if len(evs) >= per_user][:users]
    return [(u, item, ts) for u in chosen for item, ts in sorted(rows[u], key=lambda e: e[1])[:per_user]]


def _next_action(offline: Offline, user: str, rng: random.Random) -> str:
    """Mostly an action at a random rank of the model's current top-25 (so hits land at every k), else any."""
    vocab = offline.model.manifest.vocabulary
    top = offline.predicted.get(user)
    if top and rng.random() < 0.7:
        (p,) = offline.model.predict([([a for _, a in offline.windows[user]], 25)])
        return p.actions[rng.randrange(len(p.actions))]
    return vocab[rng.randrange(2, len(vocab))]


async def test_live_hit_at_k_equals_the_offline_computation(item_artifact: Path, redis_url: str) -> None:
    model = load_model(item_artifact, device="cpu")
    capacity = model.manifest.window
    offline = Offline(model, capacity)
    start = _start(users=8, per_user=4)
    rng = random.Random(5)
    users = sorted({u for u, _, _ in start})
    # the full-window graph, like the offline side: the step graph agrees to float rounding (1e-9), which can
    # swap near-tied ranks (incremental state has its own parity tests)
    async with running_app(item_artifact, redis_url, incremental_state=False) as (_, client):
        for n in range(len(start) + 160):
            if n < len(start):
                user, item, ts = start[n]
            else:  # continue each user's stream with actions the model ranks anywhere from 1 to 25, or not at all
                user = users[n % len(users)]
                item, ts = _next_action(offline, user, rng), offline.windows[user][-1][0] + 1
            event = {"action": item, "timestamp": ts, "event_id": f"e{n}"}
            r = await client.post(f"/v1/users/{user}/events", json=event, params={"k": 3})
            assert r.status_code == 200, r.text
            offline.post(user, item, ts, f"e{n}")
            if n % 7 == 3:  # a re-sent event: a duplicate, not counted
                again = await client.post(f"/v1/users/{user}/events", json=event, params={"k": 3})
                assert again.json()["predictions"] == r.json()["predictions"]
                offline.post(user, item, ts, f"e{n}")
            if n % 11 == 5 and ts >= 1:  # a late event: stored, not counted
                await client.post(
                    f"/v1/users/{user}/events",
                    json={"action": item, "timestamp": ts - 0.5, "event_id": f"late{n}"},
                )
                offline.post(user, item, ts - 0.5, f"late{n}")
            if n % 13 == 6:  # an event of an action the model has never seen: scored, a miss
                await client.post(
                    f"/v1/users/{user}/events",
                    json={"action": "never-seen", "timestamp": ts, "event_id": f"new{n}"},
                )
                offline.post(user, "never-seen", ts, f"new{n}")
            if n % 17 == 8:  # posted without a prediction: the next event has none to be scored against
                await client.post(
                    "/v1/events",
                    json={
                        "events": [{"user_id": user, "action": item, "timestamp": ts, "event_id": f"bulk{n}"}]
                    },
                )
                offline.post(user, item, ts, f"bulk{n}", predict=False)
        info = (await client.get("/v1/model")).json()
        metrics = (await client.get("/metrics")).text
        record = redis.Redis.from_url(redis_url).hget(f"nextact:{{{users[0]}}}:s", "p")
    live = info["live_metrics"]
    assert offline.scored > 100 and 0 < offline.hits[0] < offline.hits[2] < offline.hits[3] < offline.scored
    assert offline.late > 0 and offline.duplicate > 0 and offline.unknown > 0
    assert live["events_scored"] == offline.scored
    for k, hits in zip(KS, offline.hits, strict=True):
        assert live[f"hr@{k}"] == pytest.approx(hits / offline.scored, abs=1e-12), k
    assert live["mrr@20"] == pytest.approx(offline.rr / offline.scored, rel=1e-9)
    assert live["unknown_rate"] == pytest.approx(offline.unknown / offline.scored, abs=1e-12)
    assert "full" in info["metrics"]  # the offline figures beside the live ones

    version = info["model_version"]
    assert (
        _counter(metrics, "nextact_live_events_scored_total", f'model_version="{version}"') == offline.scored
    )
    assert (
        _counter(metrics, "nextact_live_hits_total", f'k="10",model_version="{version}"') == offline.hits[2]
    )
    assert _counter(metrics, "nextact_live_events_not_scored_total", 'reason="late"') == offline.late
    assert (
        _counter(metrics, "nextact_live_events_not_scored_total", 'reason="duplicate"') == offline.duplicate
    )
    # the stored prediction is compact: version + 20 two-byte ids
    assert record is not None and len(record) == 2 + len(version) + 4 + 2 * DEPTH


def _counter(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    assert m, f"{name}{{{labels}}} not in /metrics"
    return float(m.group(1))


def test_records_round_trip() -> None:
    ids = np.arange(40, 20, -1)
    data = pack([("a" * 16, ids, 100), ("bb", ids + 70_000, 100_000)])
    (v1, b1), (v2, b2) = unpack(data)
    assert (v1, v2) == ("a" * 16, "bb")
    assert np.frombuffer(b1, "<u2").tolist() == ids.tolist()
    assert np.frombuffer(b2, "<u4").tolist() == (ids + 70_000).tolist()


async def test_live_quality_off_stores_nothing(behavior_artifact: Path, redis_url: str) -> None:
    async with running_app(behavior_artifact, redis_url, live_quality=False) as (_, client):
        for ts in range(3):
            await client.post("/v1/users/q/events", json={"action": "pv", "timestamp": ts})
        info = (await client.get("/v1/model")).json()
    assert info["live_metrics"] is None
    # the hash may hold incremental state's fields (on by default), never live quality's
    stored = redis.Redis.from_url(redis_url).hgetall("nextact:{q}:s")
    assert not stored.keys() & {b"pn", b"p"}


async def test_with_incremental_state_the_predictions_ride_on_the_state_save(
    item_artifact: Path, redis_url: str
) -> None:
    model = load_model(item_artifact, device="cpu")
    offline = Offline(model, model.manifest.window)
    plain = redis.Redis.from_url(redis_url)
    vocab = [a for a in ("B000050B6B", "B00004TMFE", "B0000530HU") if model.knows(a)] or ["unknown-item"]

    def evalsha_calls() -> int:
        return int(plain.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    async with running_app(item_artifact, redis_url) as (app, client):
        services = app.state.services
        assert services.step_batcher is not None and services.state_saver is not None  # on by default
        before = evalsha_calls()
        for n in range(6):
            action = vocab[n % len(vocab)]
            r = await client.post(
                "/v1/users/ride/events", json={"action": action, "timestamp": n, "event_id": f"r{n}"}
            )
            assert r.status_code == 200, r.text
            offline.post("ride", action, n, f"r{n}")
        await services.state_saver.drain()
        calls = evalsha_calls() - before
        live = (await client.get("/v1/model")).json()["live_metrics"]
    plain.close()
    # every event after the first is scored against the predictions stored with the previous state
    assert live["events_scored"] == offline.scored == 5
    assert calls == 2 * 6  # per event: the append, and one state save carrying the predictions

"""Hostile input: properties of event parsing and of the Redis window logic (hypothesis), and schema-driven
fuzzing of the whole HTTP API from its OpenAPI document (schemathesis) against the real service process.

Everything is bounded: a fixed number of examples per property and per API operation, no deadline
flakiness on busy machines (deadline=None), and the service process is always stopped.
"""

from __future__ import annotations

import asyncio
import json
import math
import string
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError
from schemathesis import GenerationMode

from app.events import InvalidField, epoch_seconds, field_path, new_event
from app.manifest import read_manifest
from app.schemas import BulkEvents, EventIn, UserEventsBody
from app.settings import Settings
from app.windows import NewEvent, WindowStore
from tests.service_proc import ServiceProcess

NOW = 1_700_000_000.0
SETTINGS = Settings(
    max_id_length=64, max_action_length=64, min_event_timestamp=0.0, max_future_seconds=86_400
)
FUZZ_EXAMPLES = 25  # per API operation
BOUNDED = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# strings that tend to break things: separators of the key/member layouts, control characters, unicode
nasty_text = st.text(
    alphabet=st.sampled_from(
        [*":{}|,\\/\"'\x00\x01\n\r\t ", "é", "漢", "🙂", "\u202e", *string.ascii_letters]
    ),
    min_size=1,
    max_size=12,
) | st.text(min_size=1, max_size=12)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


# --- event parsing -------------------------------------------------------------------------------------------


@BOUNDED
@given(
    st.dictionaries(
        st.sampled_from(["action", "timestamp", "event_id", "events", "user_id", "x"]),
        json_values,
        max_size=5,
    )
    | json_values
)
def test_any_json_body_validates_or_fails_with_a_field(body: Any) -> None:
    """Arbitrary JSON either parses into an event/batch or fails with pydantic's located errors, nothing else."""
    for adapter in (TypeAdapter(UserEventsBody), TypeAdapter(BulkEvents)):
        try:
            adapter.validate_python(body)
        except ValidationError as e:
            assert all(field_path(("body", *err["loc"])) for err in e.errors())


@BOUNDED
@given(
    action=nasty_text,
    event_id=st.none() | nasty_text,
    ts=st.none() | st.floats(min_value=0, max_value=NOW + 86_400, allow_nan=False),
)
def test_valid_events_keep_their_fields(action: str, event_id: str | None, ts: float | None) -> None:
    event = EventIn(action=action, event_id=event_id, timestamp=ts)
    try:
        out = new_event(event, NOW, SETTINGS, ("body",))
    except InvalidField as e:  # only lone surrogates are refused among these short strings
        assert e.loc[-1] in ("action", "event_id") and "UTF-8" in e.message
        return
    assert out.action == action
    assert out.event_id == event_id if event_id is not None else len(out.event_id) == 32
    assert out.timestamp == (NOW if ts is None else ts)


@BOUNDED
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_timestamps_outside_the_sane_range_name_the_field(ts: float) -> None:
    loc = ("body", "events", 3, "timestamp")
    sane = math.isfinite(ts) and SETTINGS.min_event_timestamp <= ts <= NOW + SETTINGS.max_future_seconds
    try:
        assert epoch_seconds(ts, NOW, SETTINGS, loc) == ts
        assert sane
    except InvalidField as e:
        assert not sane
        assert field_path(e.loc) == "body.events[3].timestamp"


@BOUNDED
@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2023, 11, 14), timezones=st.just(UTC)))
def test_iso_timestamps_become_epoch_seconds(when: datetime) -> None:
    event = TypeAdapter(EventIn).validate_json(json.dumps({"action": "pv", "timestamp": when.isoformat()}))
    assert new_event(event, NOW, SETTINGS, ("body",)).timestamp == when.timestamp()


@BOUNDED
@given(st.integers(min_value=SETTINGS.max_action_length + 1, max_value=5000), nasty_text)
def test_overlong_strings_are_refused(length: int, seed: str) -> None:
    text = (seed * length)[:length]
    with pytest.raises(InvalidField, match="longer than"):
        new_event(EventIn(action=text), NOW, SETTINGS, ("body",))


def test_nan_and_infinity_timestamps_are_refused() -> None:
    """JSON's NaN/Infinity extensions parse as floats; the timestamp check refuses them, naming the field."""
    for literal in ("NaN", "Infinity", "-Infinity"):
        event = TypeAdapter(EventIn).validate_json(f'{{"action": "pv", "timestamp": {literal}}}')
        with pytest.raises(InvalidField, match="finite") as info:
            new_event(event, NOW, SETTINGS, ("body",))
        assert field_path(info.value.loc) == "body.timestamp"


# --- window logic against the real Redis ---------------------------------------------------------------------


def reference_append(
    state: dict[str, Any], events: list[NewEvent], capacity: int
) -> tuple[int, int, list[str]]:
    """What the append script must do: skip ids in the window, insert by (timestamp, arrival), trim the oldest."""
    accepted = duplicates = 0
    for e in events:
        if e.event_id in {x[2] for x in state["window"]}:
            duplicates += 1
            continue
        state["seq"] += 1
        state["window"].append((e.timestamp, state["seq"], e.event_id, e.action))
        accepted += 1
    state["window"].sort(key=lambda x: (x[0], x[1]))
    del state["window"][: max(0, len(state["window"]) - capacity)]
    return accepted, duplicates, [x[3] for x in state["window"]]


event_ids = st.sampled_from(["a", "b", "c", "d", "e:1", "{x}", "é", "🙂"]) | st.text(min_size=1, max_size=6)
new_events = st.builds(
    NewEvent,
    event_id=event_ids,
    action=nasty_text,
    timestamp=st.sampled_from([0.0, 1.0, 1.5, 2.0]) | st.floats(min_value=0, max_value=1e10, allow_nan=False),
)


@pytest.fixture(scope="module")
def window_redis_url(redis_server: Any) -> str:
    return str(redis_server.url)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    user=nasty_text,
    capacity=st.integers(1, 6),
    batches=st.lists(st.lists(new_events, min_size=1, max_size=6), min_size=1, max_size=5),
)
def test_window_matches_the_reference_model(
    window_redis_url: str, user: str, capacity: int, batches: list[list[NewEvent]]
) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(window_redis_url)
        store = WindowStore(client, "fuzz", 60, "test")
        try:
            await store.delete(user)
            state: dict[str, Any] = {"seq": 0, "window": []}
            for batch in batches:
                got = await store.append(user, batch, capacity)
                accepted, duplicates, actions = reference_append(state, batch, capacity)
                assert (got.accepted, got.duplicates, got.actions) == (accepted, duplicates, actions)
            stored = await store.events(user)
            assert [(e.timestamp, e.event_id, e.action) for e in stored] == [
                (t, i, a) for t, _, i, a in state["window"]
            ]
            assert await store.actions(user, capacity) == [x[3] for x in state["window"]]
            ttl = await client.ttl(store.keys(user)[0])
            assert 0 < ttl <= 60
            await store.delete(user)
            assert await client.exists(*store.keys(user)) == 0
        finally:
            await client.aclose()

    asyncio.run(scenario())


# --- the whole API from its OpenAPI document ----------------------------------------------------------------

API_KEY = "fuzz-key-0123456789"


@pytest.fixture(scope="module")
def fuzzed_service(
    behavior_artifact: Path, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(
        tmp_path_factory.mktemp("fuzz") / "service.log",
        {
            "NEXTACT_ARTIFACT_DIR": str(behavior_artifact),
            "NEXTACT_REDIS_URL": redis_server.url,
            "NEXTACT_KEY_PREFIX": "fuzzapi",
            "NEXTACT_API_KEYS": API_KEY,
            "NEXTACT_LOG_LEVEL": "warning",
            "NEXTACT_MAX_EVENTS_PER_REQUEST": "50",
            "NEXTACT_MAX_BODY_BYTES": "65536",
        },
    ).start()
    yield svc
    svc.kill()
    assert "Traceback" not in svc.log(), svc.log()


def test_api_never_answers_500_and_errors_are_json(fuzzed_service: ServiceProcess) -> None:
    """Every operation of /openapi.json, with schema-driven valid and invalid inputs (bounded examples each)."""
    document = httpx.get(f"{fuzzed_service.base_url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(
            max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(
            case=st.one_of(
                operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
            )
        )
        def check(case: Any) -> None:
            response = case.call(
                base_url=fuzzed_service.base_url, timeout=10, headers={"Authorization": f"Bearer {API_KEY}"}
            )
            statuses[response.status_code] += 1
            where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
            if response.status_code >= 500 and response.status_code != 503:
                failures.append(where)
            elif response.status_code >= 400:
                try:
                    body = response.json()
                except ValueError:
                    failures.append(f"non-JSON error body: {where}")
                    return
                if not (
                    isinstance(body, dict)
                    and isinstance(body.get("error"), str)
                    and isinstance(body.get("message"), str)
                ):
                    failures.append(f"error body without error/message: {where}")

        check()
    assert operations >= 8
    assert statuses[200] > 0 and sum(n for code, n in statuses.items() if 400 <= code < 500) > 0, statuses
    assert not failures, "\n".join(failures[:10])


# --- hand-written hostile requests (what a generator rarely finds) --------------------------------------------


def _hostile_requests() -> list[tuple[str, str, Any, int]]:
    long_user = "u" * 10_000
    return [
        ("POST", "/v1/users/u/events", '{"action": "pv", "timestamp": NaN}', 422),
        ("POST", "/v1/users/u/events", '{"action": "pv", "timestamp": Infinity}', 422),
        ("POST", "/v1/users/u/events", '{"action": "pv", "timestamp": 1e308}', 422),
        ("POST", "/v1/users/u/events", '{"action": "pv", "timestamp": -5}', 422),
        ("POST", "/v1/users/u/events", '{"action": "pv", "timestamp": "9999-12-31T23:59:59Z"}', 422),
        ("POST", "/v1/users/u/events", '{"action": "pv", "action": "buy"}', 200),  # duplicated key: last wins
        ("POST", "/v1/users/u/events", '{"action": "a\\u0000b:{c}|\\n\\u202e"}', 200),
        ("POST", "/v1/users/u/events", '{"action": "\\ud800"}', 422),  # lone surrogate
        ("POST", "/v1/users/u/events", '{"action": "pv"', 422),  # truncated JSON
        ("POST", "/v1/users/u/events", json.dumps({"events": [{"action": "pv"}] * 51}), 413),
        ("POST", "/v1/events", json.dumps({"events": [{"user_id": "u", "action": "x" * 70_000}]}), 413),
        ("POST", "/v1/users/" + long_user + "/events", '{"action": "pv"}', 422),
        ("GET", "/v1/users/%F0%9F%99%82%E6%BC%A2/predictions?k=1000000", None, 422),
        ("GET", "/v1/users/u/predictions?k=0", None, 422),
        ("GET", "/v1/users/u/predictions?k=100000", None, 200),  # capped at the model's actions
        ("GET", "/v1/users/u/predictions?k=nan", None, 422),
    ]


@pytest.mark.parametrize(("method", "path", "body", "status"), _hostile_requests())
def test_hostile_requests(
    fuzzed_service: ServiceProcess,
    behavior_artifact: Path,
    method: str,
    path: str,
    body: str | None,
    status: int,
) -> None:
    response = httpx.request(
        method,
        fuzzed_service.base_url + path,
        content=body,
        timeout=10,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text[:500]
    if status >= 400:
        assert {"error", "message"} <= set(response.json()), response.text[:500]
    elif "predictions" in response.json():
        assert 0 < len(response.json()["predictions"]) <= read_manifest(behavior_artifact).vocab_size - 2

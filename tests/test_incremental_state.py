"""Incremental state (NEXTACT_INCREMENTAL_STATE): the step-graph export gate, the state in Redis, and the service
giving the same predictions with the option on as with it off, on real trained models and a real Redis."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch

from app.manifest import MANIFEST_FILE, PAD_ID, STEP_FILE, read_manifest
from app.model import StepRequest, load_model
from app.redis_client import connect
from app.windows import NewEvent, WindowStore
from tests.app_client import running_app
from tests.artifact_edits import copy_artifact
from tests.conftest import EXAMPLES, train_artifact
from training.checkpoint import load_checkpoint
from training.errors import ParityError
from training.step import add_history, check_step_parity, export_step, export_step_onnx

pytestmark = pytest.mark.anyio
TOL = 1e-5
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def plain_behavior(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The behaviour model without a history bias and without step.onnx (exported by the fixtures below)."""
    return train_artifact(
        tmp_path_factory.mktemp("plain-behavior"),
        EXAMPLES / "taobao_sample.csv",
        "--action-col",
        "behavior",
        "--window",
        "20",
        "--epochs",
        "2",
        "--embedding-dim",
        "16",
        "--hidden-dim",
        "32",
        "--no-history-bias",
        "--no-step",
    )


@pytest.fixture(scope="module")
def behavior_step(plain_behavior: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the behaviour model with step.onnx exported into it."""
    out = copy_artifact(plain_behavior, tmp_path_factory.mktemp("behavior-step"))
    export_step(out)
    return out


@pytest.fixture(scope="module")
def item_step(tmp_path_factory: pytest.TempPathFactory) -> Path:
    plain = train_artifact(
        tmp_path_factory.mktemp("plain-item"),
        EXAMPLES / "beauty_sample.csv",
        "--action-col",
        "item_id",
        "--window",
        "20",
        "--epochs",
        "1",
        "--embedding-dim",
        "16",
        "--hidden-dim",
        "32",
        "--no-history-bias",
        "--no-step",
    )
    out = copy_artifact(plain, tmp_path_factory.mktemp("item-step"))
    export_step(out)
    return out


def test_train_writes_a_step_graph_that_reads_the_window_for_the_history_bias(
    behavior_artifact: Path,
) -> None:
    """The default model has a history bias: `train` exports its step graph with the window as an input."""
    model, _ = load_checkpoint(behavior_artifact)
    assert model.history_bias is not None
    step = read_manifest(behavior_artifact).step
    assert step is not None and step.history == "history" and (behavior_artifact / STEP_FILE).is_file()
    assert step.parity_max_abs_diff <= TOL


def test_gate_refuses_a_step_graph_that_forgets_the_window(behavior_artifact: Path, tmp_path: Path) -> None:
    model, _ = load_checkpoint(behavior_artifact)
    assert model.history_bias is not None and float(model.history_bias.detach()) != 0.0
    with torch.no_grad():
        model.history_bias.fill_(0.0)  # the step graph ignores the window's action set; model.onnx does not
    broken = export_step_onnx(model, tmp_path / STEP_FILE)
    with pytest.raises(ParityError, match="disagree"):
        check_step_parity(behavior_artifact, broken)


def test_step_graph_adds_the_history_bias_on_the_window_not_a_vocabulary_one_hot(
    behavior_artifact: Path,
) -> None:
    """The step graph's history bias: the same numbers as the model's (B, V) one-hot, with no (B, V) one-hot."""
    import onnx

    model, _ = load_checkpoint(behavior_artifact)
    assert model.history_bias is not None
    v = model.config.vocab_size
    logits = torch.randn(3, v)  # (B, V)
    logits[:, PAD_ID] = float("-inf")
    history = torch.tensor([[2, 3, 2, 0, 0], [v - 1, v - 1, v - 1, v - 1, v - 1], [0, 0, 0, 0, 0]])  # (B, T)
    with torch.no_grad():
        want = model._add_history(logits, history, history != PAD_ID)
        got = add_history(logits, history, model.history_bias)
    assert torch.equal(got, want)  # repeated actions biased once, padding and empty windows untouched
    assert not torch.equal(got, logits)
    ops = {n.op_type for n in onnx.load(str(behavior_artifact / STEP_FILE)).graph.node}
    assert "GatherElements" in ops and "ConstantOfShape" not in ops


def test_a_step_graph_with_the_one_hot_history_bias_still_serves(
    behavior_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step graphs exported before the window-side history bias (a (B, V) one-hot) load and give the same."""
    import onnx

    import training.step

    def one_hot(logits: torch.Tensor, history: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The exporter as it was: NextActionModel._add_history's (B, V) one-hot."""
        seen = history != PAD_ID
        onehot = torch.zeros_like(logits).scatter(1, history * seen, seen.to(logits.dtype))  # (B, V)
        return logits + bias * onehot

    monkeypatch.setattr(training.step, "add_history", one_hot)
    old = export_step(copy_artifact(behavior_artifact, tmp_path / "old"))
    assert old.parity_max_abs_diff <= TOL
    assert "ConstantOfShape" in {n.op_type for n in onnx.load(str(tmp_path / "old" / STEP_FILE)).graph.node}
    then, now = (load_model(a, device="cpu", incremental=True) for a in (tmp_path / "old", behavior_artifact))
    assert then.version == now.version
    rng = np.random.default_rng(5)
    windows = [[str(a) for a in rng.choice(now.manifest.vocabulary[2:], size=n)] for n in (1, 7, 20)]
    for a, b in zip(
        then.advance([StepRequest(w, 4) for w in windows]),
        now.advance([StepRequest(w, 4) for w in windows]),
        strict=True,
    ):
        assert a[0].actions == b[0].actions and a[0].probabilities == pytest.approx(
            b[0].probabilities, abs=1e-6
        )
        assert a[1] == b[1]  # the same state bytes: old and new graphs step the same recurrence


def test_advance_on_a_mixed_batch_matches_the_full_window(behavior_artifact: Path) -> None:
    """One micro-batch with an empty window, stored states stepping 1 and 2 events, and a rebuild: each row as
    model.onnx scores its whole window, each state the one its window leaves behind."""
    model = load_model(behavior_artifact, device="cpu", incremental=True)
    rng = np.random.default_rng(3)
    windows = [[str(a) for a in rng.choice(model.manifest.vocabulary[2:], size=n)] for n in (0, 9, 12, 5)]
    (_, s1), (_, s2) = model.advance([StepRequest(windows[1][:-1], 3), StepRequest(windows[2][:-2], 3)])
    requests = [
        StepRequest(windows[0], 3),
        StepRequest(windows[1], 3, s1, 1, model.version),
        StepRequest(windows[2], 3, s2, 2, model.version),
        StepRequest(windows[3], 3, s1, 1, "another-version"),  # not this model's state: rebuilt
    ]
    got = model.advance(requests)
    want = model.predict([(w, 3) for w in windows])
    for (pred, blob), full, window in zip(got, want, windows, strict=True):
        assert (blob is None) == (not window)
        assert dict(zip(pred.actions, pred.probabilities, strict=True)) == pytest.approx(
            dict(zip(full.actions, full.probabilities, strict=True)), abs=TOL
        )
    alone = model.advance([StepRequest(windows[3], 3)])[0][1]  # a rebuild's state alone vs in the mixed batch
    assert alone is not None and np.allclose(
        np.frombuffer(alone, np.float32), np.frombuffer(got[3][1] or b"", np.float32), atol=1e-6
    )


# --- training side: export and gate -------------------------------------------------------------------------


def test_export_records_the_step_graph_and_keeps_the_version(
    plain_behavior: Path, behavior_step: Path
) -> None:
    before, after = read_manifest(plain_behavior), read_manifest(behavior_step)
    assert before.step is None  # old manifests stay valid without the field
    assert after.step is not None and (behavior_step / STEP_FILE).is_file()
    assert after.model_version == before.model_version
    assert after.step.state_shape == (after.num_layers, after.hidden_dim)
    assert after.step.parity_max_abs_diff <= TOL


def test_gate_refuses_a_step_graph_with_the_wrong_weights(behavior_step: Path, tmp_path: Path) -> None:
    model, _ = load_checkpoint(behavior_step)
    with torch.no_grad():  # swap the input and forget gates' recurrent weights: a plausible export bug
        w: torch.Tensor = model.rnn.weight_hh_l0  # type: ignore[assignment]
        h = model.config.hidden_dim
        w[: 2 * h] = torch.cat([w[h : 2 * h], w[:h]]).clone()
    broken = export_step_onnx(model, tmp_path / STEP_FILE)
    with pytest.raises(ParityError, match=r"step graph and model.onnx disagree after \d+ events"):
        check_step_parity(behavior_step, broken)


def test_service_refuses_a_step_graph_that_does_not_match_the_manifest(
    behavior_step: Path, tmp_path: Path
) -> None:
    live = copy_artifact(behavior_step, tmp_path / "live")
    data = bytearray((live / STEP_FILE).read_bytes())
    data[-1] ^= 1
    (live / STEP_FILE).write_bytes(bytes(data))
    with pytest.raises(Exception, match="does not match the manifest's step.sha256"):
        load_model(live, device="cpu", incremental=True)
    assert load_model(live, device="cpu").step is None  # option off: step.onnx is never read


# --- the state in Redis ---------------------------------------------------------------------------------------


def _events(actions: Sequence[str], start: float, tag: str = "e") -> list[NewEvent]:
    return [NewEvent(f"{tag}{start + i}", a, start + i) for i, a in enumerate(actions)]


async def test_stored_state_is_offered_only_when_it_covers_the_window(redis_url: str) -> None:
    conn = connect(redis_url, 4, 1.0, 0)
    store = WindowStore(conn.client, "t", 3600, conn.address)
    await store.load_script()
    try:
        got = await store.append_with_state("u", _events(["a", "b"], 10), 5, "v1")
        assert got.state is None and got.seq == 2 and got.result.actions == ["a", "b"]
        assert await store.save_state("u", got.seq, "v1", b"S2")
        got = await store.append_with_state("u", _events(["c"], 12), 5, "v1")
        assert got.state == b"S2" and got.result.accepted == 1  # in order, state covers the window before
        assert not await store.save_state("u", got.seq - 1, "v1", b"stale")  # compare-and-set on the counter
        assert await store.save_state("u", got.seq, "v1", b"S3")
        assert (
            await store.append_with_state("u", _events(["d"], 13), 5, "v2")
        ).state is None  # other version
        assert (
            await store.append_with_state("u", _events(["e"], 14), 5, "v1")
        ).state is None  # state is behind
        assert await store.save_state("u", 5, "v1", b"S5")
        late = await store.append_with_state("u", _events(["z"], 11.5, "late"), 5, "v1")
        assert late.state is None and late.result.actions == ["b", "z", "c", "d", "e"]  # late: rebuild
        assert await store.save_state("u", late.seq, "v1", b"S6")
        dup = await store.append_with_state("u", _events(["e"], 14), 5, "v1")
        assert dup.state is None and dup.result.accepted == 0  # nothing new to step over
        assert (
            await store.append_with_state("u", _events(["f"], 14, "f"), 5, "v1")
        ).state == b"S6"  # tie: in order
        ttl = conn.client
        assert 0 < await ttl.ttl(store.state_key("u")) <= 3600
        await store.delete("u")
        assert not await ttl.exists(*store.keys("u"), store.state_key("u"))
    finally:
        await conn.close()


# --- the service: on == off ---------------------------------------------------------------------------------


async def _post(client: httpx.AsyncClient, user: str, events: list[dict[str, Any]], k: int) -> dict[str, Any]:
    r = await client.post(f"/v1/users/{user}/events", params={"k": k}, json={"events": events})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _probs(body: dict[str, Any]) -> dict[str, float]:
    return {p["action"]: p["probability"] for p in body["predictions"]}


def _assert_same(on: dict[str, Any], off: dict[str, Any], tol: float = TOL) -> None:
    assert on["model_version"] == off["model_version"] and on["window_size"] == off["window_size"]
    assert on["unknown_actions"] == off["unknown_actions"]
    p_on, p_off = _probs(on), _probs(off)
    common = p_on.keys() & p_off.keys()
    assert len(common) >= len(p_on) - 2  # near-ties at the cut-off may swap
    assert max(abs(p_on[a] - p_off[a]) for a in common) <= tol


def _stream(vocab: list[str], n: int, seed: int, start: float = T0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    actions = rng.choice(vocab[2:], size=n)
    return [
        {"action": str(a), "timestamp": start + i, "event_id": f"s{seed}-{i}"} for i, a in enumerate(actions)
    ]


async def _twins(
    artifact: Path, redis_url: str, events: list[list[dict[str, Any]]], k: int = 20
) -> list[tuple[Any, Any]]:
    """Post the same requests to a service with incremental state and one without (separate key prefixes)."""
    out = []
    async with (
        running_app(artifact, redis_url, incremental_state=True, key_prefix="on") as (_, on),
        running_app(artifact, redis_url, incremental_state=False, key_prefix="off") as (_, off),
    ):
        for batch in events:
            out.append((await _post(on, "u1", batch, k), await _post(off, "u1", batch, k)))
    return out


async def test_in_order_stream_matches_the_full_window(behavior_step: Path, redis_url: str) -> None:
    m = read_manifest(behavior_step)
    stream = _stream(m.vocabulary, m.window - 3, seed=1)
    batches = [[e] for e in stream[:-4]] + [stream[-4:-1], [stream[-1]]]  # single events, then a batch of 3
    for on, off in await _twins(behavior_step, redis_url, batches):
        _assert_same(on, off)
    async with running_app(behavior_step, redis_url, incremental_state=True, key_prefix="on") as (_, on):
        more = _stream(m.vocabulary, 3, seed=13, start=T0 + 1000)
        for e in more:
            await _post(on, "u1", [e], 5)  # the stored state carries on in a new process
        await _post(on, "u1", [{**more[0], "event_id": "late", "timestamp": T0 + 999}], 5)
        text = (await on.get("/metrics")).text
    assert 'nextact_incremental_appends_total{path="step"} 3.0' in text
    assert 'nextact_incremental_appends_total{path="rebuild"} 1.0' in text
    state: dict[bytes, bytes] = redis.Redis.from_url(redis_url).hgetall("on:{u1}:s")  # type: ignore[assignment]
    assert state[b"v"] == m.model_version.encode() and int(state[b"n"]) == len(stream) + 4
    assert len(state[b"x"]) == 2 * m.num_layers * m.hidden_dim * 4  # h and c, float32


async def test_the_stored_state_is_what_the_next_event_steps_from(
    behavior_step: Path, redis_url: str
) -> None:
    """Overwrite a user's state with the zero state: the next prediction is then the model's after that one event
    alone, which shows the service steps from the stored state instead of re-reading the window."""
    m = read_manifest(behavior_step)
    stream = _stream(m.vocabulary, 6, seed=12)
    client = redis.Redis.from_url(redis_url)
    async with running_app(behavior_step, redis_url, incremental_state=True, key_prefix="on") as (app, on):
        for e in stream[:-1]:
            await _post(on, "u", [e], 10)
        await app.state.services.state_saver.settle("u")  # the last save is behind the answer: let it land
        assert int(client.hget("on:{u}:s", "n") or 0) == len(stream) - 1
        client.hset("on:{u}:s", "x", bytes(2 * m.num_layers * m.hidden_dim * 4))
        body = await _post(on, "u", [stream[-1]], len(m.vocabulary) - 2)
    one = load_model(behavior_step, device="cpu").probabilities(
        [np.array([m.vocabulary.index(stream[-1]["action"])], dtype=np.int64)]
    )[0]
    assert body["window_size"] == len(stream)
    for action, p in _probs(body).items():
        assert abs(p - one[m.vocabulary.index(action)]) <= TOL


async def test_item_model_stream_and_bulk_ingestion(item_step: Path, redis_url: str) -> None:
    m = read_manifest(item_step)
    stream = _stream(m.vocabulary, 12, seed=2) + [{"action": "never-seen", "timestamp": T0 + 12}]
    for on, off in await _twins(item_step, redis_url, [[e] for e in stream], k=50):
        _assert_same(on, off)
    bulk = {"events": [{"user_id": u, **e} for u in ("b1", "b2") for e in _stream(m.vocabulary, 3, seed=3)]}
    async with (
        running_app(item_step, redis_url, incremental_state=True, key_prefix="on2") as (_, on),
        running_app(item_step, redis_url, incremental_state=False, key_prefix="off2") as (_, off),
    ):
        for _ in range(2):  # the second time: duplicates only
            a = (await on.post("/v1/events", params={"predict": "true"}, json=bulk)).json()
            b = (await off.post("/v1/events", params={"predict": "true"}, json=bulk)).json()
            assert a["accepted"] == b["accepted"]
            for p, q in zip(a["predictions"], b["predictions"], strict=True):
                _assert_same(p, q)


async def test_late_events_rebuild_the_state(behavior_step: Path, redis_url: str) -> None:
    m = read_manifest(behavior_step)
    stream = _stream(m.vocabulary, 8, seed=4)
    late = {"action": m.vocabulary[3], "timestamp": T0 + 2.5, "event_id": "late"}
    batches = (
        [[e] for e in stream] + [[late]] + [[e] for e in _stream(m.vocabulary, 3, seed=5, start=T0 + 100)]
    )
    for on, off in await _twins(behavior_step, redis_url, batches):
        _assert_same(on, off)


async def test_after_trimming_the_state_carries_the_whole_history(
    behavior_step: Path, redis_url: str
) -> None:
    """Documented semantics: once the window trims, the carried state has seen every event since it was
    (re)built, so its prediction is the model's over that whole history, not over the window alone."""
    m = read_manifest(behavior_step)
    stream = _stream(m.vocabulary, m.window + 15, seed=6)
    results = await _twins(behavior_step, redis_url, [[e] for e in stream], k=len(m.vocabulary) - 2)
    model = load_model(behavior_step, device="cpu")
    for n, (on, off) in enumerate(results, start=1):
        ids = np.array([m.vocabulary.index(e["action"]) for e in stream[:n]], dtype=np.int64)
        whole = model.probabilities([ids])[0]  # (V,) the full graph over every event so far
        for action, p in _probs(on).items():
            assert abs(p - whole[m.vocabulary.index(action)]) <= TOL
        assert off["window_size"] == on["window_size"] == min(n, m.window)
        if n <= m.window:
            _assert_same(on, off)


async def test_reload_to_another_model_rebuilds_the_state(
    behavior_step: Path, item_step: Path, redis_url: str, tmp_path: Path
) -> None:
    live = copy_artifact(behavior_step, tmp_path / "live")
    b, i = read_manifest(behavior_step), read_manifest(item_step)
    assert (b.num_layers, b.hidden_dim) == (
        i.num_layers,
        i.hidden_dim,
    )  # an old state would fit: must not be used
    first = _stream(b.vocabulary, 6, seed=7)
    then = _stream(i.vocabulary, 4, seed=8, start=T0 + 100)
    async with (
        running_app(live, redis_url, incremental_state=True, key_prefix="on") as (_, on),
        running_app(item_step, redis_url, incremental_state=False, key_prefix="off") as (_, off),
    ):
        for e in first:
            await _post(on, "u", [e], 10)
            await _post(off, "u", [e], 10)
        for name in (MANIFEST_FILE, "model.onnx", STEP_FILE, "checkpoint.pt"):
            (live / name).write_bytes((item_step / name).read_bytes())
        assert (await on.post("/v1/model/reload")).json()["model_version"] == i.model_version
        for e in then:
            _assert_same(await _post(on, "u", [e], 10), await _post(off, "u", [e], 10))
    assert redis.Redis.from_url(redis_url).hget("on:{u}:s", "v") == i.model_version.encode()


async def test_delete_erases_the_state(behavior_step: Path, redis_url: str) -> None:
    m = read_manifest(behavior_step)
    before, after = _stream(m.vocabulary, 5, seed=9), _stream(m.vocabulary, 3, seed=10, start=T0 + 50)
    client = redis.Redis.from_url(redis_url)
    async with (
        running_app(behavior_step, redis_url, incremental_state=True, key_prefix="on") as (_, on),
        running_app(behavior_step, redis_url, incremental_state=False, key_prefix="off") as (_, off),
    ):
        for e in before:
            await _post(on, "u", [e], 10)
            await _post(off, "u", [e], 10)
        assert client.exists("on:{u}:s")
        for c in (on, off):
            assert (await c.delete("/v1/users/u")).status_code == 204
        assert not client.exists("on:{u}:w", "on:{u}:i", "on:{u}:s")
        for e in after:
            _assert_same(await _post(on, "u", [e], 10), await _post(off, "u", [e], 10))


async def test_history_bias_model_stream_matches_the_full_window(
    behavior_artifact: Path, redis_url: str
) -> None:
    """The default (history-bias) model: stepping with the window as the history input == recomputing it."""
    m = read_manifest(behavior_artifact)
    stream = _stream(m.vocabulary, m.window - 4, seed=21)
    batches = [[e] for e in stream[:-3]] + [stream[-3:]]
    for on, off in await _twins(behavior_artifact, redis_url, batches):
        _assert_same(on, off)
    state = redis.Redis.from_url(redis_url).hget("on:{u1}:s", "n")
    assert state is not None and int(state) == len(stream)


async def test_option_on_without_a_step_graph_serves_the_full_window(
    plain_behavior: Path, redis_url: str
) -> None:
    assert read_manifest(plain_behavior).step is None
    events = _stream(read_manifest(plain_behavior).vocabulary, 4, seed=11)
    for on, off in await _twins(plain_behavior, redis_url, [[e] for e in events]):
        _assert_same(on, off)
    assert not redis.Redis.from_url(redis_url).hexists(
        "on:{u1}:s", "x"
    )  # only live quality's fields, no state


def test_manifest_json_without_step_still_loads(behavior_step: Path, tmp_path: Path) -> None:
    live = copy_artifact(behavior_step, tmp_path / "old")
    raw = json.loads((live / MANIFEST_FILE).read_text())
    raw.pop("step")
    (live / MANIFEST_FILE).write_text(json.dumps(raw))
    assert read_manifest(live).step is None

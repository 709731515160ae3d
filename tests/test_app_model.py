"""The serving model: encoding, padding, batching invariance, top-k, provider choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.candidate import Models
from app.model import ServingModel, _top_k, load_model


@pytest.fixture(scope="module")
def item_model(item_artifact: Path) -> ServingModel:
    return load_model(item_artifact, device="cpu")


def test_a_batch_gives_each_window_what_it_gets_alone(item_model: ServingModel) -> None:
    vocab = item_model.manifest.vocabulary
    window = item_model.manifest.window
    rng = np.random.default_rng(0)
    windows = [
        [],
        [vocab[2]],
        list(rng.choice(vocab[2:], size=window)),
        list(rng.choice(vocab[2:], size=3)),
        ["never-seen", vocab[5]],
    ]
    k = item_model.vocab_size
    together = item_model.predict([(w, k) for w in windows])
    for w, batched in zip(windows, together, strict=True):
        (alone,) = item_model.predict([(w, k)])
        assert alone.actions == batched.actions
        np.testing.assert_allclose(alone.probabilities, batched.probabilities, atol=1e-6)


def test_only_the_last_window_events_count(item_model: ServingModel) -> None:
    vocab = item_model.manifest.vocabulary
    window = item_model.manifest.window
    recent = [vocab[2 + i % 7] for i in range(window)]
    long = [vocab[20]] * 15 + recent
    (a,), (b,) = item_model.predict([(long, 50)]), item_model.predict([(recent, 50)])
    assert a == b


def test_unknown_and_special_strings_are_unknown(item_model: ServingModel) -> None:
    vocab = item_model.manifest.vocabulary
    ids, unknown = item_model.encode([vocab[3], "<pad>", "<unk>", "nope", vocab[4]])
    assert ids.tolist() == [3, 1, 1, 1, 4] and unknown == 3


def test_top_k_is_sorted_capped_and_never_special(item_model: ServingModel) -> None:
    vocab = item_model.manifest.vocabulary
    (full,) = item_model.predict([([vocab[7], vocab[9]], 10**6)])
    assert len(full.actions) == len(vocab) - 2
    assert "<pad>" not in full.actions and "<unk>" not in full.actions
    assert full.probabilities == sorted(full.probabilities, reverse=True)
    assert abs(sum(full.probabilities) - 1) < 1e-4
    (top,) = item_model.predict([([vocab[7], vocab[9]], 10)])
    assert top.actions == full.actions[:10]  # argpartition picks the same as a full sort
    row = np.array([0, 0, 0.25, 0.25, 0.5, 0.0], dtype=np.float32)  # ties broken by id
    assert item_model.top_k(row.copy(), 3) == ([vocab[4], vocab[2], vocab[3]], [0.5, 0.25, 0.25])


def test_top_k_of_a_large_batch_is_each_rows_own_top_k() -> None:
    """Batches above the rows-per-pass bound are taken in slices: every row still gets its exact top k."""
    rng = np.random.default_rng(1)
    probs = rng.random((70, 300)).astype(np.float32)  # (B, V): more rows than one pass takes
    probs[:, 40:45] = probs[:, 200:205] = 0.999  # ties across columns, broken by the smaller column
    probs[69] = 0.5  # a row that is all ties
    cols, values = _top_k(probs.copy(), 12)
    for row, got_cols, got_values in zip(probs, cols, values, strict=True):
        want = np.lexsort((np.arange(len(row)), -row))[:12]  # value descending, then column
        assert got_cols.tolist() == want.tolist() and got_values.tolist() == row[want].tolist()


def test_the_cpu_device_and_the_holder(behavior_artifact: Path, item_model: ServingModel) -> None:
    small = load_model(behavior_artifact, device="cpu", intra_op_threads=1)
    assert small.provider == "CPUExecutionProvider" and small.providers == ["CPUExecutionProvider"]
    holder = Models(small)
    holder.install(item_model)
    assert holder.current is item_model

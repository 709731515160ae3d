"""training.dataset and training.device: windows and evaluation inputs cut from the flat ids equal the
list-based ones, batches come the same through a DataLoader, and one seed on one device gives one model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.batching import grouped_batches, length_grouped
from training.config import DataOptions, ModelConfig, TrainConfig
from training.dataset import WindowIndex, epoch_batches, history_arrays
from training.device import amp_dtype, resolve_device
from training.errors import TrainingError
from training.pipeline import prepare
from training.splits import Split
from training.train import fit
from training.windows import history_batch, training_batches, training_windows

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def split() -> Split:
    return prepare(DataOptions(path=EXAMPLES / "taobao_sample.csv", action_cols=("item_id",)))[1]


@pytest.mark.parametrize("window", [1, 7, 50])
def test_windows_and_batches_equal_the_list_based_ones(split: Split, window: int) -> None:
    chunks = training_windows(split.train_sequences(), window)
    index = WindowIndex.from_split(split, window)
    assert len(index) == len(chunks) and index.targets == sum(len(c) - 1 for c in chunks)
    for i, chunk in enumerate(chunks):
        assert split.ids[index.starts[i] : index.starts[i] + index.lengths[i]].tolist() == chunk.tolist()
    before = list(training_batches(chunks, 16, np.random.default_rng(4)))
    order = index.batch_order(16, np.random.default_rng(4))
    after = [index.batch(rows) for rows in order]
    assert len(before) == len(after)
    for (x0, y0), (x1, y1) in zip(before, after, strict=True):
        assert np.array_equal(x0, x1) and np.array_equal(y0, y1)
    loaded = list(epoch_batches(index, order[:5], workers=1))  # a DataLoader worker process
    assert all(torch.equal(x, torch.from_numpy(a[0])) for (x, _), a in zip(loaded, after, strict=False))


def test_windows_of_some_users_only(split: Split) -> None:
    mine = np.arange(len(split.sequences)) % 2 == 1
    index = WindowIndex.from_split(split, 10, mine)
    assert len(index) and set(index.users.tolist()) <= set(np.flatnonzero(mine).tolist())


def test_history_arrays_equal_history_batch(split: Split) -> None:
    for part in ("validation", "test"):
        cases = split.cases(part)  # type: ignore[arg-type]
        histories = [split.history(u, p) for u, p in zip(cases.users, cases.positions, strict=True)]
        for window in (1, 5, 50):
            ids, lengths = history_batch(histories, window)
            ids2, lengths2 = history_arrays(split, cases.users, cases.positions, window)
            assert np.array_equal(ids, ids2) and np.array_equal(lengths, lengths2)


def test_same_seed_same_device_same_model(split: Split) -> None:
    model_config = ModelConfig(vocab_size=int(split.ids.max()) + 1, embedding_dim=8, hidden_dim=8, window=10)
    config = TrainConfig(epochs=2, quiet=True, seed=11, batch_size=32, device="cpu", threads=1)
    a, b = fit(split, model_config, config), fit(split, model_config, config)
    assert all(
        torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values())
    )
    assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs]
    other = fit(split, model_config, TrainConfig(epochs=2, quiet=True, seed=12, batch_size=32, device="cpu"))
    assert not torch.equal(other.model.head.weight, a.model.head.weight)
    assert next(a.model.parameters()).device.type == "cpu"


def test_device_choice_and_mixed_precision() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert amp_dtype(torch.device("cpu"), "auto") is None  # never on the CPU
    with pytest.raises(TrainingError, match="expected auto, cuda or cpu"):
        resolve_device("tpu")
    with pytest.raises(TrainingError, match="expected auto, bf16, fp16 or off"):
        amp_dtype(torch.device("cpu"), "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no CUDA device is available"):
            resolve_device("cuda")
    else:
        assert amp_dtype(torch.device("cuda"), "off") is None
        assert amp_dtype(torch.device("cuda"), "fp16") == torch.float16


def test_length_grouped_order_on_the_index_equals_the_list_based_grouped_batches(split: Split) -> None:
    chunks = training_windows(split.train_sequences(), 10)
    index = WindowIndex.from_split(split, 10)
    before = list(grouped_batches(chunks, 16, np.random.default_rng(3)))
    after = [index.batch(rows) for rows in length_grouped(index.lengths, 16, np.random.default_rng(3))]
    assert len(before) == len(after) > 1
    for (x0, y0), (x1, y1) in zip(before, after, strict=True):
        assert np.array_equal(x0, x1) and np.array_equal(y0, y1)

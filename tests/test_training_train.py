"""training.train: the loop learns, stops early, keeps the best epoch, and refits on a fixed schedule."""

from __future__ import annotations

import numpy as np

from training.config import ModelConfig, TrainConfig
from training.events import EventLog
from training.splits import Split, leave_one_out
from training.train import auto_batch_size, fit, refit


def _cyclic_split(users: int = 40) -> Split:
    """Every user walks the cycle 2 -> 3 -> ... -> 9 -> 2 from a random start: perfectly predictable."""
    rng = np.random.default_rng(0)
    starts, lengths = rng.integers(8, size=users), rng.integers(5, 12, size=users)
    seqs = [[2 + (int(a) + i) % 8 for i in range(int(n))] for a, n in zip(starts, lengths, strict=True)]
    log = EventLog.from_sequences([[str(a) for a in s] for s in seqs])
    return Split(leave_one_out(log), [np.array(s, dtype=np.int64) for s in seqs])


def test_fit_learns_a_cycle_keeps_the_best_epoch_and_refits_on_its_schedule() -> None:
    split = _cyclic_split()
    model_config = ModelConfig(vocab_size=10, embedding_dim=8, hidden_dim=16, dropout=0.0, window=10)
    config = TrainConfig(epochs=8, lr=0.03, patience=2, lr_decay=0.5, quiet=True, seed=3)
    result = fit(split, model_config, config)
    assert 1 <= result.best_epoch <= len(result.epochs) <= 8
    assert max(e.val_hr10 for e in result.epochs) == 1.0  # 8 actions: always in the top 10
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss
    best = result.epochs[result.best_epoch - 1]
    assert best.val_ndcg10 == max(e.val_ndcg10 for e in result.epochs)
    assert best.val_ndcg10 > 0.9  # the cycle is learned
    assert all(b.lr <= a.lr for a, b in zip(result.epochs, result.epochs[1:], strict=False))

    merged = split.with_validation_as_training()
    assert len(merged.cases("validation")) == 0
    assert np.array_equal(merged.cases("test").targets, split.cases("test").targets)
    assert sum(map(len, merged.train_sequences())) == sum(map(len, split.train_sequences())) + len(
        split.cases("validation")
    )
    again = refit(merged, model_config, config, result)
    assert [e.lr for e in again.epochs] == [e.lr for e in result.epochs[: result.best_epoch]]
    assert again.best_epoch == len(again.epochs)


def test_auto_batch_size_keeps_20_steps_on_small_logs() -> None:
    assert auto_batch_size(100_000) == 64
    assert auto_batch_size(400) == 20
    assert auto_batch_size(10) == 8

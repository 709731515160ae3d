"""Train / validation / test splits of per-user sequences, by leaving the last events out or by a time cut.

Every user's events are in time order, so both splits cut each user's sequence into three consecutive parts:
[0, train_end) train, [train_end, val_end) validation targets, [val_end, n) test targets. An evaluation case
is (user, position): its target is the event at `position` and its inputs are only the events before it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal

import numpy as np

from training.config import DataOptions
from training.errors import DataError
from training.events import EventLog

Part = Literal["validation", "test"]


@dataclass(frozen=True)
class Boundaries:
    """Per user: where training ends and where validation ends (test runs to the end)."""

    name: str
    train_end: np.ndarray  # (U,) int
    val_end: np.ndarray  # (U,) int
    lengths: np.ndarray  # (U,) int


@dataclass(frozen=True)
class EvalCases:
    """Prediction cases: predict sequences[user][position] from sequences[user][:position]."""

    users: np.ndarray  # (N,) int
    positions: np.ndarray  # (N,) int
    targets: np.ndarray  # (N,) int, action ids

    def __len__(self) -> int:
        return len(self.targets)


def leave_one_out(log: EventLog) -> Boundaries:
    """Last event test, second-to-last validation, the rest train; users with < 3 events are train-only."""
    n = np.array([len(a) for a in log.actions], dtype=np.int64)
    evaluable = n >= 3
    train_end = np.where(evaluable, n - 2, n)
    val_end = np.where(evaluable, n - 1, n)
    return Boundaries("leave-one-out", train_end, val_end, n)


def time_cut(log: EventLog, val_fraction: float, test_fraction: float) -> Boundaries:
    """A global cut: the latest `test_fraction` of events are test targets, the `val_fraction` before them
    validation targets; training uses only events strictly before the validation cut-off time."""
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"time split fractions must be in (0, 1) and sum below 1, got "
            f"validation {val_fraction}, test {test_fraction}"
        )
    all_times = np.sort(np.concatenate([np.asarray(t, dtype=np.float64) for t in log.times]))
    total = len(all_times)
    t_val = all_times[min(total - 1, int(total * (1 - val_fraction - test_fraction)))]
    t_test = all_times[min(total - 1, int(total * (1 - test_fraction)))]
    # events at exactly a cut-off time go to the later part, so nothing simultaneous with a target is trained on
    train_end = np.array([bisect.bisect_left(t, t_val) for t in log.times], dtype=np.int64)
    val_end = np.array([bisect.bisect_left(t, t_test) for t in log.times], dtype=np.int64)
    if train_end.sum() == 0:
        raise DataError(
            f"{log.path}: the time split leaves no training events (all events at or after "
            f"the validation cut-off {t_val}); too few distinct times?"
        )
    n = np.array([len(a) for a in log.actions], dtype=np.int64)
    return Boundaries("time", train_end, val_end, n)


def make_boundaries(log: EventLog, options: DataOptions) -> Boundaries:
    """The split named in `options`."""
    if options.split == "leave-one-out":
        return leave_one_out(log)
    if options.split == "time":
        return time_cut(log, options.val_fraction, options.test_fraction)
    raise DataError(f"unknown split {options.split!r} (leave-one-out or time)")


@dataclass(frozen=True)
class Split:
    """Encoded sequences and their boundaries."""

    boundaries: Boundaries
    sequences: list[np.ndarray]  # per user: all events as action ids

    @property
    def name(self) -> str:
        return self.boundaries.name

    def train_sequences(self) -> list[np.ndarray]:
        """Per user, the training events (a prefix of the user's sequence); users without any are skipped."""
        ends = self.boundaries.train_end
        return [s[:e] for s, e in zip(self.sequences, ends, strict=True) if e > 0]

    def cases(self, part: Part) -> EvalCases:
        """Every validation or test target, with its user and position."""
        b = self.boundaries
        lo, hi = (b.train_end, b.val_end) if part == "validation" else (b.val_end, b.lengths)
        counts = hi - lo
        users = np.repeat(np.arange(len(counts)), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        positions = np.repeat(lo, counts) + offsets
        targets = np.array(
            [self.sequences[u][p] for u, p in zip(users, positions, strict=True)], dtype=np.int64
        )
        return EvalCases(users.astype(np.int64), positions.astype(np.int64), targets)

    def with_validation_as_training(self) -> Split:
        """The same split with the validation events moved into training (no validation cases left): what
        the final model and the baselines are fitted on before they are tested."""
        b = self.boundaries
        return Split(Boundaries(b.name, b.val_end.copy(), b.val_end.copy(), b.lengths), self.sequences)

    def history(self, user: int, position: int) -> np.ndarray:
        """The inputs of case (user, position): the user's events before it."""
        return self.sequences[user][:position]

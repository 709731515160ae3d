"""Train / validation / test splits of per-user sequences, by leaving the last events out or by a time cut.

Every user's events are in time order, so both splits cut each user's sequence into three consecutive parts:
[0, train_end) train, [train_end, val_end) validation targets, [val_end, n) test targets. An evaluation case
is (user, position): its target is the event at `position` and its inputs are only the events before it.
Sequences are one flat id array with per-user offsets (see training.arrays.Sequences).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from training.arrays import Sequences
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

    def subset(self, keep: np.ndarray) -> EvalCases:
        """The cases where `keep` (N,) bool is true, in the same order."""
        return EvalCases(self.users[keep], self.positions[keep], self.targets[keep])


def leave_one_out(log: EventLog) -> Boundaries:
    """Last event test, second-to-last validation, the rest train; users with < 3 events are train-only."""
    n = log.lengths.astype(np.int64)
    evaluable = n >= 3
    train_end = np.where(evaluable, n - 2, n)
    val_end = np.where(evaluable, n - 1, n)
    return Boundaries("leave-one-out", train_end, val_end, n)


def _count_before(times: np.ndarray, offsets: np.ndarray, cut: float) -> np.ndarray:
    """(U,) per user, how many of its (sorted) times are < cut: bisect_left in every user at once."""
    below = np.concatenate([[0], np.cumsum(times < cut, dtype=np.int64)])
    return below[offsets[1:]] - below[offsets[:-1]]


def time_cut(log: EventLog, val_fraction: float, test_fraction: float) -> Boundaries:
    """A global cut: the latest `test_fraction` of events are test targets, the `val_fraction` before them
    validation targets; training uses only events strictly before the validation cut-off time."""
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"time split fractions must be in (0, 1) and sum below 1, got "
            f"validation {val_fraction}, test {test_fraction}"
        )
    total = len(log.times)
    k_val = min(total - 1, int(total * (1 - val_fraction - test_fraction)))
    k_test = min(total - 1, int(total * (1 - test_fraction)))
    cut = np.partition(log.times, [k_val, k_test])  # the same order statistics as a full sort, in O(E)
    t_val, t_test = cut[k_val], cut[k_test]
    # events at exactly a cut-off time go to the later part, so nothing simultaneous with a target is trained on
    train_end = _count_before(log.times, log.offsets, t_val)
    val_end = _count_before(log.times, log.offsets, t_test)
    if train_end.sum() == 0:
        raise DataError(
            f"{log.path}: the time split leaves no training events (all events at or after "
            f"the validation cut-off {t_val}); too few distinct times?"
        )
    return Boundaries("time", train_end, val_end, log.lengths.astype(np.int64))


def make_boundaries(log: EventLog, options: DataOptions) -> Boundaries:
    """The split named in `options`."""
    if options.split == "leave-one-out":
        return leave_one_out(log)
    if options.split == "time":
        return time_cut(log, options.val_fraction, options.test_fraction)
    raise DataError(f"unknown split {options.split!r} (leave-one-out or time)")


class Split:
    """Encoded sequences (one flat id array with per-user offsets) and their boundaries."""

    def __init__(self, boundaries: Boundaries, sequences: Sequence[np.ndarray] | Sequences) -> None:
        self.boundaries = boundaries
        self.sequences = Sequences.of(sequences)  # sequences[u]: user u's ids (a view)

    @property
    def name(self) -> str:
        return self.boundaries.name

    @property
    def ids(self) -> np.ndarray:
        """(E,) int64 action ids, user by user."""
        return self.sequences.ids

    @property
    def offsets(self) -> np.ndarray:
        """(U + 1,) int64: user u's events are ids[offsets[u]:offsets[u + 1]]."""
        return self.sequences.offsets

    def train_sequences(self) -> list[np.ndarray]:
        """Per user, the training events (a prefix of the user's sequence); users without any are skipped."""
        ends, starts = self.boundaries.train_end, self.offsets[:-1]
        return [self.ids[s : s + e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True) if e > 0]

    def cases(self, part: Part) -> EvalCases:
        """Every validation or test target, with its user and position."""
        b = self.boundaries
        lo, hi = (b.train_end, b.val_end) if part == "validation" else (b.val_end, b.lengths)
        counts = hi - lo
        users = np.repeat(np.arange(len(counts)), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        positions = np.repeat(lo, counts) + offsets
        targets = self.ids[self.offsets[users] + positions] if len(users) else np.zeros(0, np.int64)
        return EvalCases(users.astype(np.int64), positions.astype(np.int64), targets.astype(np.int64))

    def with_validation_as_training(self) -> Split:
        """The same split with the validation events moved into training (no validation cases left): what
        the final model and the baselines are fitted on before they are tested."""
        b = self.boundaries
        return Split(Boundaries(b.name, b.val_end.copy(), b.val_end.copy(), b.lengths), self.sequences)

    def history(self, user: int, position: int) -> np.ndarray:
        """The inputs of case (user, position): the user's events before it."""
        start = int(self.offsets[user])
        return self.ids[start : start + position]

"""Training windows and evaluation inputs cut from the flat id array on the fly, in bounded memory.

A window is two numbers (where it starts in the flat ids, how many events it has); a batch is built with
numpy when it is needed. The windows and their order are those of `windows.training_windows` and
`windows.training_batches`, so a run gives the same model as the list-based path did.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from app.manifest import PAD_ID
from training.arrays import gather_rows
from training.splits import Split

_POOL_BATCHES = 50  # windows are sorted by length within pools of this many batches (less padding)


@dataclass(frozen=True)
class WindowIndex:
    """Every training window: window i is ids[starts[i] : starts[i] + lengths[i]] (inputs + 1 target)."""

    ids: np.ndarray  # (E,) int64, the split's flat ids
    starts: np.ndarray  # (W,) int64
    lengths: np.ndarray  # (W,) int64, 2 .. window + 1
    users: np.ndarray  # (W,) int64, whose events

    @classmethod
    def from_split(cls, split: Split, window: int, users: np.ndarray | None = None) -> WindowIndex:
        """Each user's training events cut into windows of at most window + 1 events from the end backwards
        (a window's first event is the previous window's last target), users in order; `users` (bool (U,))
        keeps only some users (a distributed rank's share)."""
        n = split.boundaries.train_end.astype(np.int64)  # (U,) training events per user
        if users is not None:
            n = np.where(users, n, 0)
        count = np.where(n >= 2, -(-(n - 1) // window), 0)  # (U,) windows per user: ceil((n - 1) / window)
        owner = np.repeat(np.arange(len(n)), count)  # (W,)
        k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)  # (W,) 0 = the last window
        end = n[owner] - k * window  # (W,) exclusive end inside the user's sequence
        start = np.maximum(0, end - window - 1)
        return cls(split.ids, split.offsets[owner] + start, end - start, owner)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def targets(self) -> int:
        """Training targets per epoch (every window's events but its first)."""
        return int((self.lengths - 1).sum())

    def batch_order(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Shuffled batches of window indices, windows of similar length together (see training_batches)."""
        order = rng.permutation(len(self))
        pool = batch_size * _POOL_BATCHES
        batches: list[np.ndarray] = []
        for start in range(0, len(order), pool):
            part = order[start : start + pool]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
        return [batches[b] for b in rng.permutation(len(batches))]

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (B, T), targets (B, T)) int64 of windows `rows`, right-padded, T = longest - 1."""
        starts, lengths = self.starts[rows], self.lengths[rows] - 1  # (B,), (B,)
        width = int(lengths.max(initial=0))
        inputs = gather_rows(self.ids, starts, lengths, width, PAD_ID)  # (B, T)
        targets = gather_rows(self.ids, starts + 1, lengths, width, PAD_ID)  # (B, T)
        return inputs, targets


class WindowBatches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One epoch's batches as a map-style dataset (item b = batch b), for a DataLoader with workers."""

    def __init__(self, index: WindowIndex, order: list[np.ndarray]) -> None:
        self.index = index
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.index.batch(self.order[b])
        return torch.from_numpy(inputs), torch.from_numpy(targets)


def epoch_batches(
    index: WindowIndex,
    order: list[np.ndarray],
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of one epoch as CPU tensors, built in `workers` processes (0: in this one), pinned for a
    non-blocking copy to the GPU when `pin_memory`."""
    if workers <= 0 and not pin_memory:
        dataset = WindowBatches(index, order)
        for b in range(len(dataset)):
            yield dataset[b]
        return
    loader = DataLoader(
        WindowBatches(index, order),
        batch_size=None,  # items are whole batches already
        shuffle=False,
        num_workers=max(workers, 0),
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
    yield from loader


def history_arrays(
    split: Split, users: np.ndarray, positions: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """What `windows.history_batch` gives for cases (users, positions), gathered from the flat ids without a
    Python object per case: (action_ids (B, T), lengths (B,)), T = the longest kept history (at least 1)."""
    lengths = np.minimum(positions, window).astype(np.int64)  # (B,)
    starts = split.offsets[users] + positions - lengths  # (B,)
    width = max(1, int(lengths.max(initial=0)))
    return gather_rows(split.ids, starts, lengths, width, PAD_ID), lengths

"""Length-grouped training batches: windows of the same length share a batch, so padding is nearly nil.

`length_grouped` works on an array of lengths alone, so it serves any data path that can say how long each
training window is; `grouped_batches` applies it to the list-of-arrays windows of training/windows.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from training.windows import pad_right


def length_grouped(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches (each at most batch_size) of windows sorted by length, in random order.

    Windows of equal length are shuffled among themselves every call, and the batches are shuffled, so each
    epoch sees different batches in a different order; a batch spans at most two adjacent lengths' windows.
    """
    order = np.lexsort((rng.random(len(lengths)), lengths))  # by length, random among equal lengths
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def grouped_batches(
    chunks: Sequence[np.ndarray], batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs (B, T), targets (B, T)) right-padded batches of training windows, grouped by length."""
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    for batch in length_grouped(lengths, batch_size, rng):
        rows = [chunks[i] for i in batch]
        yield pad_right([r[:-1] for r in rows]), pad_right([r[1:] for r in rows])  # (B, T), (B, T)

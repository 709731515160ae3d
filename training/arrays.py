"""Flat-array building blocks of the data path: hashing values to codes, sorting groups, per-user views.

A log of E events is held as flat arrays of length E plus `offsets` of length U + 1 (user u's events are
[offsets[u], offsets[u + 1])); nothing here creates one Python object per event.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def factorize(values: pa.Array | pa.ChunkedArray | np.ndarray) -> tuple[np.ndarray, pa.Array]:
    """(codes (N,) int32, uniques): uniques in order of first appearance, nulls coded as len(uniques)."""
    arr = pa.array(values) if isinstance(values, np.ndarray) else values
    if pa.types.is_dictionary(arr.type):  # e.g. a Parquet string column stored dictionary-encoded
        arr = arr.cast(arr.type.value_type)
    uniques = pc.unique(arr).drop_null()
    codes = pc.index_in(arr, value_set=uniques).fill_null(len(uniques))
    out = codes.to_numpy() if isinstance(codes, pa.Array) else np.asarray(codes.to_numpy())
    if isinstance(uniques, pa.ChunkedArray):
        uniques = uniques.combine_chunks()
    return out.astype(np.int32, copy=False), uniques


def group_sort(groups: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Indices sorting by group, then key, then position (two stable sorts)."""
    by_key = np.argsort(keys, kind="stable")
    return by_key[np.argsort(groups[by_key], kind="stable")]


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """(U + 1,) int64 offsets from (U,) lengths."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


class Sequences(Sequence[np.ndarray]):
    """Per-user views into one flat id array: `seqs[u]` is user u's events (a view, no copy)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray) -> None:
        self.ids = ids  # (E,) int64
        self.offsets = offsets  # (U + 1,) int64

    @classmethod
    def of(cls, sequences: Sequence[np.ndarray] | Sequences) -> Sequences:
        """Flat form of a list of per-user arrays (a Sequences is returned as it is)."""
        if isinstance(sequences, Sequences):
            return sequences
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        ids = (
            np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
            if len(sequences)
            else np.zeros(0, dtype=np.int64)
        )
        return cls(ids.astype(np.int64, copy=False), offsets_of(lengths))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, user: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, user: slice) -> list[np.ndarray]: ...

    def __getitem__(self, user: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(user, slice):
            return [self[u] for u in range(*user.indices(len(self)))]
        if user < 0:
            user += len(self)
        if not 0 <= user < len(self):
            raise IndexError(user)
        return self.ids[self.offsets[user] : self.offsets[user + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        o = self.offsets
        for u in range(len(self)):
            yield self.ids[o[u] : o[u + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def gather_rows(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int, pad: int) -> np.ndarray:
    """(B, width) int64: row i is ids[starts[i] : starts[i] + lengths[i]], right-padded with `pad`."""
    steps = np.arange(width)  # (T,)
    inside = steps[None, :] < lengths[:, None]  # (B, T)
    index = np.where(inside, starts[:, None] + steps[None, :], 0)  # (B, T)
    out = ids[index] if len(ids) else np.zeros(index.shape, dtype=np.int64)
    return np.where(inside, out, pad).astype(np.int64, copy=False)

"""Request-time filters on a prediction: which actions may be returned, applied before top-k.

Filters are action strings, so they mean the same to every model (the live one and a candidate with another
vocabulary). An action a model does not know is simply never among its answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Filters:
    """What a caller asked to leave out (or keep) and whether to renormalise what is left."""

    exclude: frozenset[str] = frozenset()
    include: frozenset[str] | None = None  # None: every action; else only these
    exclude_window: bool = False
    renormalize: bool = False

    @classmethod
    def of(
        cls,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
        exclude_window: bool = False,
        renormalize: bool = False,
    ) -> Filters | None:
        """The filters a request asked for, or None when it asked for none (the fast path)."""
        ex = frozenset(exclude or ())
        inc = frozenset(include) if include is not None else None
        if not ex and inc is None and not exclude_window and not renormalize:
            return None
        return cls(ex, inc, exclude_window, renormalize)


def apply(filters: Filters, row: np.ndarray, window: Sequence[str], index: Mapping[str, int]) -> float:
    """Mask (set to -1) the columns of one (V,) probability row that `filters` rule out; in place.

    `row` has the special tokens already at -1; `index` maps action -> column for this model. Returns the
    probability mass left (the sum over the allowed columns), the denominator of renormalisation.
    """
    if filters.include is not None:
        keep = [index[a] for a in filters.include if a in index]
        allowed = np.full(row.shape, -1.0, dtype=row.dtype)  # (V,)
        allowed[keep] = row[keep]
        row[:] = allowed
    dropped = [index[a] for a in filters.exclude if a in index]
    if filters.exclude_window:
        dropped += [index[a] for a in window if a in index]
    if dropped:
        row[dropped] = -1.0
    return float(row[row >= 0].sum(dtype=np.float64))

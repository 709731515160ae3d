"""From a file to clean per-user event sequences held as flat arrays: integer user and action codes, cleaning,
de-duplication, and a sort by user and time.

The result never holds one Python object per event: every event is an int32 action code and a float64 time
in two flat arrays, grouped by user (users in order of first appearance) and sorted by time within a user
(file order breaks ties); `offsets` says where each user's events start. Python only ever sees the distinct
values of a column (to turn them into tokens the same way for every format) and the rows of an error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from training.arrays import factorize, group_sort
from training.config import DataOptions
from training.errors import DataError
from training.tables import Table, read_table

log = logging.getLogger(__name__)

#: Numeric times at or above this are shown as dates (epoch seconds); below it they are positions or offsets.
_EPOCH_DISPLAY_FROM = 1e8


@dataclass(frozen=True)
class SideColumn:
    """What `load_events` read of `--side-col` (training/side.py): per action code, its most frequent value over
    the rows with a user and an action (ties: the value first in the file)."""

    column: str
    best: np.ndarray  # (A,) int64 side code per action code (-1: no value on any of its rows)
    several: np.ndarray  # (A,) bool: the action was seen with more than one value


@dataclass(frozen=True)
class EventLog:
    """Clean events grouped by user, each user's events in time order (file order breaks ties)."""

    path: Path
    action_cols: tuple[str, ...]
    time_col: str | None  # None: the file has no time column and file order is the time order
    users: list[str]  # user ids in order of first appearance
    tokens: list[str]  # action code -> action token
    actions: np.ndarray  # (E,) int32 action codes, user by user, in time order
    times: np.ndarray  # (E,) float64 times (epoch seconds, or the row index when time_col is None)
    offsets: np.ndarray  # (U + 1,) int64: user u's events are [offsets[u], offsets[u + 1])
    rows_read: int
    dropped_missing: int
    dropped_duplicates: int
    side: SideColumn | None = None  # with options.side_col

    @classmethod
    def from_sequences(
        cls, actions: Sequence[Sequence[str]], times: Sequence[Sequence[float]] | None = None
    ) -> EventLog:
        """An in-memory log (tests, examples): per user, action tokens and (optionally) their times."""
        tokens = list(dict.fromkeys(a for seq in actions for a in seq))
        index = {t: i for i, t in enumerate(tokens)}
        lengths = np.array([len(s) for s in actions], dtype=np.int64)
        flat_times = (
            np.concatenate([np.asarray(t, dtype=np.float64) for t in times])
            if times is not None and len(times)
            else np.arange(lengths.sum(), dtype=np.float64)
        )
        return cls(
            path=Path("memory"),
            action_cols=("action",),
            time_col="timestamp" if times is not None else None,
            users=[f"u{i}" for i in range(len(actions))],
            tokens=tokens,
            actions=np.array([index[a] for s in actions for a in s], dtype=np.int32),
            times=flat_times,
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            rows_read=int(lengths.sum()),
            dropped_missing=0,
            dropped_duplicates=0,
        )

    @property
    def rows(self) -> int:
        """Events after cleaning."""
        return len(self.actions)

    @property
    def lengths(self) -> np.ndarray:
        """(U,) events per user."""
        return np.diff(self.offsets)

    def user_actions(self, user: int) -> list[str]:
        """One user's action tokens in time order (for tests and small logs)."""
        lo, hi = self.offsets[user], self.offsets[user + 1]
        return [self.tokens[c] for c in self.actions[lo:hi].tolist()]

    def user_times(self, user: int) -> list[float]:
        return self.times[self.offsets[user] : self.offsets[user + 1]].tolist()

    def distinct_actions(self) -> int:
        tokens = self.tokens
        used = np.flatnonzero(np.bincount(self.actions, minlength=len(tokens)))
        return len({tokens[c] for c in used.tolist()})

    def time_span(self) -> tuple[str | None, str | None]:
        """First and last event time, readable; (None, None) when the file has no time column."""
        if self.time_col is None or not self.rows:
            return None, None
        return format_time(float(self.times.min())), format_time(float(self.times.max()))

    def nbytes(self) -> int:
        """Bytes held per event and per user by the arrays (not the distinct tokens)."""
        return self.actions.nbytes + self.times.nbytes + self.offsets.nbytes


def format_time(t: float) -> str:
    """ISO-8601 (UTC) for epoch seconds, the plain number for small values such as positions."""
    if t >= _EPOCH_DISPLAY_FROM:
        return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")
    return str(int(t)) if float(t).is_integer() else str(t)


def parse_time(value: Any) -> float:
    """Epoch seconds from a number, a numeric string, an ISO-8601 string or a datetime.

    Raises ValueError for an unreadable value and TypeError for a value of another type (a list, a bool).
    """
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, bool):
        raise TypeError("a boolean is not a time")
    elif isinstance(value, int | float):
        t = float(value)
        if not math.isfinite(t):
            raise ValueError("not a finite number")
        return t
    elif isinstance(value, str):
        text = value.strip()
        try:
            t = float(text)
        except ValueError:
            dt = datetime.fromisoformat(text)  # raises ValueError with a clear reason
        else:
            if not math.isfinite(t):
                raise ValueError("not a finite number")
            return t
    else:
        raise TypeError(f"unsupported type {type(value).__name__}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)  # naive times are taken as UTC
    return dt.timestamp()


def token(value: Any) -> str | None:
    """One column's contribution to an action token; None when the value is missing."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))  # 12.0 from a nullable integer column is item "12"
    text = str(value).strip()
    return text or None


def _token_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Per row, the code of its token (-1: missing), and the distinct tokens. Only distinct values are
    turned into tokens in Python; two values with the same token ("a" and " a", 12 and 12.0) share a code."""
    codes, uniques = factorize(column)
    if pa.types.is_integer(uniques.type):
        texts: list[str | None] = uniques.cast(pa.string()).to_pylist()  # str(int), without a Python loop
    else:
        texts = [token(v) for v in uniques.to_pylist()]
    tokens = list(dict.fromkeys(t for t in texts if t is not None))
    index = {t: i for i, t in enumerate(tokens)}
    remap = np.array([index[t] if t is not None else -1 for t in texts] + [-1], dtype=np.int32)
    return remap[codes], tokens  # codes of nulls are -1, which reads remap's last entry


def _action_codes(data: pa.Table, cols: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Per row, the code of the action token (the columns' tokens joined with ':'; -1: any part missing)."""
    codes, tokens = _token_codes(data.column(cols[0]))
    for col in cols[1:]:
        more, more_tokens = _token_codes(data.column(col))
        missing = (codes < 0) | (more < 0)
        pair = codes.astype(np.int64) * len(more_tokens) + more
        pair[missing] = -1
        pair_codes, uniques = factorize(pa.chunked_array([pair]))
        joined = [
            f"{tokens[p // len(more_tokens)]}:{more_tokens[p % len(more_tokens)]}" if p >= 0 else None
            for p in uniques.to_pylist()
        ]
        tokens = list(dict.fromkeys(t for t in joined if t is not None))
        index = {t: i for i, t in enumerate(tokens)}
        remap = np.array([index[t] if t is not None else -1 for t in joined] + [-1], dtype=np.int32)
        codes = remap[pair_codes]
    return codes, tokens


def _bad_time(table: Table, time_col: str, i: int, value: Any, reason: str) -> DataError:
    return DataError(
        f"{table.where(i)}: column {time_col!r}: cannot read {value!r} as a time "
        f"(epoch seconds or ISO-8601): {reason}"
    )


def _parse_times(table: Table, time_col: str, kept: np.ndarray) -> np.ndarray:
    """(R,) float64 epoch seconds of every row; a DataError for the first kept row without a readable time."""
    column = table.data.column(time_col)
    missing = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    absent = np.flatnonzero(missing & kept)
    first_absent = int(absent[0]) if len(absent) else None

    def fail(i: int, reason: str) -> DataError:  # the first bad row in file order is named
        if first_absent is not None and first_absent < i:
            return DataError(f"{table.where(first_absent)}: column {time_col!r}: missing time value")
        return _bad_time(table, time_col, i, column[i].as_py(), reason)

    def check(times: np.ndarray) -> np.ndarray:
        bad = ~np.isfinite(times) & kept & ~missing
        if bad.any():
            raise fail(int(np.flatnonzero(bad)[0]), "not a finite number")
        if first_absent is not None:
            raise DataError(f"{table.where(first_absent)}: column {time_col!r}: missing time value")
        return times

    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return check(column.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:  # the usual case: every value a plain number (float() reads them the same)
            times = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        else:
            return check(times)
    # ISO-8601 text, datetimes, mixed values: parse each distinct value once, in Python
    codes, uniques = factorize(column)
    parsed = np.full(len(uniques) + 1, np.nan)
    failed: dict[int, str] = {}
    for k, value in enumerate(uniques.to_pylist()):
        try:
            parsed[k] = parse_time(value)
        except (ValueError, TypeError, OverflowError) as e:
            failed[k] = str(e)
    if failed:
        bad = np.isin(codes, np.fromiter(failed, dtype=np.int64)) & kept
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise fail(i, failed[int(codes[i])])
    return check(np.where(missing, 0.0, parsed[codes]))


def _duplicates(columns: list[np.ndarray], candidates: np.ndarray) -> np.ndarray:
    """Which of the `candidates` rows (ascending row indices) repeat an earlier candidate in every column
    (`columns`: each column's value codes, one code per distinct raw value)."""
    if len(candidates) < 2:
        return np.zeros(len(candidates), dtype=bool)
    key = np.stack([codes[candidates] for codes in columns], axis=1)  # (C, columns)
    _, first = np.unique(key, axis=0, return_index=True)
    repeat = np.ones(len(candidates), dtype=bool)
    repeat[first] = False
    return repeat


def load_events(options: DataOptions) -> EventLog:
    """Read `options.path`, keep rows with a user and an action, drop exact duplicate rows, sort by time."""
    path = Path(options.path)
    time_col = options.time_col
    wanted = [options.user_col, *options.action_cols] + ([time_col] if time_col else [])
    side_col = options.side_col
    if side_col:
        _check_side_col(options)
    # The default time column may be absent (file order is then the time order); a named one may not.
    optional = frozenset([time_col]) if time_col and not options.time_col_required else frozenset()
    table = read_table(path, wanted, optional)
    data, n = table.data, table.num_rows
    if side_col and side_col not in data.column_names:
        raise DataError(
            f"{path}: --side-col {side_col!r} not found; available columns: {', '.join(data.column_names)}"
        )
    has_time = bool(time_col) and time_col in data.column_names and data.column(time_col).null_count < n
    if time_col and not has_time:
        if options.time_col_required:
            raise DataError(f"{path}: column {time_col!r} has no values")
        log.info("%s: no %r column, using file order as time order", path, time_col)

    user_codes, user_tokens = _token_codes(data.column(options.user_col))
    action_codes, tokens = _action_codes(data, options.action_cols)
    kept = (user_codes >= 0) & (action_codes >= 0)
    side = None
    if side_col:  # the table holds every column of the file: the side column costs no second read
        side = _side_column(path, data.column(side_col), side_col, action_codes, kept, len(tokens))
    dropped_missing = n - int(kept.sum())
    times = _parse_times(table, time_col, kept) if has_time and time_col else np.arange(n, dtype=np.float64)
    rows = np.flatnonzero(kept)  # ascending: file order
    if not len(rows):
        raise DataError(
            f"{path}: no usable events ({table.unit}s read: {n}, missing user or action: {dropped_missing})"
        )
    # Every column's value codes (4 bytes per row and column) are all the duplicate check needs: the file's
    # columns can go before the sort, the step that needs the most memory.
    columns = []
    del table
    while data.num_columns:  # one column at a time, each dropped once coded
        columns.append(factorize(data.column(0))[0])
        data = data.remove_column(0)
    del data
    pa.default_memory_pool().release_unused()

    # Users in order of first appearance among the kept rows; each user's events in time order, file order
    # breaking ties.
    user_rank, user_first = factorize(user_codes[rows])
    del user_codes, kept  # (arrays are freed as soon as they are used up: the peak is what counts)
    order = group_sort(user_rank, times[rows])
    # Exact duplicates share the user, the action and the time: only rows that share those with another row
    # are compared on every column (without a time column: rows that share the user and the action).
    if has_time:
        by = order
        same = (np.diff(user_rank[by]) == 0) & (np.diff(times[rows[by]]) == 0)
    else:
        pair = user_rank.astype(np.int64) * (len(tokens) + 1) + action_codes[rows]
        by = np.argsort(pair, kind="stable")
        same = np.diff(pair[by]) == 0
        del pair
    tied = np.zeros(len(rows), dtype=bool)
    tied[by[1:][same]] = True
    tied[by[:-1][same]] = True
    candidates = np.flatnonzero(tied)
    del tied, same, by
    repeat = _duplicates(columns, rows[candidates])
    del columns
    dropped_duplicates = int(repeat.sum())
    if dropped_duplicates:
        drop = np.zeros(len(rows), dtype=bool)
        drop[candidates[repeat]] = True
        order = order[~drop[order]]
    ordered = rows[order]  # row indices, user by user, in time order
    lengths = np.bincount(user_rank, minlength=len(user_first))
    if dropped_duplicates:
        lengths -= np.bincount(user_rank[candidates[repeat]], minlength=len(user_first))
    del rows, order, user_rank
    actions = action_codes[ordered].astype(np.int32, copy=False)
    del action_codes
    times = times[ordered]
    del ordered
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    user_ids = [user_tokens[c] for c in user_first.to_pylist()]
    return EventLog(
        path=path,
        action_cols=tuple(options.action_cols),
        time_col=time_col if has_time else None,
        users=user_ids,
        tokens=tokens,
        actions=actions,
        times=times,
        offsets=offsets,
        rows_read=n,
        dropped_missing=dropped_missing,
        dropped_duplicates=dropped_duplicates,
        side=side,
    )


def _check_side_col(options: DataOptions) -> None:
    roles = {c: "an action column" for c in options.action_cols} | {options.user_col: "the user column"}
    if options.time_col:
        roles[options.time_col] = "the time column"
    column = str(options.side_col)
    if column in roles:
        raise DataError(f"--side-col {column!r} is {roles[column]}: name a column that describes the action")


def _side_column(
    path: Path, column: pa.ChunkedArray, name: str, actions: np.ndarray, kept: np.ndarray, n_actions: int
) -> SideColumn:
    """Per action code, its most frequent side value over the kept rows (ties: the value first in the file)."""
    side, side_tokens = _token_codes(column)
    if not side_tokens:
        raise DataError(f"{path}: --side-col {name!r} has no values")
    rows = kept & (side >= 0)
    pair = actions[rows].astype(np.int64) * len(side_tokens) + side[rows]
    uniq, counts = np.unique(pair, return_counts=True)  # (P,) ascending: by action, then side code
    pair_action, pair_side = uniq // len(side_tokens), uniq % len(side_tokens)
    # by action, the most frequent value first; ties keep the lower side code: the value seen first in the file
    order = np.lexsort((-counts, pair_action))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair_action[order][1:] != pair_action[order][:-1]
    best = np.full(n_actions, -1, dtype=np.int64)
    best[pair_action[order][first]] = pair_side[order][first]
    several = np.bincount(pair_action, minlength=n_actions) > 1
    return SideColumn(column=name, best=best, several=several)

"""Today's row-by-row data path (before the columnar one), kept verbatim as the reference the equality tests
compare `training.events.load_events` with. Not used by the package; slow and memory-hungry on purpose.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import DataOptions
from training.errors import DataError
from training.events import format_time, parse_time, token

log = logging.getLogger(__name__)

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class Table:
    """Selected columns of a file, row by row, with where each row came from (for error messages)."""

    path: Path
    columns: tuple[str, ...]  # the selected columns, in the order asked for
    rows: list[tuple[Any, ...]]  # values of the selected columns; None where missing
    locations: list[int]  # line number (text formats) or row number (Parquet), 1-based
    unit: str  # "line" or "row"
    keys: list[tuple[Any, ...]]  # every column's value, to recognise exact duplicate rows

    def where(self, i: int) -> str:
        """'file:line 12' style location of row i."""
        return f"{self.path}: {self.unit} {self.locations[i]}"


def file_format(path: Path) -> str:
    """The format implied by the file's extension, or a DataError listing the supported ones."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        supported = ", ".join(sorted(FORMATS))
        raise DataError(f"{path}: unsupported file extension {path.suffix!r} (supported: {supported})")
    return fmt


def read_table(path: Path, wanted: list[str], optional: frozenset[str] = frozenset()) -> Table:
    """Read the `wanted` columns of `path`; a column in `optional` may be absent (its values are then None)."""
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if fmt == "parquet":
            return _read_parquet(path, wanted, optional)
        if fmt == "jsonl":
            return _read_jsonl(path, wanted, optional)
        return _read_delimited(path, wanted, optional, "\t" if fmt == "tsv" else ",")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _check_columns(path: Path, available: list[str], wanted: list[str], optional: frozenset[str]) -> None:
    missing = [c for c in wanted if c not in available and c not in optional]
    if missing:
        names = ", ".join(available) if available else "(none)"
        raise DataError(
            f"{path}: column {missing[0]!r} not found; available columns: {names} "
            "(choose them with --user-col, --action-col, --time-col)"
        )


def _read_delimited(path: Path, wanted: list[str], optional: frozenset[str], delimiter: str) -> Table:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file (a header line naming the columns is required)") from None
        header = [h.strip() for h in header]
        _check_columns(path, header, wanted, optional)
        picks = [header.index(c) if c in header else None for c in wanted]
        rows: list[tuple[Any, ...]] = []
        keys: list[tuple[Any, ...]] = []
        locations: list[int] = []
        try:
            for record in reader:
                if not record:
                    continue  # blank line
                if len(record) != len(header):
                    raise DataError(
                        f"{path}: line {reader.line_num}: {len(record)} fields, the header has {len(header)} "
                        f"(value {delimiter.join(record)[:80]!r})"
                    )
                rows.append(tuple(record[p] if p is not None and record[p] != "" else None for p in picks))
                keys.append(tuple(record))
                locations.append(reader.line_num)
        except csv.Error as e:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise DataError(f"{path}: line {reader.line_num}: malformed {kind}: {e}") from e
    return Table(path, tuple(wanted), rows, locations, "line", keys)


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: line {number}: not valid JSON ({e.msg}): {line.strip()[:80]!r}"
                ) from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object, got {line.strip()[:80]!r}")
            yield number, obj


def _read_jsonl(path: Path, wanted: list[str], optional: frozenset[str]) -> Table:
    rows: list[tuple[Any, ...]] = []
    keys: list[tuple[Any, ...]] = []
    locations: list[int] = []
    seen: dict[str, None] = {}
    for number, obj in _json_lines(path):
        seen.update(dict.fromkeys(obj))
        rows.append(tuple(obj.get(c) for c in wanted))
        keys.append(tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in obj.items())))
        locations.append(number)
    if not rows:
        raise DataError(f"{path}: no JSON objects in the file")
    _check_columns(path, list(seen), wanted, optional)
    return Table(path, tuple(wanted), rows, locations, "line", keys)


def _read_parquet(path: Path, wanted: list[str], optional: frozenset[str]) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    _check_columns(path, table.column_names, wanted, optional)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    n = table.num_rows
    picked = [columns.get(c, [None] * n) for c in wanted]
    rows = list(zip(*picked, strict=True)) if picked else [() for _ in range(n)]
    keys = [
        tuple(map(repr, row)) for row in zip(*columns.values(), strict=True)
    ]  # repr: lists are unhashable
    return Table(path, tuple(wanted), rows, list(range(1, n + 1)), "row", keys)


#: Numeric times at or above this are shown as dates (epoch seconds); below it they are positions or offsets.
_EPOCH_DISPLAY_FROM = 1e8


@dataclass(frozen=True)
class LegacyLog:
    """Clean events grouped by user, each user's events in time order (file order breaks ties)."""

    path: Path
    action_cols: tuple[str, ...]
    time_col: str | None  # None: the file has no time column and file order is the time order
    users: list[str]  # user ids in order of first appearance
    actions: list[list[str]]  # per user: action tokens
    times: list[
        list[float]
    ]  # per user: event times (epoch seconds, or the file position when time_col is None)
    rows_read: int
    dropped_missing: int
    dropped_duplicates: int

    @property
    def rows(self) -> int:
        """Events after cleaning."""
        return sum(len(a) for a in self.actions)

    def distinct_actions(self) -> int:
        return len({t for seq in self.actions for t in seq})

    def time_span(self) -> tuple[str | None, str | None]:
        """First and last event time, readable; (None, None) when the file has no time column."""
        if self.time_col is None or not self.rows:
            return None, None
        lo = min(t[0] for t in self.times if t)
        hi = max(t[-1] for t in self.times if t)
        return format_time(lo), format_time(hi)


def load_events(options: DataOptions) -> LegacyLog:
    """Read `options.path`, keep rows with a user and an action, drop exact duplicate rows, sort by time."""
    path = Path(options.path)
    time_col = options.time_col
    wanted = [options.user_col, *options.action_cols] + ([time_col] if time_col else [])
    # The default time column may be absent (file order is then the time order); a named one may not.
    optional = frozenset([time_col]) if time_col and not options.time_col_required else frozenset()
    table = read_table(path, wanted, optional)
    n_actions = len(options.action_cols)
    has_time = bool(time_col) and any(row[-1] is not None for row in table.rows)
    if time_col and not has_time:
        if options.time_col_required:
            raise DataError(f"{path}: column {time_col!r} has no values")
        log.info("%s: no %r column, using file order as time order", path, time_col)

    by_user: dict[str, list[tuple[float, str]]] = {}
    seen: set[tuple[Any, ...]] = set()
    dropped_missing = dropped_duplicates = 0
    for i, row in enumerate(table.rows):
        user = token(row[0])
        parts = [token(v) for v in row[1 : 1 + n_actions]]
        if user is None or any(p is None for p in parts):
            dropped_missing += 1
            continue
        key = table.keys[i]
        if key in seen:
            dropped_duplicates += 1
            continue
        seen.add(key)
        if has_time:
            raw = row[-1]
            if raw is None:
                raise DataError(f"{table.where(i)}: column {time_col!r}: missing time value")
            try:
                t = parse_time(raw)
            except (ValueError, TypeError) as e:
                raise DataError(
                    f"{table.where(i)}: column {time_col!r}: cannot read {raw!r} as a time "
                    f"(epoch seconds or ISO-8601): {e}"
                ) from e
        else:
            t = float(i)
        by_user.setdefault(user, []).append((t, ":".join(p for p in parts if p is not None)))

    if not by_user:
        raise DataError(
            f"{path}: no usable events ({table.unit}s read: {len(table.rows)}, "
            f"missing user or action: {dropped_missing})"
        )
    users = list(by_user)
    ordered = [
        sorted(by_user[u], key=lambda e: e[0]) for u in users
    ]  # sorted() is stable: file order breaks ties
    return LegacyLog(
        path=path,
        action_cols=tuple(options.action_cols),
        time_col=time_col if has_time else None,
        users=users,
        actions=[[a for _, a in events] for events in ordered],
        times=[[t for t, _ in events] for events in ordered],
        rows_read=len(table.rows),
        dropped_missing=dropped_missing,
        dropped_duplicates=dropped_duplicates,
    )


def legacy_boundaries(log: LegacyLog, split: str, val_fraction: float = 0.1, test_fraction: float = 0.1):
    """Today's leave-one-out and time splits over per-user lists: (train_end, val_end, lengths)."""
    import bisect

    import numpy as np

    n = np.array([len(a) for a in log.actions], dtype=np.int64)
    if split == "leave-one-out":
        evaluable = n >= 3
        return np.where(evaluable, n - 2, n), np.where(evaluable, n - 1, n), n
    all_times = np.sort(np.concatenate([np.asarray(t, dtype=np.float64) for t in log.times]))
    total = len(all_times)
    t_val = all_times[min(total - 1, int(total * (1 - val_fraction - test_fraction)))]
    t_test = all_times[min(total - 1, int(total * (1 - test_fraction)))]
    train_end = np.array([bisect.bisect_left(t, t_val) for t in log.times], dtype=np.int64)
    val_end = np.array([bisect.bisect_left(t, t_test) for t in log.times], dtype=np.int64)
    return train_end, val_end, n

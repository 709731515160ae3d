"""Reading an event log file into rows of raw values: CSV, TSV, JSON Lines or Parquet, chosen by extension.

Only the reading happens here; what the values mean (user, action, time) is decided in `events.py`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.errors import DataError

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

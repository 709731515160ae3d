"""Reading an event log into columns with pyarrow: CSV, TSV, JSON Lines or Parquet (a file or a directory of
Parquet files), chosen by extension.

Only the reading happens here; what the values mean (user, action, time) is decided in `events.py`. Text
formats are read as strings, exactly as written, so that no value changes on its way in (`007` stays `007`).
Bad input stops with a DataError naming the file, the line (text) or row (Parquet) and the value; the fast
columnar reader does not know line numbers, so on an error the text file is scanned again with the csv/json
modules, streaming, to name the same line the row-by-row reader would have named.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

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
    """Every column of a file (raw values; text formats as strings, an empty field as null), and where each
    row came from (for error messages)."""

    path: Path
    data: pa.Table  # the file's columns under their (stripped) names
    unit: str  # "line" or "row"
    locate: Callable[[int], int]  # row index -> its 1-based line (text formats) or row (Parquet) number

    @property
    def num_rows(self) -> int:
        return self.data.num_rows

    def where(self, i: int) -> str:
        """'file: line 12' style location of row i."""
        return f"{self.path}: {self.unit} {self.locate(i)}"


def file_format(path: Path) -> str:
    """The format implied by the file's extension (a directory: Parquet), or a DataError listing them."""
    if path.is_dir():
        return "parquet"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        supported = ", ".join(sorted(FORMATS))
        raise DataError(
            f"{path}: unsupported file extension {path.suffix!r} (supported: {supported}, "
            "or a directory of .parquet files)"
        )
    return fmt


def read_table(path: Path, wanted: list[str], optional: frozenset[str] = frozenset()) -> Table:
    """Read `path`; every column in `wanted` must exist unless it is in `optional`."""
    path = Path(path)
    fmt = file_format(path)
    if not path.exists():
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


def check_columns(path: Path, available: list[str], wanted: list[str], optional: frozenset[str]) -> None:
    missing = [c for c in wanted if c not in available and c not in optional]
    if missing:
        names = ", ".join(available) if available else "(none)"
        raise DataError(
            f"{path}: column {missing[0]!r} not found; available columns: {names} "
            "(choose them with --user-col, --action-col, --time-col)"
        )


# -- CSV / TSV -------------------------------------------------------------------------------------------


def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank record after the header, with the row-by-row reader's errors."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        kind = "TSV" if delimiter == "\t" else "CSV"
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file (a header line naming the columns is required)")
            for record in reader:
                if not record:
                    continue  # blank line
                if len(record) != len(header):
                    raise DataError(
                        f"{path}: line {reader.line_num}: {len(record)} fields, the header has {len(header)} "
                        f"(value {delimiter.join(record)[:80]!r})"
                    )
                yield reader.line_num, record
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: malformed {kind}: {e}") from e


def _csv_line_locator(path: Path, delimiter: str) -> Callable[[int], int]:
    def locate(i: int) -> int:
        for k, (line, _) in enumerate(_csv_records(path, delimiter)):
            if k == i:
                return line
        return i + 2  # not reached for a row that exists

    return locate


def _read_delimited(path: Path, wanted: list[str], optional: frozenset[str], delimiter: str) -> Table:
    import pyarrow.csv as pacsv

    with path.open(newline="", encoding="utf-8-sig") as f:
        try:
            header = next(csv.reader(f, delimiter=delimiter, strict=True), None)
        except csv.Error:
            header = []  # the scan below names the line
    if header is None:
        raise DataError(f"{path}: empty file (a header line naming the columns is required)")
    names = [h.strip() for h in header]
    check_columns(path, names, wanted, optional)
    positional = [f"f{i}" for i in range(len(names))]
    try:
        data = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=positional, skip_rows=1, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, newlines_in_values=True, ignore_empty_lines=True
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(positional, pa.string()),
                null_values=[""],  # only an empty field is missing, as in the row-by-row reader
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowException) as e:
        for _ in _csv_records(path, delimiter):  # names the line, as the row-by-row reader does
            pass
        raise DataError(f"{path}: cannot read as {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from e
    # names may repeat in a header: keep the first one under its name, as header.index() did
    data = data.rename_columns([n if names.index(n) == i else f"{n}#{i}" for i, n in enumerate(names)])
    return Table(path, data, "line", _csv_line_locator(path, delimiter))


# -- JSON Lines -----------------------------------------------------------------------------------------


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
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


def _json_line_locator(path: Path) -> Callable[[int], int]:
    def locate(i: int) -> int:
        for k, (number, _) in enumerate(_json_lines(path)):
            if k == i:
                return number
        return i + 1

    return locate


def _read_jsonl(path: Path, wanted: list[str], optional: frozenset[str]) -> Table:
    import pyarrow.json as pajson

    try:
        data = pajson.read_json(path, read_options=pajson.ReadOptions(block_size=1 << 24))
    except (pa.ArrowInvalid, pa.ArrowException):
        data = _read_jsonl_rows(path)  # names a bad line, or reads values pyarrow cannot type (mixed types)
    if data.num_rows == 0:
        raise DataError(f"{path}: no JSON objects in the file")
    check_columns(path, data.column_names, wanted, optional)
    return Table(path, data, "line", _json_line_locator(path))


def _read_jsonl_rows(path: Path) -> pa.Table:
    """The line-by-line reader: values of a column with mixed JSON types become their JSON text."""
    columns: dict[str, list[object]] = {}
    for n, (_, obj) in enumerate(_json_lines(path)):
        for key in obj.keys() - columns.keys():
            columns[key] = [None] * n
        for key, values in columns.items():
            values.append(obj.get(key))
    out = {}
    for key, values in columns.items():
        try:
            out[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            out[key] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v, sort_keys=True) for v in values]
            )
    return pa.table(out) if out else pa.table({})


# -- Parquet ---------------------------------------------------------------------------------------------


def _read_parquet(path: Path, wanted: list[str], optional: frozenset[str]) -> Table:
    import pyarrow.parquet as pq

    try:
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".parquet", ".pq")
            )
            if not files:
                raise DataError(f"{path}: a directory without .parquet files")
            parts = [pq.read_table(p) for p in files]
            data = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
        else:
            data = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    check_columns(path, data.column_names, wanted, optional)
    return Table(path, data, "row", lambda i: i + 1)

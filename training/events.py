"""From a file to clean per-user event sequences: pick the columns, build action tokens, parse times, clean, sort."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.config import DataOptions
from training.errors import DataError
from training.tables import read_table

log = logging.getLogger(__name__)

#: Numeric times at or above this are shown as dates (epoch seconds); below it they are positions or offsets.
_EPOCH_DISPLAY_FROM = 1e8


@dataclass(frozen=True)
class EventLog:
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


def load_events(options: DataOptions) -> EventLog:
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
    return EventLog(
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

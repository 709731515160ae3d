"""From validated request bodies to events ready to store: configured limits, timestamps, server-assigned ids."""

from __future__ import annotations

import math
from collections.abc import Sequence

from starlette.convertors import Convertor

from app.ids import new_id
from app.schemas import UNION_TAGS, EventIn
from app.settings import Settings
from app.windows import NewEvent

Loc = tuple[str | int, ...]


class InvalidField(Exception):
    """A request value outside a configured limit; answered 422 like a schema validation error."""

    def __init__(self, loc: Sequence[str | int], message: str) -> None:
        super().__init__(f"{field_path(loc)}: {message}")
        self.loc = tuple(loc)
        self.message = message


class PayloadTooLarge(Exception):
    """A body or batch over its configured limit (413); the message names the limit and its setting."""


def field_path(loc: Sequence[str | int]) -> str:
    """("body", "events", 0, "action") -> "body.events[0].action" (discriminated-union tags dropped)."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not (i == 1 and loc[0] == "body" and item in UNION_TAGS):
            parts.append(f".{item}" if parts else str(item))
    return "".join(parts)


def check_string(value: str, limit: int, setting: str, loc: Loc) -> None:
    """At most `limit` characters and encodable as UTF-8 (no lone surrogates)."""
    if len(value) > limit:
        raise InvalidField(loc, f"longer than {limit} characters ({setting})")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidField(loc, f"not encodable as UTF-8 at position {e.start}") from e


def check_user_id(user_id: str, settings: Settings, loc: Loc = ("path", "user_id")) -> None:
    check_string(user_id, settings.max_id_length, "NEXTACT_MAX_ID_LENGTH", loc)


class AnythingConvertor(Convertor[str]):
    """A path parameter of any characters ('/' and newlines included), for ids that end a route's path or sit
    before its last fixed segment: `{user_id:anything}/events` takes all but the last segment as the id."""

    regex = "[\\s\\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


def check_count(count: int, settings: Settings) -> None:
    if count > settings.max_events_per_request:
        raise PayloadTooLarge(
            f"{count} events in one request is over the limit of {settings.max_events_per_request} "
            "(NEXTACT_MAX_EVENTS_PER_REQUEST)"
        )


def epoch_seconds(ts: float | None, now: float, settings: Settings, loc: Loc) -> float:
    """The event time (default now), within [NEXTACT_MIN_EVENT_TIMESTAMP, now + NEXTACT_MAX_FUTURE_SECONDS]."""
    if ts is None:
        return now
    if not math.isfinite(ts):
        raise InvalidField(loc, "out of range: must be a finite number")
    if ts < settings.min_event_timestamp:
        raise InvalidField(
            loc,
            f"{ts} is before the earliest accepted time {settings.min_event_timestamp} "
            "(NEXTACT_MIN_EVENT_TIMESTAMP)",
        )
    if ts > now + settings.max_future_seconds:
        raise InvalidField(
            loc,
            f"{ts} is more than {settings.max_future_seconds}s in the future "
            f"(NEXTACT_MAX_FUTURE_SECONDS){_unit_hint(ts, now, settings)}",
        )
    return ts


def _unit_hint(ts: float, now: float, settings: Settings) -> str:
    """A hint when a refused timestamp would be in range as milliseconds or microseconds."""
    for unit, divisor in (("milliseconds", 1000), ("microseconds", 1_000_000)):
        if settings.min_event_timestamp <= ts / divisor <= now + settings.max_future_seconds:
            return f"; looks like {unit}; divide by {divisor}"
    return ""


def new_event(event: EventIn, now: float, settings: Settings, loc: Loc) -> NewEvent:
    """Check one event against the limits and fill in its defaults."""
    check_string(event.action, settings.max_action_length, "NEXTACT_MAX_ACTION_LENGTH", (*loc, "action"))
    if event.event_id is None:
        event_id = new_id()
    else:
        event_id = event.event_id
        check_string(event_id, settings.max_id_length, "NEXTACT_MAX_ID_LENGTH", (*loc, "event_id"))
    ts = epoch_seconds(event.timestamp, now, settings, (*loc, "timestamp"))
    return NewEvent(event_id, event.action, ts)

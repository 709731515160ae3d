"""What the client sends and gets back: small frozen dataclasses mirroring the API's JSON bodies."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def new_event_id() -> str:
    """A random event id (32 hex digits, like the ids the service assigns)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a user. `timestamp`: epoch seconds or a datetime (None: the server's clock)."""

    action: str
    timestamp: float | datetime | None = None
    event_id: str | None = None

    def body(self, event_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, "event_id": event_id}
        if isinstance(self.timestamp, datetime):
            out["timestamp"] = self.timestamp.isoformat()
        elif self.timestamp is not None:
            out["timestamp"] = self.timestamp
        return out


@dataclass(frozen=True, slots=True)
class BulkEvent:
    """An event of any user, for POST /v1/events."""

    user_id: str
    action: str
    timestamp: float | datetime | None = None
    event_id: str | None = None

    def body(self, event_id: str) -> dict[str, Any]:
        return {"user_id": self.user_id, **Event(self.action, self.timestamp).body(event_id)}


def with_ids(events: Sequence[Event | BulkEvent]) -> list[dict[str, Any]]:
    """JSON bodies with every event id fixed now, so that each retry resends the same ids."""
    return [e.body(e.event_id or new_event_id()) for e in events]


@dataclass(frozen=True, slots=True)
class ActionProbability:
    action: str
    probability: float


@dataclass(frozen=True, slots=True)
class UserPrediction:
    """The user's next action: `predictions` in descending probability."""

    user_id: str
    model_version: str
    window_size: int
    unknown_actions: int
    predictions: list[ActionProbability]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UserPrediction:
        return cls(
            user_id=data["user_id"],
            model_version=data["model_version"],
            window_size=data["window_size"],
            unknown_actions=data["unknown_actions"],
            predictions=[ActionProbability(p["action"], p["probability"]) for p in data["predictions"]],
        )


@dataclass(frozen=True, slots=True)
class BulkResult:
    accepted: int
    duplicates: int
    predictions: list[UserPrediction] | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BulkResult:
        preds = data.get("predictions")
        return cls(
            data["accepted"],
            data["duplicates"],
            None if preds is None else [UserPrediction.from_json(p) for p in preds],
        )


@dataclass(frozen=True, slots=True)
class StoredEvent:
    action: str
    timestamp: float
    event_id: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """GET /v1/model: the main fields, and the whole answer in `raw`."""

    model_version: str
    cell: str
    window: int
    vocabulary_size: int
    execution_provider: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(
            data["model_version"],
            data["cell"],
            data["window"],
            data["vocabulary_size"],
            data["execution_provider"],
            data,
        )


@dataclass(frozen=True, slots=True)
class ReloadResult:
    model_version: str
    previous_version: str | None
    seconds: float


class NextactError(Exception):
    """An error answer: HTTP `status`, the API's `error` code, its `message`, and `fields` for a 422."""

    def __init__(
        self, status: int, error: str, message: str, fields: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status, self.error, self.message, self.fields = status, error, message, fields or []

"""A deterministic event workload for end-to-end tests, and the windows it must leave behind.

Many users; each user's events are sent shuffled (out of timestamp order), in small batches, some batches
sent twice (duplicate event ids), users interleaved. Timestamps are distinct per user, so the final window
does not depend on arrival order: it is the newest `capacity` distinct events, oldest first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BASE_TS = 1_700_000_000.0


@dataclass(frozen=True, slots=True)
class Event:
    user_id: str
    event_id: str
    action: str
    timestamp: float

    def body(self) -> dict[str, Any]:
        """The event as POST /v1/users/{user_id}/events takes it."""
        return {"action": self.action, "timestamp": self.timestamp, "event_id": self.event_id}

    def bulk_body(self) -> dict[str, Any]:
        """The event as POST /v1/events takes it."""
        return {"user_id": self.user_id, **self.body()}


@dataclass(frozen=True)
class Request:
    """One POST: a user's batch (user_id set) or a bulk batch of several users (user_id None)."""

    user_id: str | None
    events: list[Event]

    @property
    def path(self) -> str:
        return "/v1/events" if self.user_id is None else f"/v1/users/{self.user_id}/events"

    def json(self) -> dict[str, Any]:
        if self.user_id is None:
            return {"events": [e.bulk_body() for e in self.events]}
        return {"events": [e.body() for e in self.events]}


@dataclass(frozen=True)
class Workload:
    users: list[str]
    events: list[Event]  # every distinct event, per user in timestamp order
    requests: list[Request]  # in send order

    def expected_window(self, user_id: str, capacity: int) -> list[Event]:
        """The newest `capacity` distinct events of the user, oldest first."""
        mine = sorted((e for e in self.events if e.user_id == user_id), key=lambda e: e.timestamp)
        return mine[-capacity:]


def make_workload(
    users: int,
    actions: Sequence[str],
    seed: int,
    max_events: int = 30,
    bulk_share: float = 0.3,
    prefix: str = "u",
) -> Workload:
    rng = random.Random(seed)
    user_ids = [f"{prefix}-{seed}-{i}" for i in range(users)]
    events: list[Event] = []
    batches: list[list[Event]] = []
    for user in user_ids:
        mine = [
            Event(user, f"{user}-e{j}", rng.choice(actions), BASE_TS + 60.0 * j + rng.randrange(0, 59) + 0.25)
            for j in range(rng.randint(1, max_events))
        ]
        events += mine
        shuffled = rng.sample(mine, len(mine))
        while shuffled:
            size = rng.randint(1, 6)
            batches.append(shuffled[:size])
            shuffled = shuffled[size:]
    batches += rng.sample(batches, len(batches) // 4)  # re-sent batches: duplicate event ids
    rng.shuffle(batches)
    requests: list[Request] = []
    bulk: list[Event] = []
    for batch in batches:
        if rng.random() < bulk_share:
            bulk += batch
            if len(bulk) >= 40:
                requests.append(Request(None, bulk))
                bulk = []
        else:
            requests.append(Request(batch[0].user_id, batch))
    if bulk:
        requests.append(Request(None, bulk))
    return Workload(user_ids, events, requests)


def window_of(body: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(event_id, action, timestamp) rows of a GET /v1/users/{user_id}/events answer."""
    return [(e["event_id"], e["action"], e["timestamp"]) for e in body["events"]]


def rows(events: Sequence[Event]) -> list[tuple[str, str, float]]:
    return [(e.event_id, e.action, e.timestamp) for e in events]

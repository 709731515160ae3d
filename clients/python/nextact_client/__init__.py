"""Typed client for the nextact HTTP API: `NextactClient` (sync) and `AsyncNextactClient` (async).

Only httpx is needed. Posts are safe to retry: every event carries an `event_id` (a random one when none is
given, chosen before the first try), and the service stores an id only once per user.
"""

from nextact_client.client import AsyncNextactClient, NextactClient
from nextact_client.models import (
    ActionProbability,
    BulkEvent,
    BulkResult,
    Event,
    ModelInfo,
    NextactError,
    ReloadResult,
    StoredEvent,
    UserPrediction,
)

__version__ = "0.1.0"
__all__ = [
    "ActionProbability",
    "AsyncNextactClient",
    "BulkEvent",
    "BulkResult",
    "Event",
    "ModelInfo",
    "NextactClient",
    "NextactError",
    "ReloadResult",
    "StoredEvent",
    "UserPrediction",
]

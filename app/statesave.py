"""Incremental state: store each user's new recurrent state behind the answer, not before it.

The stored state is a cache guarded by compare-and-set on the user's arrival counter (SAVE_STATE_LUA): a save
that is late, lost or dropped only makes that user's next append rebuild the state from the window. So the
save is sent without the response waiting for it (the Redis client pipelines it with whatever else is sent in
the same event-loop turn), with two bounds:

- at most `max_pending` saves in flight per process; beyond that a save is dropped and counted
  (`nextact_state_saves_total{outcome="dropped"}`), never queued without end;
- a user's next append in this process first waits for that user's pending save (`settle_all`, together
  with the pending prediction write, at most SETTLE_SECONDS in all), so a stream of one user's events steps
  from each state it saved instead of rebuilding.

Every outcome is counted (stored, stale: another event arrived first, failed: Redis refused or was
unreachable, logged, dropped).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from app.observability import Metrics
from app.windows import StoreError, StoreUnavailable, WindowStore

log = logging.getLogger(__name__)

MAX_PENDING = 1024  # state saves in flight per process (about 2 KiB each for hidden 256)
# How long an append waits for the same user's pending writes (state save and prediction write, together).
# Longer (Redis slow or hung), it goes on without them: compare-and-set keeps that correct (at worst the state
# is rebuilt, the event goes unscored), and the wait stays inside the documented bound on a request while
# Redis hangs (docs/security-hardening.md).
SETTLE_SECONDS = 0.1


class PendingWrites(Protocol):
    def pending_for(self, user_id: str) -> asyncio.Future[None] | None: ...


async def settle_all(user_id: str, *writers: PendingWrites | None) -> None:
    """Wait for the user's pending writes of every writer (None: skipped) at once, at most SETTLE_SECONDS."""
    pending = [f for w in writers if w is not None and (f := w.pending_for(user_id)) is not None]
    if pending:
        await asyncio.wait(pending, timeout=SETTLE_SECONDS)


class StateSaver:
    """Writes users' new states behind the answers; bounded, counted, settled per user."""

    def __init__(self, store: WindowStore, metrics: Metrics, max_pending: int = MAX_PENDING) -> None:
        self.store = store
        self.metrics = metrics
        self.max_pending = max_pending
        self._users: dict[str, asyncio.Task[None]] = {}  # the latest pending save of each user
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def pending_for(self, user_id: str) -> asyncio.Future[None] | None:
        """This process's pending save of the user's state, if any."""
        return self._users.get(user_id)

    async def settle(self, user_id: str) -> None:
        """Wait until this process's pending save of the user's state (if any) is done, at most SETTLE_SECONDS."""
        await settle_all(user_id, self)

    def save(self, user_id: str, seq: int, model_version: str, state: bytes) -> None:
        """Store `state` (covering arrivals up to `seq`) behind the answer, or drop it when too many are pending."""
        if len(self._tasks) >= self.max_pending:
            self.metrics.state_saves.labels(outcome="dropped").inc()
            return
        task = asyncio.get_running_loop().create_task(self._save(user_id, seq, model_version, state))
        self._tasks.add(task)
        self._users[user_id] = task
        task.add_done_callback(lambda t: self._done(user_id, t))

    def _done(self, user_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._users.get(user_id) is task:
            del self._users[user_id]

    async def _save(self, user_id: str, seq: int, model_version: str, state: bytes) -> None:
        try:
            stored = await self.store.save_state(user_id, seq, model_version, state)
        except (StoreUnavailable, StoreError) as e:  # never fails a request: the next append rebuilds
            self.metrics.state_saves.labels(outcome="failed").inc()
            log.warning("incremental state not stored: %s", e.log_message)
            return
        except Exception:  # a bug, not an outage: still never the request's problem, but loud
            self.metrics.state_saves.labels(outcome="failed").inc()
            log.exception("incremental state not stored")
            return
        self.metrics.state_saves.labels(outcome="stored" if stored else "stale").inc()

    async def drain(self) -> None:
        """Wait for every save still running (shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))

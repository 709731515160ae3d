"""Incremental state: store each user's new recurrent state behind the answer, not before it.

The stored state is a cache guarded by compare-and-set on the user's arrival counter (SAVE_STATE_LUA): a save
that is late, lost or dropped only makes that user's next append rebuild the state from the window. So the
save is sent without the response waiting for it (the saves of one event-loop turn in one task, pipelined by
the Redis client with whatever else is sent in that turn; with live quality, each save also carries the user's
predictions for the same window, one script call for both), with two bounds:

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
from app.windows import StateWrite, StoreError, StoreUnavailable, WindowStore

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
    """Writes users' new states behind the answers; coalesced, bounded, counted, settled per user.

    The saves made in one event-loop turn (a micro-batch's answers) go to Redis as one write of one
    compare-and-set script call per user, each carrying the user's live-quality predictions for the same window
    when given (so a request costs one script call behind its answer, not one for each).
    """

    def __init__(self, store: WindowStore, metrics: Metrics, max_pending: int = MAX_PENDING) -> None:
        self.store = store
        self.metrics = metrics
        self.max_pending = max_pending
        self._queue: list[StateWrite] = []  # this turn's saves, not sent yet
        self._next: asyncio.Future[None] | None = None  # done when the write carrying the queue is done
        self._users: dict[str, asyncio.Future[None]] = {}  # the latest pending save of each user
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending = 0
        self._outcomes = {o: metrics.state_saves.labels(outcome=o) for o in ("stored", "stale", "failed")}

    @property
    def pending(self) -> int:
        """Saves queued or being written."""
        return self._pending

    def pending_for(self, user_id: str) -> asyncio.Future[None] | None:
        """This process's pending save of the user's state, if any."""
        return self._users.get(user_id)

    async def settle(self, user_id: str) -> None:
        """Wait until this process's pending save of the user's state (if any) is done, at most SETTLE_SECONDS."""
        await settle_all(user_id, self)

    def save(
        self, user_id: str, seq: int, model_version: str, state: bytes, predictions: bytes | None = None
    ) -> bool:
        """Store `state` (covering arrivals up to `seq`), and `predictions` for the same window if given, behind
        the answer; False when too many are pending (then nothing is stored: the caller may store the
        predictions another way)."""
        if self._pending >= self.max_pending:
            self.metrics.state_saves.labels(outcome="dropped").inc()
            return False
        if self._next is None:  # the first save of this turn: one task writes the turn's saves
            loop = asyncio.get_running_loop()
            self._next = loop.create_future()
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._queue.append(StateWrite(user_id, seq, model_version, state, predictions))
        self._users[user_id] = self._next
        self._pending += 1
        return True

    async def _flush(self) -> None:
        done, self._next = self._next, None
        batch, self._queue = self._queue, []
        assert done is not None
        try:
            outcomes = await self.store.save_states(batch)
        except (StoreUnavailable, StoreError) as e:  # never fails a request: the next append rebuilds
            self._outcomes["failed"].inc(len(batch))
            log.warning("incremental state not stored: %s", e.log_message)
        except Exception:  # a bug, not an outage: still never the request's problem, but loud
            self._outcomes["failed"].inc(len(batch))
            log.exception("incremental state not stored")
        else:
            refused = [o for o in outcomes if isinstance(o, StoreError)]
            stored = sum(1 for o in outcomes if o is True)
            self._outcomes["stored"].inc(stored)
            self._outcomes["stale"].inc(len(outcomes) - stored - len(refused))
            if refused:
                self._outcomes["failed"].inc(len(refused))
                log.warning("incremental state not stored: %s", refused[0].log_message)
        finally:
            self._pending -= len(batch)
            done.set_result(None)
            for w in batch:
                if self._users.get(w.user_id) is done:
                    del self._users[w.user_id]

    async def drain(self) -> None:
        """Wait for every save still running (shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))

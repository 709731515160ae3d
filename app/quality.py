"""Live model quality: each posted event scored against the prediction served just before it.

After a prediction, the service stores (next to the user's window, same hash slot and TTL) each model's
top-20 action ids for that window, written behind the answer. When the user's next event arrives, the append
script hands those back if the event really is the next one after that window (not late, not a duplicate,
no other event in between), and the event is scored: hit@1/5/10/20, reciprocal rank within the top 20
(MRR@20, 0 beyond it) and whether its action is unknown to the model. The figures are kept per model version:
the same definitions as the offline `full` protocol's hr@k and mrr@20 in the manifest.

Stored record format (field `p` of the user's state hash), one record per model that predicted:
    <len(version): 2 hex><version><len(ids): 4 hex><ids>   ids: little-endian uint16 (uint32 if the
                                                           vocabulary has more than 65535 actions)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from app.batching import BatchError
from app.statesave import settle_all
from app.windows import LATE, NOTHING_NEW, SCORED, LastPrediction, NewEvent, StoreUnavailable, WindowStore

log = logging.getLogger(__name__)

DEPTH = 20  # ids stored per prediction: hit@k for every k up to this
KS = (1, 5, 10, 20)
NOT_SCORED = {NOTHING_NEW: "duplicate", LATE: "late"}


def id_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 0xFFFF else "<u4"


def pack(records: Sequence[tuple[str, np.ndarray, int]]) -> bytes:
    """(model version, ranked ids, vocabulary size) per model -> the stored bytes."""
    out = []
    for version, ids, vocab_size in records:
        v = version.encode()
        blob = np.asarray(ids[:DEPTH]).astype(id_dtype(vocab_size)).tobytes()
        out.append(b"%02x%s%04x%s" % (len(v), v, len(blob), blob))
    return b"".join(out)


def unpack(data: bytes) -> list[tuple[str, bytes]]:
    """The stored bytes -> (model version, packed ids) per model."""
    out, i = [], 0
    while i < len(data):
        n = int(data[i : i + 2], 16)
        version = data[i + 2 : i + 2 + n].decode()
        i += 2 + n
        m = int(data[i : i + 4], 16)
        out.append((version, data[i + 4 : i + 4 + m]))
        i += 4 + m
    return out


@dataclass
class Tally:
    """One model version's live figures so far."""

    scored: int = 0
    hits: list[int] = field(default_factory=lambda: [0] * len(KS))
    rr_sum: float = 0.0
    unknown: int = 0

    def figures(self) -> dict[str, float | int]:
        n = self.scored
        out: dict[str, float | int] = {"events_scored": n}
        for k, h in zip(KS, self.hits, strict=True):
            out[f"hr@{k}"] = h / n if n else 0.0
        out[f"mrr@{DEPTH}"] = self.rr_sum / n if n else 0.0
        out["unknown_rate"] = self.unknown / n if n else 0.0
        return out


class LiveQuality:
    """Live figures per model version: Prometheus counters in the app's registry, plus in-process tallies
    (for GET /v1/model) and a ring buffer of periodic snapshots (for the /ui chart)."""

    def __init__(
        self, registry: CollectorRegistry, history_size: int = 360, namespace: str = "nextact"
    ) -> None:
        r, ns = registry, namespace
        self.scored = Counter(
            "live_events_scored",
            "Posted events scored against the prediction served before them, by model version.",
            ["model_version"],
            namespace=ns,
            registry=r,
        )
        self.hits = Counter(
            "live_hits",
            "Scored events whose action was in the model's top k, by model version "
            "and k (hr@k = hits / events scored).",
            ["model_version", "k"],
            namespace=ns,
            registry=r,
        )
        self.reciprocal_rank = Counter(
            "live_reciprocal_rank",
            f"Sum of 1/rank of scored events' actions within the top {DEPTH} (0 beyond): "
            f"mrr@{DEPTH} = this / events scored.",
            ["model_version"],
            namespace=ns,
            registry=r,
        )
        self.unknown = Counter(
            "live_unknown_actions",
            "Scored events whose action the model does not know.",
            ["model_version"],
            namespace=ns,
            registry=r,
        )
        self.not_scored = Counter(
            "live_events_not_scored",
            "Appends with no event scored, by reason: duplicate (only known event ids), "
            "late (an event older than the window's newest), no_prediction (none stored for the window before: "
            "a new user, an append without a prediction, another event in between), other_model (made by a model "
            "no longer loaded).",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        for reason in ("duplicate", "late", "no_prediction", "other_model"):
            self.not_scored.labels(reason=reason)
        self.tallies: dict[str, Tally] = {}
        self._series: dict[str, tuple[Any, list[Any], Any, Any]] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=history_size)

    def score(self, version: str, rank: int | None, unknown: bool = False) -> None:
        """One event scored against `version`'s top-20: its 1-based rank there, or None (not in it)."""
        tally = self.tallies.get(version)
        if tally is None:
            tally = self.tallies[version] = Tally()
            self._series[version] = (
                self.scored.labels(model_version=version),
                [self.hits.labels(model_version=version, k=str(k)) for k in KS],
                self.reciprocal_rank.labels(model_version=version),
                self.unknown.labels(model_version=version),
            )
        scored, hits, rr, unknown_actions = self._series[
            version
        ]  # label lookups once per version, not per event
        tally.scored += 1
        scored.inc()
        if unknown:
            tally.unknown += 1
            unknown_actions.inc()
        if rank is None:
            return
        tally.rr_sum += 1.0 / rank
        rr.inc(1.0 / rank)
        for j, k in enumerate(KS):
            if rank <= k:
                tally.hits[j] += 1
                hits[j].inc()

    def skip(self, reason: str) -> None:
        self.not_scored.labels(reason=reason).inc()

    def figures(self, version: str) -> dict[str, float | int]:
        """The live figures of one model version (zeros before any event was scored)."""
        return (self.tallies.get(version) or Tally()).figures()

    def snapshot(self, versions: Sequence[str], now: float | None = None) -> None:
        """Append the current figures of `versions` to the history ring buffer."""
        self.history.append({"time": now or time.time(), "models": {v: self.figures(v) for v in versions}})


Lookup = Callable[[str], Any]  # model version -> the loaded ServingModel with that version, or None


def score_event(
    quality: LiveQuality, last: LastPrediction, events: Sequence[NewEvent], lookup: Lookup
) -> None:
    """Score the event the append script picked against the stored predictions (one per model)."""
    if last.outcome != SCORED:
        quality.skip(NOT_SCORED.get(last.outcome, "no_prediction"))
        return
    action = events[last.event].action
    for version, blob in unpack(last.records):
        model = lookup(version)
        if model is None:
            quality.skip("other_model")
            continue
        action_id = model.action_id(action)
        if action_id is None:
            quality.score(version, None, unknown=True)
            continue
        ids = np.frombuffer(blob, dtype=id_dtype(model.vocab_size))
        where = np.flatnonzero(ids == action_id)
        quality.score(version, int(where[0]) + 1 if len(where) else None)


Records = bytes | Callable[[], Awaitable[bytes]]


async def _packed(records: Records) -> bytes:
    return records if isinstance(records, bytes) else await records()


class PredictionLog:
    """Writes users' latest predictions behind the answers, coalesced: what completes in one event-loop turn
    (a micro-batch's answers, say) goes to Redis as one pipelined write of small compare-and-set scripts.

    A user's next append in this process first waits for that write (`settle`), so consecutive events of one
    user are always scored; across processes a write that loses the race is dropped by the script's
    compare-and-set (that event is then counted as no_prediction, never scored against the wrong window).
    """

    def __init__(self, store: WindowStore, quality: LiveQuality) -> None:
        self.store = store
        self.quality = quality
        self._queue: list[tuple[str, int, Records]] = []
        self._next: asyncio.Future[None] | None = None  # done when the write carrying the queue is done
        self._users: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def pending_for(self, user_id: str) -> asyncio.Future[None] | None:
        """This process's pending write of the user's prediction, if any."""
        return self._users.get(user_id)

    async def settle(self, user_id: str) -> None:
        """Wait until this process's pending write of the user's prediction (if any) is done, at most
        SETTLE_SECONDS (Redis slow or hung: the next event then goes unscored rather than waiting)."""
        await settle_all(user_id, self)

    def remember(self, user_id: str, seq: int, records: Records) -> None:
        """Store `records` (or what `records()` packs) for the window at arrival counter `seq`, behind the answer."""
        if self._next is None:
            loop = asyncio.get_running_loop()
            self._next = loop.create_future()
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._queue.append((user_id, seq, records))
        self._users[user_id] = self._next

    async def _flush(self) -> None:
        done, self._next = self._next, None
        batch, self._queue = self._queue, []
        assert done is not None
        try:
            packed: list[bytes | BaseException] = [r for _, _, r in batch]  # type: ignore[misc]
            if not all(isinstance(r, bytes) for r in packed):  # a shadow candidate still has to predict
                packed = await asyncio.gather(*(_packed(r) for _, _, r in batch), return_exceptions=True)
            items = [
                (u, seq, p) for (u, seq, _), p in zip(batch, packed, strict=True) if isinstance(p, bytes)
            ]
            for p in packed:
                if isinstance(p, BaseException):
                    log.warning("live quality: a shadow prediction failed: %s", p)
            if items:
                await self.store.save_predictions(items)
        except (StoreUnavailable, BatchError) as e:  # never fails a request: the next events are not scored
            log.warning("live quality: predictions not stored: %s", getattr(e, "log_message", e))
        finally:
            done.set_result(None)
            for user_id, _, _ in batch:
                if self._users.get(user_id) is done:
                    del self._users[user_id]

    async def drain(self) -> None:
        """Wait for every write still running (shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))

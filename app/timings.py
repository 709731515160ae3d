"""Per-request stage timings, GC pauses and event-loop lag, for finding where tail latency comes from.

Off by default (NEXTACT_STAGE_TIMINGS=false): nothing here is installed and the hot path pays one
contextvar read per request. On, a plain ASGI middleware opens a record per request, a few hooks stamp it
(the Services dependency, the Redis round trip, the batcher), and GET /debug/timings returns each stage's
count, p50, p90, p99 and max in milliseconds over the samples kept since the last reset, with the GC
pauses (gc.callbacks) and the event loop's lag (a probe that sleeps 5 ms and measures how late it wakes).

Stages of a POST /v1/users/{id}/events (each in ms, in order):
  to_handler   ASGI call -> the route's dependencies run (body read, routing, auth, rate limit)
  prologue     dependencies -> the Redis call starts (body validation, checks, building the events)
  redis        the append script's round trip
  batch_wait   submitted to the batcher -> its batch is handed to the inference thread (queueing for a slot)
  handoff      handed off -> the inference thread starts the call (the thread's wake-up)
  inference    the model call of the batch that served the request, in the inference thread (wall time)
  infer_cpu    that call's CPU time in the inference thread (with one ONNX Runtime intra-op thread,
               inference - infer_cpu is waiting for a core or the GIL; with more, it also holds the pool
               threads' share of the work, which thread_time does not see)
  return       the call ended -> the event loop has its result (call_soon_threadsafe, loop queueing)
  wakeup       the loop has the result -> the request's coroutine runs again (loop queueing)
  respond      prediction in hand -> the last response byte handed to the server (shape, encode, send)
  total        ASGI call -> last response byte
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.batching import Batcher

STAGES = (
    "to_handler",
    "prologue",
    "redis",
    "batch_wait",
    "handoff",
    "inference",
    "infer_cpu",
    "return",
    "wakeup",
    "respond",
    "total",
)
KEEP = 200_000  # samples kept per series: a few minutes at the service's throughput, a few MB
LAG_PROBE_S = 0.005
DEBUG_PATH = "/debug/timings"
T = TypeVar("T")
R = TypeVar("R")

_current: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "nextact_stages", default=None
)


def current() -> dict[str, float] | None:
    """This request's stamp record (perf_counter seconds by mark name), or None when timings are off."""
    return _current.get()


def mark(name: str) -> None:
    """Stamp `name` on this request's record, if there is one (first stamp wins)."""
    rec = _current.get()
    if rec is not None and name not in rec:
        rec[name] = time.perf_counter()


async def submit(batcher: Batcher[T, R], item: T) -> R:
    """`batcher.submit(item)`, stamping the batch wait, the inference call and the wake-up when timings are on."""
    rec = _current.get()
    if rec is None:
        return await batcher.submit(item)
    rec.setdefault("submit", time.perf_counter())
    result, stamps = await batcher.submit_timed(item)
    rec["resumed"] = time.perf_counter()
    # the call that served this request
    rec["handed"], rec["infer_start"], rec["infer_end"], rec["returned"], rec["infer_cpu"] = stamps
    return result


def _percentiles(values: deque[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    s = sorted(values)
    n = len(s)

    def q(p: float) -> float:
        return round(s[min(n - 1, int(p * n))] * 1000, 3)

    return {
        "count": n,
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": round(s[-1] * 1000, 3),
        "mean": round(sum(s) / n * 1000, 3),
    }


class StageTimings:
    """Samples per stage (seconds), GC pauses and loop lag of one process."""

    def __init__(self) -> None:
        self.stages: dict[str, deque[float]] = {s: deque(maxlen=KEEP) for s in STAGES}
        self.loop_lag: deque[float] = deque(maxlen=KEEP)
        self.gc_pauses: deque[float] = deque(maxlen=KEEP)
        self.gc_by_generation = [0.0, 0.0, 0.0]
        self._gc_start = 0.0
        self.since = time.time()

    def reset(self) -> None:
        for values in (*self.stages.values(), self.loop_lag, self.gc_pauses):
            values.clear()
        self.gc_by_generation = [0.0, 0.0, 0.0]
        self.since = time.time()

    def record(self, rec: dict[str, float]) -> None:
        """Turn one request's stamps into stage durations (only the stages whose both ends were stamped)."""
        spans = (
            ("to_handler", "asgi", "deps"),
            ("prologue", "deps", "redis_start"),
            ("redis", "redis_start", "redis_end"),
            ("batch_wait", "submit", "handed"),
            ("handoff", "handed", "infer_start"),
            ("inference", "infer_start", "infer_end"),
            ("return", "infer_end", "returned"),
            ("wakeup", "returned", "resumed"),
            ("respond", "resumed", "sent"),
            ("total", "asgi", "sent"),
        )
        for stage, a, b in spans:
            if a in rec and b in rec:
                self.stages[stage].append(rec[b] - rec[a])
        if "infer_cpu" in rec:
            self.stages["infer_cpu"].append(rec["infer_cpu"])

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start:
            pause = time.perf_counter() - self._gc_start
            self.gc_pauses.append(pause)
            self.gc_by_generation[info.get("generation", 2)] += pause
            self._gc_start = 0.0

    async def _probe_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_PROBE_S)
            self.loop_lag.append(max(0.0, loop.time() - start - LAG_PROBE_S))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """GC callback and loop-lag probe, for the lifespan of the app."""
        gc.callbacks.append(self._on_gc)
        probe = asyncio.get_running_loop().create_task(self._probe_lag(), name="nextact-lag-probe")
        try:
            yield
        finally:
            probe.cancel()
            gc.callbacks.remove(self._on_gc)

    def snapshot(self) -> dict[str, Any]:
        seconds = time.time() - self.since
        return {
            "seconds": round(seconds, 3),
            "stages_ms": {s: _percentiles(v) for s, v in self.stages.items()},
            "loop_lag_ms": _percentiles(self.loop_lag),
            "gc": {
                "pauses": len(self.gc_pauses),
                "total_ms": round(sum(self.gc_pauses) * 1000, 3),
                "by_generation_ms": [round(g * 1000, 3) for g in self.gc_by_generation],
                "pause_ms": _percentiles(self.gc_pauses),
            },
        }


class StageTimingsMiddleware:
    """Plain ASGI: opens a stamp record for every HTTP request and records it when the last body byte is sent."""

    def __init__(self, app: ASGIApp, timings: StageTimings) -> None:
        self.app = app
        self.timings = timings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == DEBUG_PATH:
            await self.app(scope, receive, send)
            return
        rec = {"asgi": time.perf_counter()}
        token = _current.set(rec)

        async def send_timed(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                rec["sent"] = time.perf_counter()

        try:
            await self.app(scope, receive, send_timed)
        finally:
            _current.reset(token)
            if "sent" in rec:
                self.timings.record(rec)


async def debug_timings(request: Request, reset: bool = False) -> dict[str, Any]:
    """Stage timings, GC pauses and loop lag since the last reset (only with NEXTACT_STAGE_TIMINGS=true)."""
    timings: StageTimings = request.app.state.stage_timings
    snap = timings.snapshot()
    if reset:
        timings.reset()
    return snap


def install(app: FastAPI) -> StageTimings:
    """Add the middleware (outermost) and GET /debug/timings to `app`; the lifespan runs `timings.running()`."""
    timings = StageTimings()
    app.state.stage_timings = timings
    app.add_middleware(StageTimingsMiddleware, timings=timings)
    app.add_api_route(DEBUG_PATH, debug_timings, methods=["GET"], tags=["health"], include_in_schema=False)
    return timings

"""Metrics (Prometheus, one registry per app), request ids and structured JSON logs.

Every metric lives in the Metrics object that create_app() builds, never in prometheus-client's global
registry, so several apps in one process (tests) do not collide and forked workers do not share state.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.config
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.ids import new_id
from app.windows import (
    AppendResult,
    NewEvent,
    StatefulAppend,
    StateWrite,
    StoredEvent,
    StoreError,
    WindowStore,
)

log = logging.getLogger("nextact.access")

REQUEST_ID_HEADER = "X-Request-ID"
MODEL_VERSION_HEADER = (
    "X-Model-Version"  # the model that made the answer (routes set it; else the current one)
)
MODEL_VERSION_KEY = MODEL_VERSION_HEADER.lower().encode()
REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,64}")
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "nextact_request_id", default=None
)

REDIS_OPS = ("append", "read", "delete", "ping", "ratelimit")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """prometheus-client's multiprocess directory when `python -m app` runs several workers (it sets it)."""
    return os.environ.get(MULTIPROC_ENV) or None


class WorkerProcessCollector(Collector):
    """The standard process_* metrics of every live worker sharing the multiprocess directory, by pid label."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _pids(self) -> list[int]:
        pids = set()
        for db in self.path.glob("*.db"):
            tail = db.stem.rsplit("_", 1)[-1]
            if tail.isdigit() and Path(f"/proc/{tail}").exists():
                pids.add(int(tail))
        return sorted(pids)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for pid in self._pids():
            for family in ProcessCollector(pid=lambda p=pid: p, registry=None).collect():  # type: ignore[misc]
                out = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    out.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from merged.values()


class _RedisTimer:
    """`with metrics.redis_op(op)`: the round trip's latency, and an error count if it raises."""

    __slots__ = ("_errors", "_seconds", "_start")

    def __init__(self, series: tuple[Any, Any]) -> None:
        self._seconds, self._errors = series

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self._errors.inc()
        self._seconds.observe(time.perf_counter() - self._start)


class Metrics:
    """The service's Prometheus metrics in their own registry.

    With PROMETHEUS_MULTIPROC_DIR set (python -m app with NEXTACT_WORKERS > 1), values live in that directory
    and render() merges every worker's, so one scrape sees the whole process group.
    """

    def __init__(self, namespace: str = "nextact") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self.multiprocess_dir = multiprocess_dir()
        if self.multiprocess_dir is None:  # one process: its own process, GC and platform metrics
            ProcessCollector(registry=r)
            GCCollector(registry=r)
            PlatformCollector(registry=r)
        self.requests = Counter(
            "http_requests",
            "HTTP requests by route template, method and status.",
            ["method", "route", "status"],
            namespace=ns,
            registry=r,
        )
        self.request_seconds = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency by route template, method and status.",
            ["method", "route", "status"],
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight",
            "HTTP requests being served.",
            namespace=ns,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inference_seconds = Histogram(
            "inference_duration_seconds",
            "Time of one ONNX Runtime call (one micro-batch).",
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "inference_batch_size",
            "Windows scored in one ONNX Runtime call.",
            namespace=ns,
            registry=r,
            buckets=_BATCH_BUCKETS,
        )
        self.inference_calls = Counter(
            "inference_calls",
            "ONNX Runtime calls by where they ran: thread (the inference thread) or loop (inline, on the event "
            "loop's thread: an idle service's predictions, NEXTACT_BATCH_INLINE_MAX_MS).",
            ["on"],
            namespace=ns,
            registry=r,
        )
        self._calls = {
            inline: self.inference_calls.labels(on="loop" if inline else "thread") for inline in (False, True)
        }
        self.redis_seconds = Histogram(
            "redis_duration_seconds",
            "Latency of Redis round trips by operation.",
            ["op"],
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.redis_errors = Counter(
            "redis_errors",
            "Redis calls that failed (connection refused, timeout, error reply) by operation.",
            ["op"],
            namespace=ns,
            registry=r,
        )
        self.events_ingested = Counter(
            "events_ingested", "Events newly stored in a user window.", namespace=ns, registry=r
        )
        self.duplicates_dropped = Counter(
            "events_duplicate",
            "Events dropped because their event_id was already stored for that user.",
            namespace=ns,
            registry=r,
        )
        self.unknown_actions = Counter(
            "unknown_actions",
            "Posted events whose action the served model does not know (scored as <unk>).",
            namespace=ns,
            registry=r,
        )
        self.incremental_appends = Counter(
            "incremental_appends",
            "Appends with incremental state by how they were scored: step (from the stored "
            "state) or rebuild (the window from the zero state: new user, late event, other model version).",
            ["path"],
            namespace=ns,
            registry=r,
        )
        self.state_saves = Counter(
            "state_saves",
            "Incremental state written behind the answer, by outcome: stored, stale (another event arrived "
            "first), failed (Redis refused or was unreachable; logged), dropped (too many saves in flight). "
            "Anything but stored makes the user's next append rebuild the state from the window.",
            ["outcome"],
            namespace=ns,
            registry=r,
        )
        self.model_info = Gauge(
            "model_info",
            "The model being served (value 1); labels carry its version.",
            ["model_version", "cell", "window", "vocab_size", "provider"],
            namespace=ns,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_loaded_at = Gauge(
            "model_loaded_timestamp_seconds",
            "When the model being served was loaded (unix time).",
            namespace=ns,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_reloads = Counter(
            "model_reloads",
            "Model reload attempts by result (ok, refused).",
            ["result"],
            namespace=ns,
            registry=r,
        )
        self.rate_limited = Counter(
            "rate_limited", "Requests refused with 429 by the rate limiter.", namespace=ns, registry=r
        )
        self.auth_failures = Counter(
            "auth_failures",
            "Requests refused for authentication, by reason: missing or invalid key (401), "
            "blocked after too many failures from the address (429).",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        for reason in ("missing", "invalid", "blocked"):
            self.auth_failures.labels(reason=reason)
        for result in ("ok", "refused"):
            self.model_reloads.labels(result=result)
        # labelled children looked up once, not on every request (the hot path's metric updates)
        self._redis: dict[str, tuple[Any, Any]] = {}
        self._requests: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        for op in REDIS_OPS:  # every series exists from the start, so rate() and alerts see a zero
            self._redis_series(op)
        self._incremental = {
            True: self.incremental_appends.labels(path="step"),
            False: self.incremental_appends.labels(path="rebuild"),
        }

    def set_model(
        self, *, model_version: str, cell: str, window: int, vocab_size: int, provider: str
    ) -> None:
        """Point model_info at the model now serving (one series at a time)."""
        for labels in list(
            self.model_info._metrics
        ):  # multiprocess mode keeps cleared values on file: zero them
            self.model_info.labels(*labels).set(0)
        self.model_info.clear()
        self.model_info.labels(
            model_version=model_version,
            cell=cell,
            window=str(window),
            vocab_size=str(vocab_size),
            provider=provider,
        ).set(1)
        self.model_loaded_at.set(time.time())

    def redis_op(self, op: str) -> _RedisTimer:
        """Time one Redis round trip (`with metrics.redis_op("append"): ...`); count it as an error if it raises."""
        return _RedisTimer(self._redis_series(op))

    def _redis_series(self, op: str) -> tuple[Any, Any]:
        series = self._redis.get(op)
        if series is None:
            series = self._redis[op] = (self.redis_seconds.labels(op=op), self.redis_errors.labels(op=op))
        return series

    def request_series(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        """The request counter's and latency histogram's children for these labels (looked up once)."""
        key = (method, route, status)
        series = self._requests.get(key)
        if series is None:
            labels = {"method": method, "route": route, "status": str(status)}
            series = (self.requests.labels(**labels), self.request_seconds.labels(**labels))
            self._requests[key] = series
        return series

    def incremental_append(self, stepped: bool) -> None:
        self._incremental[stepped].inc()

    def observe_batch(self, size: int, seconds: float, inline: bool = False) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)
        self._calls[inline].inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for GET /metrics."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)
        merged.register(WorkerProcessCollector(self.multiprocess_dir))
        merged.register(_PidLabelled(GC_COLLECTOR))  # GC of the worker that answers this scrape
        return generate_latest(merged), CONTENT_TYPE_LATEST


class _PidLabelled(Collector):
    """Another collector's metrics with this process's pid as a label."""

    def __init__(self, inner: Collector) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        pid = str(os.getpid())
        for family in self.inner.collect():
            out = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                out.add_sample(sample.name, {**sample.labels, "pid": pid}, sample.value)
            yield out


def _route_template(scope: Scope) -> str:
    """The matched route's path template (bounded label cardinality); unmatched paths share one label."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)  # without {x:convertor}
    return path if isinstance(path, str) else "<unmatched>"


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _REQUEST_ID_OK.fullmatch(text) else None
    return None


class ObservabilityMiddleware:
    """Pure ASGI middleware: request id (taken from a sane incoming X-Request-ID, else new), returned in
    the response header and set for log lines; X-Model-Version on every answer; request count/latency
    metrics; one debug log line per request and an error line for every 5xx."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        model_version: Callable[[], str | None] | None = None,
        auth_enabled: bool = False,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.model_version = model_version
        # with authentication on, only answers to authenticated requests name the model (401, 404, ... do not)
        self.auth_enabled = auth_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or new_id()
        token = request_id_var.set(request_id)
        status_code = 500
        start = time.perf_counter()
        header = (REQUEST_ID_KEY, request_id.encode())

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status_code, started
            if message["type"] == "http.response.start":
                started = True
                status_code = int(message["status"])
                headers = [*message.get("headers", ()), header]
                if (
                    self.model_version is not None
                    and not any(k == MODEL_VERSION_KEY for k, _ in headers)
                    and (not self.auth_enabled or (scope.get("state") or {}).get("principal"))
                ):
                    version = self.model_version()
                    if version:
                        headers.append((MODEL_VERSION_KEY, version.encode()))
                message["headers"] = headers
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status_code = 500
            log.exception("unhandled error in %s %s", scope.get("method", ""), _route_template(scope))
            if started:
                raise
            # answer here, so that even a bug gives a JSON body and the request id to quote in a report
            body = json.dumps(
                {
                    "error": "internal_error",
                    "request_id": request_id,
                    "message": f"internal error (request id {request_id}); see the server log",
                }
            ).encode()
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.in_flight.dec()
            route = _route_template(scope)
            method = scope.get("method", "")
            count, seconds = self.metrics.request_series(method, route, status_code)
            count.inc()
            seconds.observe(elapsed)
            if status_code >= 500 or log.isEnabledFor(logging.DEBUG):
                fields = {
                    "method": method,
                    "route": route,
                    "status": status_code,
                    "duration_ms": round(elapsed * 1000, 3),
                }
                level = logging.ERROR if status_code >= 500 else logging.DEBUG
                log.log(level, "%s %s -> %d", method, route, status_code, extra=fields)
            request_id_var.reset(token)


# attributes every LogRecord has; anything else was passed with extra= and goes into the JSON object
# (uvicorn's color_message is its message with ANSI colours: noise in a JSON line)
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def logging_config(level: str = "info") -> dict[str, Any]:
    """A logging.config.dictConfig dict: JSON lines on stderr for the root logger and uvicorn's loggers.

    Passed to uvicorn as log_config, so every worker process (also those uvicorn spawns) applies it.
    """
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            name: {"handlers": [], "propagate": True, "level": level}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def configure_logging(level: str = "info") -> None:
    """Apply logging_config(level) to this process."""
    logging.config.dictConfig(logging_config(level))


class MeteredWindowStore(WindowStore):
    """The window store with every Redis round trip timed and counted, and stored/duplicate events counted."""

    def __init__(
        self, *args: Any, metrics: Metrics, known: Callable[[str], bool] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics
        self.known = known  # is this action in the served model's vocabulary?

    async def append(self, user_id: str, events: Sequence[NewEvent], capacity: int) -> AppendResult:
        with self.metrics.redis_op("append"):
            result = await super().append(user_id, events, capacity)
        self.metrics.events_ingested.inc(result.accepted)
        self.metrics.duplicates_dropped.inc(result.duplicates)
        if self.known is not None:
            self.metrics.unknown_actions.inc(sum(1 for e in events if not self.known(e.action)))
        return result

    async def append_with_state(
        self, user_id: str, events: Sequence[NewEvent], capacity: int, model_version: str
    ) -> StatefulAppend:
        with self.metrics.redis_op("append"):
            got = await super().append_with_state(user_id, events, capacity, model_version)
        self.metrics.events_ingested.inc(got.result.accepted)
        self.metrics.duplicates_dropped.inc(got.result.duplicates)
        if got.result.accepted:
            self.metrics.incremental_append(got.state is not None)
        if self.known is not None:
            self.metrics.unknown_actions.inc(sum(1 for e in events if not self.known(e.action)))
        return got

    async def save_state(self, user_id: str, seq: int, model_version: str, state: bytes) -> bool:
        with self.metrics.redis_op("save_state"):
            return await super().save_state(user_id, seq, model_version, state)

    async def save_states(self, items: Sequence[StateWrite]) -> list[bool | StoreError]:
        with self.metrics.redis_op("save_state"):  # one observation per write of a turn's saves
            return await super().save_states(items)

    async def actions(self, user_id: str, capacity: int) -> list[str]:
        with self.metrics.redis_op("read"):
            return await super().actions(user_id, capacity)

    async def events(self, user_id: str) -> list[StoredEvent]:
        with self.metrics.redis_op("read"):
            return await super().events(user_id)

    async def delete(self, user_id: str) -> None:
        with self.metrics.redis_op("delete"):
            await super().delete(user_id)

    async def ping(self) -> None:
        with self.metrics.redis_op("ping"):
            await super().ping()

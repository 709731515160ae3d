"""uvicorn's httptools protocol with the limits it lacks: head size and line count, head and body timeouts,
open connections per process, and JSON bodies for the errors it answers itself; and each response's head and
body in one write (`OneWrite`).

uvicorn reads a request head without a size limit and without a time limit when httptools parses it (its
h11_max_incomplete_event_size applies to h11 only, and nothing times out a slow head or body), so these
checks live here, before any request reaches the application:

    head over NEXTACT_HTTP_MAX_HEADER_BYTES        431 (414 when the request line alone is over it)
    more than NEXTACT_HTTP_MAX_HEADERS lines        431
    head not complete within NEXTACT_HTTP_HEADER_TIMEOUT_SECONDS (from the connection's start, or from the
      first byte of a later request on a kept-alive connection)                       408
    body not complete within NEXTACT_HTTP_BODY_TIMEOUT_SECONDS after its head          408
    more than NEXTACT_HTTP_MAX_CONNECTIONS open connections in this process            503 (Retry-After: 1)
    malformed HTTP                                                                      400

Each answer is the service's JSON error shape and closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

import httptools
import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from app.settings import get_settings

log = logging.getLogger("nextact.http")


class HeadRefused(Exception):
    """Raised inside a parser callback to stop reading a request head; answered with `status`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_bytes(status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete HTTP/1.1 response with the JSON error body, closing the connection."""
    body = orjson.dumps({"error": code, "message": message})
    lines = [
        STATUS_LINE[status],
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"connection: close\r\n",
    ]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    return b"".join([*lines, b"\r\n", body])


class OneWrite:
    """A request's transport that sends the response head together with the body's first bytes.

    uvicorn writes the head when the application sends `http.response.start` and the body at the next message:
    two writes, so two system calls and, over TCP with Nagle off, two segments for the client to receive. A
    response whose length is known (Content-Length: every JSON answer of the service) goes out in one write
    here. Chunked responses (streams) and answers to HEAD (no body follows) are written as uvicorn writes them.
    """

    __slots__ = ("_cycle", "_head", "_seen_head", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        # a weak reference: the cycle holds this object as its transport, and a strong one back would make a
        # reference cycle per request, left to the garbage collector (measured: 8 to 18 collections of 25 to
        # 45 ms per 18 s under load, the open-loop p99 at half load 18 -> 49 ms)
        self._cycle = weakref.ref(cycle)
        self._head: bytes | None = None  # the response head, held until the body's first write
        self._seen_head = False

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif not self._seen_head and (cycle := self._cycle()) is not None and cycle.response_started:
            self._seen_head = True  # this write is the response head
            if cycle.chunked_encoding is False and cycle.scope["method"] != "HEAD":
                self._head = data
                return
        self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:  # the application failed between head and body: as uvicorn would, send it
            self._transport.write(self._head)
            self._head = None
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus the limits in this module's docstring (read from the settings of this process)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = get_settings()
        self.max_head = settings.http_max_header_bytes
        self.max_headers = settings.http_max_headers
        self.head_timeout = settings.http_header_timeout_seconds
        self.body_timeout = settings.http_body_timeout_seconds
        self.max_connections = settings.http_max_connections
        self._in_head = True  # reading a request head (or waiting for one)
        self._head_bytes = 0  # bytes received while in the head, an upper bound of its size
        self._line_bytes = 0  # request line plus header lines, as parsed
        self._header_lines = 0
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning(
                "refused a connection: over %d open connections (NEXTACT_HTTP_MAX_CONNECTIONS)",
                self.max_connections,
            )
            self._refuse(
                503,
                "too_many_connections",
                f"the server has {self.max_connections} connections open (NEXTACT_HTTP_MAX_CONNECTIONS); "
                "retry shortly",
                ((b"retry-after", b"1"),),
            )
            return
        self._arm(self.head_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        if self._in_head:
            if self._timer is None:  # the first byte of a later request on a kept-alive connection
                self._arm(self.head_timeout, self._head_timed_out)
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as e:
            refused = e.__context__
            if isinstance(refused, HeadRefused):
                self._refuse(refused.status, refused.code, refused.message)
            else:
                log.debug("invalid HTTP request: %s", e)
                self._refuse(400, "bad_request", f"invalid HTTP request: {e}")
            return
        if self._in_head and self._head_bytes > self.max_head:  # a header line that has not ended yet
            self._refuse(431, "headers_too_large", self._too_large())

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "bad_request", f"invalid HTTP request: {msg}")

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._line_bytes = 0
        self._header_lines = 0

    def on_url(self, url: bytes) -> None:
        self._line_bytes += len(url)
        if self._line_bytes > self.max_head:
            raise HeadRefused(
                414,
                "uri_too_long",
                f"request line over {self.max_head} bytes (NEXTACT_HTTP_MAX_HEADER_BYTES)",
            )
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_lines += 1
        self._line_bytes += len(name) + len(value) + 4
        if self._header_lines > self.max_headers:
            raise HeadRefused(
                431,
                "headers_too_large",
                f"more than {self.max_headers} header lines (NEXTACT_HTTP_MAX_HEADERS)",
            )
        if self._line_bytes > self.max_head:
            raise HeadRefused(431, "headers_too_large", self._too_large())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_head = False
        self._head_bytes = 0
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not None and self.cycle is not previous:  # a new request (its task has not run yet)
            self.cycle.transport = OneWrite(self.transport, self.cycle)  # type: ignore[assignment]
        self._arm(self.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        super().on_message_complete()

    # limits

    def _too_large(self) -> str:
        return f"request head over {self.max_head} bytes (NEXTACT_HTTP_MAX_HEADER_BYTES)"

    def _arm(self, seconds: float, handler: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, handler)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        log.debug("request head not received within %ss", self.head_timeout)
        self._refuse(
            408,
            "request_timeout",
            f"request head not received within {self.head_timeout:g} s (NEXTACT_HTTP_HEADER_TIMEOUT_SECONDS)",
        )

    def _body_timed_out(self) -> None:
        self._timer = None
        log.debug("request body not received within %ss", self.body_timeout)
        if self.cycle is not None and self.cycle.response_started:  # too late for an answer: just close
            self._refuse_quietly()
            return
        self._refuse(
            408,
            "request_timeout",
            f"request body not received within {self.body_timeout:g} s (NEXTACT_HTTP_BODY_TIMEOUT_SECONDS)",
        )

    def _refuse_quietly(self) -> None:
        self._refused = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the application sees http.disconnect; its answer is dropped
            self.cycle.message_event.set()
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse(
        self, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        """Answer `status` with the JSON error shape (unless an answer has begun) and close the connection."""
        started = self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete
        if not self.transport.is_closing() and not started:
            self.transport.write(error_bytes(status, code, message, headers))
        self._refuse_quietly()

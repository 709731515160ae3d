"""OneWrite: a response's head and body leave in one write when the length is known, and as uvicorn writes them
otherwise. The real uvicorn request cycle sends through it; the transport under it records what it is given."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from app.http_server import OneWrite

pytestmark = pytest.mark.anyio


class Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def _cycle(method: str = "POST") -> tuple[RequestResponseCycle, Recording]:
    real = Recording()
    scope: Any = {"type": "http", "method": method, "http_version": "1.1", "headers": []}
    cycle = RequestResponseCycle(
        scope=scope,
        transport=real,
        flow=FlowControl(real),
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=lambda: None,
    )
    cycle.transport = OneWrite(real, cycle)  # type: ignore[assignment]
    return cycle, real


def _start(headers: list[tuple[bytes, bytes]]) -> Any:
    return {"type": "http.response.start", "status": 200, "headers": headers}


async def test_a_response_with_a_length_is_one_write() -> None:
    cycle, real = _cycle()
    await cycle.send(_start([(b"content-length", b"7"), (b"content-type", b"application/json")]))
    assert real.writes == []  # the head waits for the body
    await cycle.send({"type": "http.response.body", "body": b'{"a":1}'})
    assert len(real.writes) == 1
    head, _, body = real.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 7" in head and body == b'{"a":1}'
    # the next response on the kept-alive connection gets a cycle (and a OneWrite) of its own
    assert cycle.response_complete


async def test_an_empty_body_still_sends_the_head() -> None:
    cycle, real = _cycle()
    await cycle.send(_start([(b"content-length", b"0")]))
    await cycle.send({"type": "http.response.body", "body": b""})
    assert len(real.writes) == 1 and real.writes[0].endswith(b"content-length: 0\r\n\r\n")


async def test_chunked_and_head_responses_are_written_as_uvicorn_writes_them() -> None:
    cycle, real = _cycle()
    await cycle.send(_start([]))  # no length: chunked, a stream whose head must not wait
    assert len(real.writes) == 1 and b"transfer-encoding: chunked" in real.writes[0]
    await cycle.send({"type": "http.response.body", "body": b"part", "more_body": True})
    await cycle.send({"type": "http.response.body", "body": b""})
    assert real.writes[1:] == [b"4\r\npart\r\n", b"0\r\n\r\n"]

    cycle, real = _cycle("HEAD")
    await cycle.send(_start([(b"content-length", b"7")]))  # no body follows a HEAD answer
    assert len(real.writes) == 1 and real.writes[0].endswith(b"\r\n\r\n")


async def test_a_head_held_when_the_application_fails_is_sent_before_closing() -> None:
    cycle, real = _cycle()
    await cycle.send(_start([(b"content-length", b"7")]))
    cycle.transport.close()  # what uvicorn does when the application raises after starting the response
    assert len(real.writes) == 1 and real.writes[0].startswith(b"HTTP/1.1 200") and real.closed


async def test_a_request_cycle_is_freed_by_reference_counting_alone() -> None:
    """The cycle holds OneWrite as its transport; OneWrite must not hold the cycle strongly, or every request
    leaves a reference cycle to the garbage collector (collections of 25 to 45 ms under load)."""
    import gc
    import weakref

    cycle, real = _cycle()
    await cycle.send(_start([(b"content-length", b"2")]))
    await cycle.send({"type": "http.response.body", "body": b"{}"})
    assert real.writes == [real.writes[0]] and real.writes[0].endswith(b"\r\n\r\n{}")
    gone = weakref.ref(cycle)
    gc.disable()
    try:
        del cycle
        assert gone() is None  # freed at once, without a collection
    finally:
        gc.enable()

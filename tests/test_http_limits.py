"""Issue 13 item 4 and the edges: head size, header count, slow heads and bodies, open connections, malformed
HTTP and trusted proxies, over real sockets against a real `python -m app` process."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.redis_server import EmbeddedRedis
from tests.service_proc import ServiceProcess

KEY = "k-http-limits-0123456789"
READ_BOUND = 20.0  # a socket read gives up after this: the test fails instead of hanging


def _service(tmp: Path, redis: EmbeddedRedis, artifact: Path, **env: str) -> ServiceProcess:
    base = {
        "NEXTACT_REDIS_URL": redis.url,
        "NEXTACT_ARTIFACT_DIR": str(artifact),
        "NEXTACT_API_KEYS": KEY,
        "NEXTACT_AUTH_FAILURE_LIMIT": "2",
    }
    return ServiceProcess(tmp / "service.log", {**base, **env}).start()


@pytest.fixture(scope="module")
def strict(
    behavior_artifact: Path, redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """Small limits and one-second timeouts; no trusted proxy (the default)."""
    svc = _service(
        tmp_path_factory.mktemp("strict"),
        redis_server,
        behavior_artifact,
        NEXTACT_HTTP_MAX_HEADER_BYTES="4096",
        NEXTACT_HTTP_MAX_HEADERS="20",
        NEXTACT_HTTP_HEADER_TIMEOUT_SECONDS="1",
        NEXTACT_HTTP_BODY_TIMEOUT_SECONDS="1",
    )
    yield svc
    svc.kill()


@pytest.fixture(scope="module")
def behind_proxy(
    behavior_artifact: Path, redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """Trusts X-Forwarded-For from 127.0.0.1; at most 4 open connections."""
    svc = _service(
        tmp_path_factory.mktemp("proxy"),
        redis_server,
        behavior_artifact,
        NEXTACT_FORWARDED_ALLOW_IPS="127.0.0.1",
        NEXTACT_HTTP_MAX_CONNECTIONS="4",
    )
    yield svc
    svc.kill()


def _connect(svc: ServiceProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=READ_BOUND)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def _answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def _exchange(svc: ServiceProcess, payload: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    with _connect(svc) as sock:
        sock.sendall(payload)
        return _answer(_read_all(sock))


def test_normal_requests_and_keep_alive_still_work(strict: ServiceProcess) -> None:
    with httpx.Client(base_url=strict.base_url, headers={"X-API-Key": KEY}, timeout=READ_BOUND) as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and "server" not in health.headers  # no "server: uvicorn"
        time.sleep(0.2)
        assert client.post("/v1/users/u/events", json={"action": "pv"}).status_code == 200


def test_a_head_over_the_size_limit_is_431_json(strict: ServiceProcess) -> None:
    """fails on main: yes (uvicorn with httptools reads any header size)."""
    status, headers, body = _exchange(
        strict, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    )
    assert status == 431 and headers["content-type"] == "application/json"
    assert body == {
        "error": "headers_too_large",
        "message": "request head over 4096 bytes (NEXTACT_HTTP_MAX_HEADER_BYTES)",
    }


def test_a_16_mib_header_is_cut_off_early(strict: ServiceProcess) -> None:
    """The server stops reading after the limit: the client cannot send 16 MiB, or is answered 431."""
    with _connect(strict) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (16 << 20))
            raw = _read_all(sock)
            assert raw.startswith(b"HTTP/1.1 431"), raw[:200]
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: nothing more was read
    assert httpx.get(f"{strict.base_url}/healthz", timeout=READ_BOUND).status_code == 200


def test_too_many_header_lines_is_431_json(strict: ServiceProcess) -> None:
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(25))
    status, _, body = _exchange(strict, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
    assert status == 431 and body["message"] == "more than 20 header lines (NEXTACT_HTTP_MAX_HEADERS)"


def test_an_over_long_request_line_is_414_json(strict: ServiceProcess) -> None:
    status, _, body = _exchange(strict, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414 and body["error"] == "uri_too_long"


def test_malformed_http_is_400_json(strict: ServiceProcess) -> None:
    """fails on main: yes (text/plain "Invalid HTTP request received.")."""
    status, headers, body = _exchange(strict, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")
    assert status == 400 and headers["content-type"] == "application/json"
    assert body["error"] == "bad_request" and body["message"].startswith("invalid HTTP request")


def test_a_slow_head_is_timed_out_with_408(strict: ServiceProcess) -> None:
    """fails on main: yes (the connection stays open as long as the client trickles)."""
    with _connect(strict) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        status, _, body = _answer(_read_all(sock))
    assert status == 408 and body == {
        "error": "request_timeout",
        "message": "request head not received within 1 s (NEXTACT_HTTP_HEADER_TIMEOUT_SECONDS)",
    }


def test_a_connection_that_sends_nothing_is_closed(strict: ServiceProcess) -> None:
    with _connect(strict) as sock:
        status, _, body = _answer(_read_all(sock))
    assert status == 408 and body["error"] == "request_timeout"


def test_a_slow_body_is_timed_out_with_408(strict: ServiceProcess) -> None:
    with _connect(strict) as sock:
        sock.sendall(
            b"POST /v1/users/u/events HTTP/1.1\r\nHost: x\r\nX-API-Key: "
            + KEY.encode()
            + b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"action"'
        )
        status, _, body = _answer(_read_all(sock))
    assert status == 408 and body["message"] == (
        "request body not received within 1 s (NEXTACT_HTTP_BODY_TIMEOUT_SECONDS)"
    )


def test_connections_over_the_limit_get_503(behind_proxy: ServiceProcess) -> None:
    held = [_connect(behind_proxy) for _ in range(4)]
    try:
        for sock in held:  # one answered request each: the server has accepted them, and keeps them open
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b'"ok"}' not in got:
                chunk = sock.recv(4096)
                assert chunk, got
                got += chunk
        with _connect(behind_proxy) as extra:  # answered as soon as it is accepted, before any request
            status, headers, body = _answer(_read_all(extra))
        assert status == 503 and headers["retry-after"] == "1" and body["error"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    for _ in range(50):  # the server notices the closes on its next loop turns
        try:
            if httpx.get(f"{behind_proxy.base_url}/healthz", timeout=READ_BOUND).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    else:
        raise AssertionError("no connection accepted after the held ones closed")


def _wrong_key_statuses(svc: ServiceProcess, forwarded_for: list[str]) -> list[int]:
    with httpx.Client(base_url=svc.base_url, timeout=READ_BOUND) as client:
        return [
            client.get("/v1/model", headers={"X-API-Key": "wrong", "X-Forwarded-For": ip}).status_code
            for ip in forwarded_for
        ]


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(
    strict: ServiceProcess, behind_proxy: ServiceProcess
) -> None:
    """fails on main: yes (uvicorn trusts X-Forwarded-For from 127.0.0.1 by default)."""
    # no trusted proxy: a spoofed header does not give a fresh budget
    assert _wrong_key_statuses(strict, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]) == [401, 401, 429]
    # behind a trusted proxy: each forwarded address has its own budget
    assert _wrong_key_statuses(behind_proxy, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]) == [401, 401, 401]
    assert _wrong_key_statuses(behind_proxy, ["10.0.0.9"] * 3) == [401, 401, 429]

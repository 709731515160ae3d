"""Hardening figures of `python -m app` (issue 13): what a huge header costs, and how long answers take while
Redis hangs (SIGSTOP).

    python -m bench.hardening --artifact DIR [--out bench/results/hardening.json]

Starts its own redis-server and service on loopback ports; writes JSON and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from app.redis_server import EmbeddedRedis
from bench.harness import Child, free_port, http, machine, process_tree_stats, write_json

ROOT = Path(__file__).resolve().parent.parent


def huge_header(port: int, size: int) -> dict[str, Any]:
    """Send a `size`-byte header without a key: how far the client got, what came back, how long it took."""
    start = time.monotonic()
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\nX-Big: ")
            chunk = b"a" * 65536
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
            sock.sendall(b"\r\n\r\n")
        except OSError:
            pass
        try:
            answer = sock.recv(200)
        except OSError:
            pass
    return {
        "header_bytes": size,
        "client_sent_bytes_before_close": sent,
        "answer": answer.split(b"\r\n", 1)[0].decode("latin-1"),
        "seconds": round(time.monotonic() - start, 3),
    }


def paused_redis(port: int, redis_pid: int, requests: int) -> dict[str, Any]:
    """Seconds until each of `requests` concurrent POSTs is answered while Redis is stopped."""

    def one(i: int) -> tuple[int, float]:
        start = time.monotonic()
        status, _ = http(
            "POST", f"http://127.0.0.1:{port}/v1/users/pause-{i}/events", b'{"action": "pv"}', timeout=60
        )
        return status, time.monotonic() - start

    os.kill(redis_pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(requests) as pool:
            answers = list(pool.map(one, range(requests)))
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    return {
        "requests": requests,
        "statuses": sorted({s for s, _ in answers}),
        "slowest_seconds": round(max(t for _, t in answers), 3),
        "fastest_seconds": round(min(t for _, t in answers), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hardening.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis", port=free_port()).start()
        port = free_port()
        env = {
            "NEXTACT_ARTIFACT_DIR": str(args.artifact),
            "NEXTACT_REDIS_URL": redis.url,
            "NEXTACT_PORT": str(port),
            "NEXTACT_API_KEYS": "bench-key-0123456789",
            "NEXTACT_LOG_LEVEL": "warning",
            "NEXTACT_AUTH_FAILURE_LIMIT": "0",
            "NEXTACT_RATE_LIMIT_REQUESTS": "100000",
        }
        service = Child("service", [sys.executable, "-m", "app"], Path(tmp) / "service.log", env).start()
        try:
            _wait(port)
            rss_before = process_tree_stats(service.pid)["rss_mib"]
            headers = [huge_header(port, size) for size in (16 << 20, 64 << 20)]
            rss_after = process_tree_stats(service.pid)["rss_mib"]
            result = {
                "machine": machine(),
                "settings": "defaults (NEXTACT_HTTP_MAX_HEADER_BYTES 16384, NEXTACT_REDIS_TIMEOUT_SECONDS 1, "
                "NEXTACT_REDIS_RETRIES 2, NEXTACT_REDIS_QUEUE_TIMEOUT_SECONDS 5)",
                "huge_headers": headers,
                "service_rss_mib": {"before": rss_before, "after": rss_after},
            }
        finally:
            service.stop()
        # the paused-Redis run needs no key: a service without authentication, rate limiting on
        env.pop("NEXTACT_API_KEYS")
        service = Child("service", [sys.executable, "-m", "app"], Path(tmp) / "service2.log", env).start()
        try:
            _wait(port)
            assert redis.process is not None
            result["redis_paused"] = paused_redis(port, redis.process.pid, requests=100)
            # T (rate-limit check) + Q (free connection) + T x (R + 1) + 0.1 x R + 0.2 (settling the user's
            # pending writes), with the defaults
            result["redis_paused"]["stated_bound_seconds"] = 1 + 5 + 1 * 3 + 0.1 * 2 + 0.2
        finally:
            service.stop()
            redis.stop()
    write_json(args.out, result)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _wait(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http("GET", f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"service on port {port} not up within {timeout}s")


if __name__ == "__main__":
    sys.exit(main())

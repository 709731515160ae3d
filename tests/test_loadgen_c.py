"""bench/loadgen.py's compiled engine (--engine c, bench/loadgen_c.c) against a real HTTP server on loopback."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench import loadgen_c
from bench.harness import PLACEHOLDER
from bench.loadgen import due_offsets

ROOT = Path(__file__).resolve().parent.parent
SLEEP_S = 0.05  # what /slow takes per request

pytestmark = pytest.mark.skipif(
    loadgen_c.compiler() is None, reason="no C compiler (cc, gcc, clang or $CC) to build bench/loadgen_c.c"
)


class Handler(BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1: /slow sleeps, /chunked answers chunked, /nolength answers without a length."""

    protocol_version = "HTTP/1.1"
    server: Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.event_ids.append(json.loads(body)["event_id"])
        if self.path.startswith("/slow"):
            time.sleep(SLEEP_S)
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/nolength"):
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"no length")
            self.close_connection = True
            return
        answer = b'{"ok":true}'
        self.send_response(201 if self.path.startswith("/created") else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: every connection of a run accepted at once

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.event_ids: list[str] = []

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up mid-request is the test's business, not a traceback


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def templates(tmp_path: Path, path: str, n: int = 3) -> Path:
    body = json.dumps({"action": "a", "event_id": PLACEHOLDER}, separators=(",", ":"))
    spec = {"method": "POST", "placeholder": PLACEHOLDER, "requests": [{"path": path, "body": body}] * n}
    out = tmp_path / f"reqs{path.replace('/', '_')}.json"
    out.write_text(json.dumps(spec))
    return out


def loadgen(port: int, reqs: Path, *args: str, engine: str = "c") -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port), "--requests", str(reqs)]
    cmd += ["--engine", engine, "--warmup", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def measured(done: subprocess.CompletedProcess[str]) -> dict:
    assert done.returncode == 0, done.stderr
    result: dict = json.loads(done.stdout)
    return result


def test_closed_loop_counts_every_request_and_makes_every_event_id_unique(
    server: Server, tmp_path: Path
) -> None:
    reqs = templates(tmp_path, "/created")
    port = server.server_address[1]
    out = measured(loadgen(port, reqs, "--max-requests", "120", "--connections", "4", "--tag", "t7-"))
    assert out["engine"] == "c" and out["mode"] == "closed"
    assert out["requests"] == 120 and out["requests_sent"] == 120
    assert out["statuses"] == {"201": 120} and out["ok"] == 120 and out["errors"] == {}
    assert out["sample_response"] == 'HTTP 201: {"ok":true}'
    ids = server.event_ids
    assert len(ids) == 120 and len(set(ids)) == 120
    assert all(len(i) == len(PLACEHOLDER) and i.startswith("t7-") for i in ids)
    assert sorted(ids)[:2] == ["t7-" + "0" * 18, "t7-" + "0" * 17 + "1"]


@pytest.mark.parametrize("engine", ["c", "python"])
def test_open_loop_latency_counts_from_the_due_time(server: Server, tmp_path: Path, engine: str) -> None:
    """One connection to a server that takes 50 ms: offered 100 req/s, requests queue for the connection,
    and that wait is latency (no coordinated omission), whichever engine measures."""
    reqs = templates(tmp_path, "/slow")
    port = server.server_address[1]
    args = ["--mode", "open", "--rate", "100", "--duration", "0.6", "--drain", "0.4", "--connections", "1"]
    out = measured(loadgen(port, reqs, *args, "--seed", "3", engine=engine))
    due = due_offsets(
        argparse.Namespace(
            seed=3, rate=100.0, warmup=0.0, duration=0.6, max_requests=10**6, arrivals="poisson"
        )
    )
    assert out["due_in_window"] == len(due) > 30
    n = out["requests"]
    assert 5 <= n < len(due) and out["not_completed"] == len(due) - n
    assert out["statuses"] == {"200": n} and out["errors"] == {}
    # served one at a time in due order: request j is answered no earlier than (j + 1) sleeps after the first
    # was due, so its latency from its own due time is at least that minus its due offset
    bound = max(due[0] + (j + 1) * SLEEP_S - due[j] for j in range(n))
    lat = out["latency_ms"]
    assert lat["max"] >= bound * 1000 - 1e-6 and bound > 4 * SLEEP_S
    assert lat["p50"] >= SLEEP_S * 1000 and lat["max"] >= lat["p99"] >= lat["p50"]
    assert out["dispatch_lag_ms"]["p50"] is not None


def test_both_engines_print_the_same_object(server: Server, tmp_path: Path) -> None:
    reqs = templates(tmp_path, "/ok")
    port = server.server_address[1]
    for mode in ("closed", "open"):
        args = [
            "--mode",
            mode,
            "--rate",
            "200",
            "--duration",
            "0.3",
            "--drain",
            "0.2",
            "--max-requests",
            "40",
        ]
        py, c = (measured(loadgen(port, reqs, *args, engine=e)) for e in ("python", "c"))
        assert set(c) == set(py) | {"loadgen_wrapper_cpu_s", "requests_sent"}, mode
        assert set(c["latency_ms"]) == set(py["latency_ms"])
        assert py["engine"] == "python" and c["engine"] == "c"
        if mode == "closed":
            assert c["requests"] == py["requests"] == 40
        else:
            assert c["due_in_window"] == py["due_in_window"]  # the same seeded schedule
            assert set(c["dispatch_lag_ms"]) == set(py["dispatch_lag_ms"]) == {"p50", "p99"}
        assert c["loadgen_cpu_s"] >= 0


def test_chunked_answers_are_read_and_unframed_ones_are_protocol_errors(
    server: Server, tmp_path: Path
) -> None:
    port = server.server_address[1]
    out = measured(
        loadgen(port, templates(tmp_path, "/chunked"), "--max-requests", "30", "--connections", "2")
    )
    assert out["statuses"] == {"200": 30} and out["errors"] == {}
    assert out["sample_response"] == "HTTP 200: hello chunked world"
    out = measured(
        loadgen(port, templates(tmp_path, "/nolength"), "--max-requests", "5", "--connections", "1")
    )
    assert out["requests"] == 0 and out["errors"] == {"ProtocolError": 5}


def test_bad_input_says_what_is_wrong(server: Server, tmp_path: Path) -> None:
    port = server.server_address[1]
    reqs = templates(tmp_path, "/ok")
    done = loadgen(port, reqs, "--tag", "x" * len(PLACEHOLDER))
    assert done.returncode == 2 and "no room for ids" in done.stderr
    empty = tmp_path / "empty.json"
    empty.write_text('{"requests": []}')
    done = loadgen(port, empty)
    assert done.returncode != 0 and "no requests" in done.stderr
    srv = Server()  # a port nothing listens on any more
    closed_port = srv.server_address[1]
    srv.server_close()
    done = loadgen(closed_port, reqs, "--duration", "0.2")
    assert done.returncode == 2 and f"cannot connect to 127.0.0.1 port {closed_port}" in done.stderr


def test_binary_is_built_on_demand_and_rebuilt_when_the_source_is_newer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = loadgen_c.ensure_binary(build_dir=tmp_path)
    assert binary == tmp_path / "loadgen_c" and os.access(binary, os.X_OK)
    assert loadgen_c.ensure_binary(build_dir=tmp_path).stat().st_mtime_ns == binary.stat().st_mtime_ns
    old = loadgen_c.SOURCE.stat().st_mtime - 100
    os.utime(binary, (old, old))
    assert loadgen_c.ensure_binary(build_dir=tmp_path).stat().st_mtime > old
    # no compiler: a clear error that names the way out, rather than a traceback
    os.utime(binary, (old, old))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.raises(loadgen_c.EngineError, match="no cc, gcc or clang.*use --engine python"):
        loadgen_c.ensure_binary(build_dir=tmp_path)

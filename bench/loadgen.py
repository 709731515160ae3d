"""HTTP/1.1 keep-alive load generator on raw asyncio sockets, run as its own process.

    python bench/loadgen.py --port 8000 --requests reqs.json --mode closed --connections 64 --duration 15
    python bench/loadgen.py --port 8000 --requests reqs.json --mode open --rate 2000 --duration 15
    python bench/loadgen.py --port 8000 --requests reqs.json --mode open --rate 2000 --engine c

engine: python (default) runs the loop below in this process (uvloop when installed); c runs the same
        semantics in a compiled program (bench/loadgen_c.c, epoll, built with `cc -O2` on first use into
        build/loadgen/), which costs the shared machine a fraction of the CPU and adds less of its own
        delay to every latency (docs/performance.md, "Load generator engines"). Same output either way.

closed: every connection sends its next request as soon as the previous answer arrives (throughput at saturation).
open:   requests are due at Poisson (or uniform) arrival times at a fixed offered rate, whatever the server does;
        latency is measured from the dispatch time, so time spent queued for a free connection counts
        (no coordinated omission); the client's own timer lag (~1 ms granularity) is not charged to the server.

The requests file is JSON: {"method": "POST", "requests": [{"path": ..., "body": ...}, ...], "placeholder": "..."}.
Each body may contain the placeholder once; every request replaces it with a unique id of the same length, so
body sizes stay fixed and no event is a duplicate. Prints one JSON object (or writes it to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MAX_REQUESTS = 2_000_000  # hard bound on requests per run, whatever the duration


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 this client understands."""


@dataclass
class Templates:
    """Pre-encoded request parts: head + body prefix, unique id goes in between, then body suffix."""

    parts: list[tuple[bytes, bytes]]
    id_len: int
    tag: str

    @classmethod
    def load(cls, path: Path, host: str, tag: str) -> Templates:
        spec = json.loads(path.read_text())
        method = spec.get("method", "POST")
        placeholder = spec.get("placeholder", "")
        parts = []
        for r in spec["requests"]:
            body = r["body"].encode()
            ph = placeholder.encode()
            if ph and ph in body:
                pre, post = body.split(ph, 1)
            else:
                pre, post = body, b""
            head = (
                f"{method} {r['path']} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            parts.append((head + pre, post))
        if not parts:
            raise SystemExit(f"{path}: no requests")
        return cls(parts, len(placeholder), tag)

    def build(self, n: int) -> bytes:
        pre, post = self.parts[n % len(self.parts)]
        if not self.id_len:
            return pre + post
        digits = self.id_len - len(self.tag)
        return pre + f"{self.tag}{n % 10**digits:0{digits}d}".encode() + post


@dataclass
class Stats:
    recording_from: float
    recording_until: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    sample: str = ""
    sample_status: int = 0

    def record(self, due: float, done: float, status: int, body: bytes) -> None:
        if not (self.recording_from <= due and done <= self.recording_until):
            return
        self.latencies.append(done - due)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        # the first answer, replaced once by the first error answer: the sample says what went wrong
        if not self.sample_status or (status >= 400 and self.sample_status < 400):
            self.set_sample(status, body)

    def set_sample(self, status: int, body: bytes) -> None:
        self.sample_status = status
        self.sample = f"HTTP {status}: {body[:600].decode(errors='replace')}"

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Connection:
    """One keep-alive connection: send a request, read exactly one response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        try:
            status = int(head[9:12])
        except ValueError as e:
            raise ProtocolError(f"bad status line {head[:40]!r}") from e
        length = -1
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            body = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                body += await self.reader.readexactly(size + 2)
                del body[-2:]
            return status, bytes(body)
        if length < 0:
            raise ProtocolError("response without Content-Length")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _connect_all(host: str, port: int, n: int) -> list[Connection]:
    return list(await asyncio.gather(*(Connection.open(host, port) for _ in range(n))))


async def closed_loop(args: argparse.Namespace, tpl: Templates) -> dict:
    conns = await _connect_all(args.host, args.port, args.connections)
    t0 = time.perf_counter()
    stats = Stats(t0 + args.warmup, t0 + args.warmup + args.duration)
    end = stats.recording_until
    counter = iter(range(args.max_requests))

    async def worker(conn: Connection) -> None:
        for n in counter:
            start = time.perf_counter()
            if start >= end:
                return
            try:
                status, body = await asyncio.wait_for(conn.exchange(tpl.build(n)), args.timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError) as e:
                stats.error(type(e).__name__)
                conn.close()
                if time.perf_counter() >= end:
                    return
                conn = await Connection.open(args.host, args.port)
                continue
            stats.record(start, time.perf_counter(), status, body)

    try:
        await asyncio.wait_for(
            asyncio.gather(*(worker(c) for c in conns)), args.warmup + args.duration + args.timeout + 5
        )
    finally:
        for c in conns:
            c.close()
    return summarise(stats, args.duration, offered=None)


def due_offsets(args: argparse.Namespace) -> list[float]:
    """Open loop: every request's due time in seconds from the start, fixed in advance and seeded (both engines
    offer the same schedule): a Poisson process (exponential gaps) or evenly spaced."""
    rng = random.Random(args.seed)
    horizon = args.warmup + args.duration
    n_total = min(args.max_requests, math.ceil(args.rate * horizon))
    due, t = [], 0.0
    for _ in range(n_total):
        t += rng.expovariate(args.rate) if args.arrivals == "poisson" else 1.0 / args.rate
        if t > horizon:
            break
        due.append(t)
    return due


def open_tail(out: dict, due: list[float], recording_from: float, lags: list[float], errors: int) -> dict:
    """The open loop's extra keys: requests due in the window, the dispatch lag, what never completed."""
    recorded_due = sum(1 for d in due if d >= recording_from)
    out["due_in_window"] = recorded_due
    lags = sorted(lags)
    out["dispatch_lag_ms"] = {
        q: round(percentile(lags, v) * 1000, 3) if lags else None for q, v in (("p50", 50), ("p99", 99))
    }
    # requests due in the window that never completed within the drain time count against the server
    out["not_completed"] = max(0, recorded_due - out["requests"] - errors)
    return out


async def open_loop(args: argparse.Namespace, tpl: Templates) -> dict:
    conns = await _connect_all(args.host, args.port, args.connections)
    queue: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    t0 = time.perf_counter() + 0.05
    stats = Stats(t0 + args.warmup, t0 + args.warmup + args.duration + args.drain)
    due = [t0 + d for d in due_offsets(args)]
    stop_at = t0 + args.warmup + args.duration + args.drain
    lags: list[float] = []

    async def scheduler() -> None:
        i = 0
        while i < len(due):
            now = time.perf_counter()
            while i < len(due) and due[i] <= now:
                # latency counts from the due time, so the load generator's own lag (timer wake-ups are
                # ~1 ms coarse; on a shared machine the server takes its CPU) and waiting for a free
                # connection both count against the server: no coordinated omission. The lag is reported.
                lags.append(now - due[i])
                queue.put_nowait((i, due[i]))
                i += 1
            if i < len(due):
                # never spin: a sub-millisecond sleep returns at once on uvloop and would burn a core
                await asyncio.sleep(max(0.001, due[i] - time.perf_counter()))
        for _ in conns:
            queue.put_nowait((-1, 0.0))

    async def worker(conn: Connection) -> None:
        while True:
            n, d = await queue.get()
            if n < 0 or time.perf_counter() >= stop_at:
                return
            try:
                status, body = await asyncio.wait_for(conn.exchange(tpl.build(n)), args.timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError) as e:
                stats.error(type(e).__name__)
                conn.close()
                conn = await Connection.open(args.host, args.port)
                continue
            stats.record(d, time.perf_counter(), status, body)

    try:
        tasks = [asyncio.ensure_future(worker(c)) for c in conns]
        await scheduler()
        await asyncio.wait(tasks, timeout=max(0.0, stop_at - time.perf_counter()) + 1)
        for task in tasks:
            task.cancel()
    finally:
        for c in conns:
            c.close()
    out = summarise(stats, args.duration, offered=args.rate)
    return open_tail(out, due, stats.recording_from, lags, sum(stats.errors.values()))


def c_engine(args: argparse.Namespace, tpl: Templates) -> dict:
    """The same measurement by the compiled engine (bench/loadgen_c.c), summarised the same way."""
    from bench import loadgen_c

    open_mode = args.mode == "open"
    due = due_offsets(args) if open_mode else []
    run = loadgen_c.run(
        host=args.host,
        port=args.port,
        mode=args.mode,
        parts=tpl.parts,
        id_len=tpl.id_len,
        tag=tpl.tag,
        due=due,
        connections=args.connections,
        warmup=args.warmup,
        duration=args.duration,
        drain=args.drain,
        timeout=args.timeout,
        max_requests=args.max_requests,
    )
    # times relative to the engine's start: only the recording window's start matters here
    stats = Stats(args.warmup, args.warmup + args.duration, list(run.latencies), run.statuses, run.errors)
    if run.sample_status:
        stats.set_sample(run.sample_status, run.sample_body)
    out = summarise(stats, args.duration, offered=args.rate if open_mode else None, cpu_s=run.cpu_s)
    out["loadgen_loop_cpu_s"] = round(run.cpu_s, 3)  # the whole C process: it does nothing but the loop
    # this process's CPU (start-up, templates, due times, summary) is outside the measured window: apart
    out["loadgen_wrapper_cpu_s"] = round(cpu_seconds(), 2)
    out["requests_sent"] = run.sent
    if open_mode:
        out = open_tail(out, due, args.warmup, list(run.lags), sum(run.errors.values()))
    return out


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def summarise(stats: Stats, duration: float, offered: float | None, cpu_s: float | None = None) -> dict:
    """The printed object; cpu_s: the load generator's CPU seconds (default: this process's)."""
    lat = sorted(stats.latencies)
    ok = sum(v for k, v in stats.statuses.items() if 200 <= k < 300)
    if cpu_s is None:
        cpu_s = cpu_seconds()
    ms = lambda q: round(percentile(lat, q) * 1000, 3) if lat else None
    return {
        "requests": len(lat),
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "errors": stats.errors,
        "duration_s": duration,
        "rps": round(ok / duration, 1),
        "offered_rps": offered,
        "latency_ms": {
            "p50": ms(50),
            "p90": ms(90),
            "p99": ms(99),
            "p99.9": ms(99.9),
            "max": round(lat[-1] * 1000, 3) if lat else None,
            "mean": round(sum(lat) / len(lat) * 1000, 3) if lat else None,
        },
        "loadgen_cpu_s": round(cpu_s, 2),
        "sample_response": stats.sample,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--requests", type=Path, required=True, help="JSON file of request templates")
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rate", type=float, default=1000.0, help="open loop: offered requests per second")
    p.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (after warm-up)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load not recorded")
    p.add_argument("--drain", type=float, default=2.0, help="open loop: seconds to wait for late answers")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds")
    p.add_argument("--max-requests", type=int, default=MAX_REQUESTS)
    p.add_argument("--tag", default="", help="prefix of the unique ids (keeps runs from colliding)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--engine",
        choices=["python", "c"],
        default="python",
        help="python: this process (asyncio); c: the compiled engine, bench/loadgen_c.c (needs a C compiler)",
    )
    args = p.parse_args(argv)
    args.max_requests = min(args.max_requests, MAX_REQUESTS)
    tpl = Templates.load(args.requests, f"{args.host}:{args.port}", args.tag)
    if args.engine == "c":
        from bench.loadgen_c import EngineError

        try:
            measured = c_engine(args, tpl)
        except EngineError as e:
            sys.stderr.write(f"loadgen.py --engine c: {e}\n")
            return 2
    else:
        run = closed_loop if args.mode == "closed" else open_loop
        start_cpu = cpu_seconds()
        try:
            import uvloop

            measured = uvloop.run(run(args, tpl))
        except ImportError:
            measured = asyncio.run(run(args, tpl))
        measured["loadgen_loop_cpu_s"] = round(cpu_seconds() - start_cpu, 3)
    result = {
        "mode": args.mode,
        "connections": args.connections,
        "pid": os.getpid(),
        "engine": args.engine,
        **measured,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

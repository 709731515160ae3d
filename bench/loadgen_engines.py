"""The load generator itself, measured: bench/loadgen.py's python engine against its compiled one (--engine c).

    python bench/loadgen_engines.py          # ~4 minutes: writes bench/results/loadgen_engines.{json,md}

Both engines load the same trivial server, the bare-FastAPI ceiling (bench/baseline_apps.py ceiling, one
uvicorn worker), with the same requests as bench/run.py's, A/B interleaved per round: open loops (Poisson,
the same seeded schedule for both) at each --rates, then a closed loop at --connections. Per run: the client's
CPU seconds per 1,000 requests it sent, the latency it reports, its dispatch lag, and the server's CPU per
request. Whatever the server does is the same for both engines, so the difference between their latencies
is what the client adds (its own scheduling delay, and the CPU it takes from the server on a small machine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import (
    RESULTS,
    SAMPLE_DATA,
    BenchError,
    Child,
    free_port,
    machine,
    process_tree_stats,
    read_sequences,
    wait_ready,
    write_json,
)
from bench.run import probe, request_templates
from bench.service_table import fmt

ENGINES = ("python", "c")


def one_run(
    port: int,
    server_pid: int,
    templates: Path,
    work: Path,
    engine: str,
    phase: dict[str, Any],
    args: argparse.Namespace,
    tag: str,
) -> dict[str, Any]:
    out = work / f"{tag}.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "loadgen.py"),
        "--port",
        str(port),
        "--requests",
        str(templates),
    ]
    cmd += ["--engine", engine, "--duration", str(args.duration), "--warmup", str(args.warmup)]
    cmd += ["--tag", tag, "--out", str(out), "--seed", str(args.seed)]
    if phase["mode"] == "open":
        cmd += ["--mode", "open", "--rate", str(phase["rate"]), "--connections", str(args.open_connections)]
    else:
        cmd += ["--mode", "closed", "--connections", str(args.connections)]
    load_before = os.getloadavg()[0]
    before = process_tree_stats(server_pid)["cpu_s"]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.duration + 90, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"load generator failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    server_cpu = process_tree_stats(server_pid)["cpu_s"] - before
    res: dict[str, Any] = json.loads(out.read_text())
    # requests the client sent: the C engine counts them; the python engine's open loop sends every due one
    sent = res.get("requests_sent")
    if sent is None:
        total = args.warmup + args.duration
        sent = round(res["requests"] * total / args.duration) if phase["mode"] == "closed" else None
        sent = sent if sent is not None else due_count(phase["rate"], args)
    client_cpu = res["loadgen_cpu_s"] + res.get("loadgen_wrapper_cpu_s", 0.0)
    return {
        "engine": engine,
        "phase": phase["name"],
        "load_average_1m": round(load_before, 2),
        "requests_sent": sent,
        "answered_rps": res["rps"],
        "latency_ms": res["latency_ms"],
        "dispatch_lag_ms": res.get("dispatch_lag_ms"),
        "errors": res["errors"],
        "not_completed": res.get("not_completed"),
        "client_cpu_s": round(client_cpu, 3),
        "client_cpu_s_per_1000": round(client_cpu * 1000 / sent, 4) if sent else None,
        "loop_cpu_s_per_1000": round(res["loadgen_loop_cpu_s"] * 1000 / sent, 4) if sent else None,
        "server_cpu_ms_per_request": round(server_cpu * 1000 / sent, 4) if sent else None,
    }


def due_count(rate: float, args: argparse.Namespace) -> int:
    from bench.loadgen import MAX_REQUESTS, due_offsets

    ns = argparse.Namespace(
        seed=args.seed,
        rate=rate,
        warmup=args.warmup,
        duration=args.duration,
        max_requests=MAX_REQUESTS,
        arrivals="poisson",
    )
    return len(due_offsets(ns))


def _median_of(rs: list[dict[str, Any]]) -> Any:
    def med(f: Any) -> float | None:
        return round(statistics.median(f(r) for r in rs), 3) if rs else None

    return med


def summary(runs: list[dict[str, Any]], phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per phase and engine: the median over rounds of each figure."""
    rows = []
    for ph in phases:
        for engine in ENGINES:
            rs = [r for r in runs if r["phase"] == ph["name"] and r["engine"] == engine]
            med = _median_of(rs)
            rows.append(
                {
                    "phase": ph["name"],
                    "engine": engine,
                    "rounds": len(rs),
                    "answered_rps": med(lambda r: r["answered_rps"]),
                    "p50_ms": med(lambda r: r["latency_ms"]["p50"]),
                    "p99_ms": med(lambda r: r["latency_ms"]["p99"]),
                    "dispatch_lag_p99_ms": (
                        med(lambda r: r["dispatch_lag_ms"]["p99"]) if ph["mode"] == "open" else None
                    ),
                    "client_cpu_s_per_1000": med(lambda r: r["client_cpu_s_per_1000"]),
                    "loop_cpu_s_per_1000": med(lambda r: r["loop_cpu_s_per_1000"]),
                    "server_cpu_ms_per_request": med(lambda r: r["server_cpu_ms_per_request"]),
                    "load_average_1m": [r["load_average_1m"] for r in rs],
                }
            )
    return rows


def markdown(res: dict[str, Any]) -> str:
    mach, cfg = res["machine"], res["config"]
    lines = [
        "# Load generator engines: python (asyncio) vs c (epoll), against the bare-FastAPI ceiling",
        "",
        f"- date: {mach['date']}; {mach['cpu']}, {mach['cpu_count']} CPUs, shared with other jobs",
        f"- load average (1 min) at start / end: {mach['load_average_at_start']} / {res['load_average_at_end']}",
        (
            f"- {cfg['rounds']} rounds, engines A/B interleaved; {cfg['warmup']} s warm-up + {cfg['duration']} s "
            f"measured per run; open loops at {cfg['open_connections']} connections, closed at "
            f"{cfg['connections']}; medians over rounds"
        ),
        f"- command: `{cfg['command']}`",
        "",
        (
            "| phase | engine | answered req/s | p50 ms | p99 ms | dispatch lag p99 ms | client loop CPU s "
            "per 1,000 req | client total CPU s per 1,000 req | server CPU ms/req | load avg per round |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["summary"]:
        lines.append(
            f"| {r['phase']} | {r['engine']} | {fmt(r['answered_rps'], ',.0f')} | {fmt(r['p50_ms'])} "
            f"| {fmt(r['p99_ms'])} | {fmt(r['dispatch_lag_p99_ms'])} | {fmt(r['loop_cpu_s_per_1000'], '.3f')} "
            f"| {fmt(r['client_cpu_s_per_1000'], '.3f')} "
            f"| {fmt(r['server_cpu_ms_per_request'], '.3f')} | {', '.join(str(x) for x in r['load_average_1m'])} |"
        )
    lines += [
        "",
        (
            "Client CPU per 1,000 requests sent (warm-up included): *loop* is what the client spent while it "
            "loaded the server (python: the asyncio loop; c: the whole compiled program); *total* adds its "
            "start-up outside the measured window (python: interpreter, templates, due times; c: the python "
            "wrapper's). Latency counts from each request's due time (open) or send time (closed). The server "
            "CPU is the ceiling process's, per request sent."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="100,1000", help="open-loop rates, comma-separated")
    p.add_argument("--no-closed", action="store_true", help="leave out the closed-loop phase")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--open-connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--templates", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=RESULTS / "loadgen_engines", help="results path without suffix"
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from bench.loadgen_c import ensure_binary

    ensure_binary()  # built before any clock runs
    phases: list[dict[str, Any]] = [
        {"name": f"open {float(r):,.0f} req/s", "mode": "open", "rate": float(r)}
        for r in args.rates.split(",")
    ]
    if not args.no_closed:
        phases.append({"name": f"closed {args.connections} connections", "mode": "closed"})
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="nextact-lgeng-"))
    rng = random.Random(args.seed)
    templates = work / "requests.json"
    request_templates(templates, read_sequences(SAMPLE_DATA, "item_id"), 10_000, args.templates, rng)
    result: dict[str, Any] = {
        "machine": machine(),
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "command": " ".join(["python", "bench/loadgen_engines.py", *(argv or sys.argv[1:])]),
        },
    }
    port = free_port()
    cmd = [sys.executable, str(ROOT / "bench" / "baseline_apps.py"), "ceiling", "--port", str(port)]
    server = Child("ceiling", cmd, work / "ceiling.log").start()
    runs: list[dict[str, Any]] = []
    try:
        wait_ready(server, port, probe(templates, "probe"))
        n = 0
        for round_no in range(args.rounds):
            for ph in phases:
                # A/B, then B/A the next round: neither engine always runs first
                for engine in ENGINES if round_no % 2 == 0 else ENGINES[::-1]:
                    n += 1
                    r = one_run(port, server.pid, templates, work, engine, ph, args, f"r{n}-")
                    r["round"] = round_no
                    runs.append(r)
                    lat = r["latency_ms"]
                    print(
                        f"    round {round_no} {ph['name']:24} {engine:6} {r['answered_rps']:8.1f} req/s  "
                        f"p50 {fmt(lat['p50'])}  p99 {fmt(lat['p99'])} ms  client "
                        f"{fmt(r['client_cpu_s_per_1000'], '.3f')} CPU s/1000  load {r['load_average_1m']}",
                        flush=True,
                    )
    finally:
        server.stop()
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["runs"] = runs
    result["summary"] = summary(runs, phases)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    write_json(args.out.with_suffix(".json"), result)
    args.out.with_suffix(".md").write_text(markdown(result))
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        sys.exit(1)

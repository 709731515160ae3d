"""Where nextact's latency goes under open load: per-stage timings, GC pauses and event-loop lag.

    python bench/tail.py            # ~2 minutes: writes bench/results/tail.json and tail.md
    python bench/tail.py --quick    # shorter phases: bench/results/tail_quick.{json,md}

One nextact server (one uvicorn worker, NEXTACT_STAGE_TIMINGS=true, every other setting at its default) on
a real Redis pre-filled like bench/run.py's. Phases: a closed loop at --connections (the saturated
throughput), then open loops with Poisson arrivals (no coordinated omission) at half that throughput and at
--low-rate req/s. Before each phase GET /debug/timings?reset=true empties the server's samples; after it the
server's breakdown (app/timings.py: stages, GC pauses, loop lag) is fetched and written next to the client's
latency. The server's samples include the load generator's warm-up requests. `--client c` loads with the
compiled engine of bench/loadgen.py (less CPU and less delay of its own; docs/performance.md).

Redis runs with `appendfsync everysec` unless `--appendfsync always` (the embedded server's default, the
durable setting): then every append pipeline waits for a disk flush, and the disk's own flush latency
(`fsync_probe`: small appends, each followed by fsync, in Redis's directory) is measured before the phases
and written beside them, so that a tail the disk causes is told apart from the service's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.timings import STAGES  # the server's own list: the table's columns
from bench.harness import (
    RESULTS,
    BenchError,
    Child,
    free_port,
    http,
    machine,
    make_windows,
    read_sequences,
    wait_ready,
    write_json,
)
from bench.run import (
    add_client_option,
    ensure_artifact,
    ensure_step,
    fmt,
    measure,
    population_source,
    prefill,
    probe,
    request_templates,
)


def breakdown(port: int, reset: bool) -> dict[str, Any]:
    status, body = http(
        "GET", f"http://127.0.0.1:{port}/debug/timings{'?reset=true' if reset else ''}", timeout=30
    )
    if status != 200:
        raise BenchError(f"GET /debug/timings answered {status}: is NEXTACT_STAGE_TIMINGS on? {body[:200]!r}")
    result: dict[str, Any] = json.loads(body)
    return result


def model_calls(port: int) -> dict[str, float]:
    """nextact_inference_calls_total by where the calls ran (thread, loop = inline), from /metrics."""
    status, body = http("GET", f"http://127.0.0.1:{port}/metrics", timeout=30)
    if status != 200:
        raise BenchError(f"GET /metrics answered {status}: {body[:200]!r}")
    calls = {"thread": 0.0, "loop": 0.0}
    for line in body.decode().splitlines():
        for on in calls:
            if line.startswith(f'nextact_inference_calls_total{{on="{on}"}} '):
                calls[on] = float(line.split()[-1])
    return calls


def inline_share(ph: dict[str, Any]) -> str:
    calls = ph.get("model_calls")
    if not calls or not sum(calls.values()):
        return "n/a"
    return f"{calls['loop'] / sum(calls.values()):.0%}"


def fsync_probe(directory: Path, n: int = 500) -> dict[str, Any]:
    """The disk's flush latency where Redis writes its append-only file: n 64-byte appends, each fsynced."""
    path = directory / "fsync-probe.bin"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, b"x" * 64)
            os.fsync(fd)
            times.append((time.perf_counter() - t) * 1000.0)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    times.sort()

    def q(f: float) -> float:
        return round(times[min(len(times) - 1, int(f * len(times)))], 3)

    return {
        "writes": n,
        "p50_ms": q(0.50),
        "p90_ms": q(0.90),
        "p99_ms": q(0.99),
        "max_ms": round(times[-1], 3),
    }


def markdown(res: dict[str, Any]) -> str:
    mach, cfg = res["machine"], res["config"]
    lines = [
        f"# nextact tail latency breakdown ({'quick' if cfg['quick'] else 'full'})",
        "",
        (
            f"- date: {mach['date']}; {mach['cpu']}, {mach['cpu_count']} CPUs; load average at start / end: "
            f"{mach['load_average_at_start']} / {res['load_average_at_end']}"
        ),
        f"- model: {res['model']}; population {cfg['users']:,} users with full windows",
        f"- {cfg['warmup']} s warm-up + {cfg['duration']} s measured per phase; command: `{cfg['command']}`",
        f"- Redis `appendfsync {cfg.get('appendfsync', 'everysec')}`"
        + (
            "; the disk's own flush latency (write + fsync of 64 bytes, {writes} times, before the phases): "
            "p50 {p50_ms} / p90 {p90_ms} / p99 {p99_ms} / max {max_ms} ms".format(**res["fsync_probe"])
            if res.get("fsync_probe")
            else ""
        ),
        "",
        (
            f"Client view (loadgen.py, engine {cfg.get('client', 'python')}; open loop counts from the "
            "scheduled send time):"
        ),
        "",
        (
            "| phase | offered req/s | answered req/s | p50 | p90 | p99 ms | server CPU ms/req | mean batch "
            "| model calls inline |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ph in res["phases"]:
        c = ph["client"]
        lat = c["latency_ms"]
        batch = (c.get("batch_size") or {}).get("mean")
        lines.append(
            f"| {ph['name']} | {fmt(ph.get('offered_rps'), ',.0f')} | {fmt(c['rps'], ',.0f')} | {fmt(lat['p50'])} "
            f"| {fmt(lat['p90'])} | {fmt(lat['p99'])} | {fmt(c['server_cpu_ms_per_request'], '.3f')} "
            f"| {fmt(batch)} | {inline_share(ph)} |"
        )
    lines += [
        "",
        "Server view, per stage (GET /debug/timings; ms, p50 / p99):",
        "",
        "| phase | " + " | ".join(STAGES) + " |",
        "|---|" + "---:|" * len(STAGES),
    ]
    for ph in res["phases"]:
        st = ph["server"]["stages_ms"]
        cells = [f"{fmt(st[s].get('p50'))} / {fmt(st[s].get('p99'))}" for s in STAGES]
        lines.append(f"| {ph['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "GC pauses and event-loop lag (5 ms probe) in the server, per phase:",
        "",
        (
            "| phase | seconds | GC pauses | GC total ms | gen 0 / 1 / 2 ms | longest GC ms | loop lag p50 | p99 "
            "| max ms |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ph in res["phases"]:
        s = ph["server"]
        g, lag = s["gc"], s["loop_lag_ms"]
        gens = " / ".join(fmt(x, ".1f") for x in g["by_generation_ms"])
        lines.append(
            f"| {ph['name']} | {s['seconds']:.1f} | {g['pauses']:,} | {fmt(g['total_ms'], '.1f')} | {gens} "
            f"| {fmt(g['pause_ms'].get('max'))} | {fmt(lag.get('p50'))} | {fmt(lag.get('p99'))} "
            f"| {fmt(lag.get('max'))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short phases (5 s measured)")
    p.add_argument("--artifact-dir", type=Path, default=ROOT / "artifacts" / "beauty")
    p.add_argument("--data", type=Path, help="events for the population (default: the model's training file)")
    p.add_argument(
        "--train-epochs", type=int, default=3, help="epochs when the model has to be trained first"
    )
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--templates", type=int, default=20_000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--open-connections", type=int, default=64)
    p.add_argument("--low-rate", type=float, default=100.0, help="the second open-loop rate")
    p.add_argument("--rate", type=float, help="the first open-loop rate (default: half the saturated req/s)")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--max-requests", type=int, default=300_000)
    p.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra server environment"
    )
    p.add_argument(
        "--out", type=Path, help="results path without suffix (default bench/results/tail[_quick])"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--appendfsync",
        choices=["everysec", "always", "no"],
        default="everysec",
        help="Redis persistence (always: the embedded server's durable default; the disk's flush latency is probed)",
    )
    add_client_option(p)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.duration, args.warmup = min(args.duration, 5.0), min(args.warmup, 1.5)
    out = args.out or RESULTS / ("tail_quick" if args.quick else "tail")
    started = time.monotonic()

    from app.manifest import read_manifest
    from app.redis_server import EmbeddedRedis

    art = ensure_artifact(args)
    manifest = read_manifest(art)
    data, col = population_source(manifest, args)
    rng = random.Random(args.seed)
    sequences = read_sequences(data, col)
    windows = make_windows(sequences, args.users, manifest.window, rng)
    work = Path(tempfile.mkdtemp(prefix="nextact-tail-"))
    templates = work / "requests.json"
    request_templates(templates, sequences, args.users, args.templates, rng)
    result: dict[str, Any] = {
        "machine": machine(),
        "model": (
            f"{manifest.cell.upper()}, vocabulary {manifest.vocab_size:,}, window {manifest.window}, "
            f"embedding {manifest.embedding_dim}, hidden {manifest.hidden_dim}"
        ),
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "command": " ".join(["python", "bench/tail.py", *(argv or sys.argv[1:])]),
        },
    }
    redis = EmbeddedRedis(work / "redis", port=0, appendfsync=args.appendfsync)
    if args.appendfsync == "always":
        (work / "redis").mkdir(parents=True, exist_ok=True)
        result["fsync_probe"] = fsync_probe(work / "redis")
    server: Child | None = None
    phases: list[dict[str, Any]] = []
    try:
        redis.start()
        assert redis.process is not None
        print(f"==> Redis on {redis.url}: pre-filling {args.users:,} users", flush=True)
        # with each user's state, as the service (incremental state by default) keeps them: steady state
        stepped = ensure_step(art) if (art / "step.onnx").exists() else None
        asyncio.run(prefill(redis.url, windows, manifest.window, "nextact", stepped))
        port = free_port()
        env = {
            "NEXTACT_REDIS_URL": redis.url,
            "NEXTACT_ARTIFACT_DIR": str(art),
            "NEXTACT_LOG_LEVEL": "warning",
            "NEXTACT_HOST": "127.0.0.1",
            "NEXTACT_WORKERS": "1",
            "NEXTACT_PORT": str(port),
            "NEXTACT_STAGE_TIMINGS": "true",
            **dict(e.split("=", 1) for e in args.env),
        }
        server = Child("nextact", [sys.executable, "-m", "app"], work / "nextact.log", env).start()
        wait_ready(server, port, probe(templates, "probe"))

        def phase(name: str, mode: str, rate: float | None = None) -> dict[str, Any]:
            assert server is not None and redis.process is not None
            breakdown(port, reset=True)
            before = model_calls(port)
            client = measure(
                "nextact", server, port, redis.process.pid, templates, work, mode, args, len(phases), rate
            )
            ph = {"name": name, "offered_rps": rate, "client": client, "server": breakdown(port, reset=False)}
            ph["model_calls"] = {
                on: n - before[on] for on, n in model_calls(port).items()
            }  # warm-up included
            total = ph["server"]["stages_ms"]["total"]
            print(
                f"    server total p50 {fmt(total.get('p50'))} p99 {fmt(total.get('p99'))} ms; "
                f"GC {ph['server']['gc']['total_ms']} ms",
                flush=True,
            )
            phases.append(ph)
            return ph

        saturated = phase(f"closed loop, {args.connections} connections", "closed")["client"]["rps"]
        half = args.rate or max(10.0, round(saturated / 2, -1))
        phase(f"open loop, half of saturated ({half:.0f} req/s)", "open", half)
        phase(f"open loop, {args.low_rate:.0f} req/s", "open", args.low_rate)
    finally:
        if server is not None:
            server.stop()
        redis.stop()
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["phases"] = phases
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result))
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))
    print(f"==> wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} in {result['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        sys.exit(1)

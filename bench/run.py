"""The service benchmark, one command: nextact vs the bare-FastAPI ceiling vs a PyTorch-eager service.

    python bench/run.py            # ~6 minutes: writes bench/results/service.json and service.md
    python bench/run.py --quick    # ~1-2 minutes smoke run: writes bench/results/service_quick.{json,md}

Everything runs on 127.0.0.1 and is stopped at the end, also on errors and Ctrl-C: a real Redis
(the embedded redis-server, free port) pre-filled with --users full windows of real actions from the
model's training data; the three servers, each one uvicorn worker (uvloop, httptools); the load generator
(bench/loadgen.py) in its own process. Per round and server: closed loop at --connections for throughput
and latency at saturation, then an open loop at a fixed offered rate (default half the ceiling's
throughput) for latency at a realistic load. The model micro-benchmark (bench/model_bench.py) runs first.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
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
    PLACEHOLDER,
    RESULTS,
    SAMPLE_DATA,
    BenchError,
    Child,
    free_port,
    histogram_delta,
    http,
    machine,
    parse_histogram,
    process_tree_stats,
    read_sequences,
    user_id,
    wait_ready,
    write_json,
)

TARGETS = ("ceiling", "nextact", "incremental", "torch")  # incremental: only with --incremental
NEXTACTS = ("nextact", "incremental")  # the targets that are nextact itself
INCREMENTAL_PREFIX = "nextinc"  # its own copy of the population, with carried states
BATCH_METRIC = "nextact_inference_batch_size"
PHASES = itertools.count(1)


# ---- set-up -------------------------------------------------------------------------------------------------


def ensure_artifact(args: argparse.Namespace) -> Path:
    """The Beauty model to serve; trained here (bounded: a few epochs) when the directory has none."""
    art: Path = args.artifact_dir
    if (
        (art / "manifest.json").is_file()
        and (art / "model.onnx").is_file()
        and (art / "checkpoint.pt").is_file()
    ):
        return art
    data = args.data or SAMPLE_DATA
    print(
        f"==> no model in {art}: training one on {data} (item_id, window 50, {args.train_epochs} epochs)",
        flush=True,
    )
    cmd = [
        sys.executable,
        "-m",
        "training",
        "train",
        "--data",
        str(data),
        "--action-col",
        "item_id",
        "--window",
        "50",
        "--out",
        str(art),
        "--epochs",
        str(args.train_epochs),
        "--quiet",
    ]
    done = subprocess.run(cmd, cwd=ROOT, timeout=1800, check=False)
    if done.returncode != 0:
        raise BenchError(f"training the benchmark model failed: {' '.join(cmd)}")
    return art


def ensure_step(art: Path) -> Any:
    """The artifact's model with its step graph loaded (exported here first when the artifact has none)."""
    from app.manifest import read_manifest
    from app.model import load_model

    if read_manifest(art).step is None:
        print(f"==> exporting the step graph into {art}", flush=True)
        done = subprocess.run(
            [sys.executable, "-m", "training.step", "--artifact", str(art)],
            cwd=ROOT,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"exporting the step graph into {art} failed")
    return load_model(art, device="cpu", intra_op_threads=1, incremental=True)


def population_source(manifest: Any, args: argparse.Namespace) -> tuple[Path, str]:
    """Where the windows' actions come from: --data, else the model's own training file, else the sample."""
    col = manifest.data.action_columns[0] if len(manifest.data.action_columns) == 1 else "item_id"
    for candidate in (args.data, Path(manifest.data.file), SAMPLE_DATA):
        if candidate is not None and Path(candidate).is_file():
            return Path(candidate), col
    raise BenchError("no event data for the user population: pass --data")


async def prefill(
    redis_url: str, windows: list[list[str]], capacity: int, prefix: str = "nextact", model: Any = None
) -> float:
    """Write every user's full window with the service's own append script (one EVALSHA per user).

    With `model` (a ServingModel with its step graph): the incremental service's population, each window
    with its state, computed by the service's own code, so the run measures steady state, not first touches.
    """
    from app.model import StepRequest
    from app.redis_client import connect
    from app.windows import NewEvent, WindowStore

    redis = connect(redis_url, 64, 10.0, 2)
    store = WindowStore(redis.client, prefix, 30 * 24 * 3600, redis.address)
    await store.load_script()
    start = time.perf_counter()
    t0 = time.time() - 86_400  # a day ago: every event the benchmark posts is newer
    limit = asyncio.Semaphore(64)

    async def one(i: int, actions: list[str]) -> None:
        async with limit:
            events = [NewEvent(f"pre-{i}-{j}", a, t0 + j) for j, a in enumerate(actions)]
            if model is None:
                result = await store.append(user_id(i), events, capacity)
            else:
                got = await store.append_with_state(user_id(i), events, capacity, model.version)
                result = got.result
                ((_, state),) = model.advance([StepRequest(result.actions, 1)])
                await store.save_state(user_id(i), got.seq, model.version, state)
            if len(result.actions) != capacity:
                raise BenchError(
                    f"prefill: user {user_id(i)} has {len(result.actions)} events, want {capacity}"
                )

    try:
        await asyncio.gather(*(one(i, w) for i, w in enumerate(windows)))
    finally:
        await redis.close()
    return time.perf_counter() - start


def request_templates(path: Path, sequences: list[list[str]], users: int, n: int, rng: random.Random) -> None:
    """n POST /v1/users/{id}/events?k=10 requests: a random user, one real action (popularity-weighted)."""
    reqs = []
    for _ in range(n):
        seq = rng.choice(sequences)
        body = json.dumps({"action": rng.choice(seq), "event_id": PLACEHOLDER}, separators=(",", ":"))
        reqs.append({"path": f"/v1/users/{user_id(rng.randrange(users))}/events?k=10", "body": body})
    path.write_text(json.dumps({"method": "POST", "placeholder": PLACEHOLDER, "requests": reqs}))


def probe(templates: Path, tag: str) -> tuple[str, bytes]:
    first = json.loads(templates.read_text())["requests"][0]
    eid = (tag + "0" * len(PLACEHOLDER))[: len(PLACEHOLDER)]
    return first["path"], first["body"].replace(PLACEHOLDER, eid).encode()


# ---- measuring ----------------------------------------------------------------------------------------------


def loadgen(
    port: int,
    templates: Path,
    out: Path,
    mode: str,
    args: argparse.Namespace,
    tag: str,
    rate: float | None = None,
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "loadgen.py"),
        "--port",
        str(port),
        "--requests",
        str(templates),
        "--mode",
        mode,
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--max-requests",
        str(args.max_requests),
        "--tag",
        tag,
        "--out",
        str(out),
    ]
    if mode == "closed":
        cmd += ["--connections", str(args.connections)]
    else:
        cmd += ["--connections", str(args.open_connections), "--rate", f"{rate:.1f}", "--drain", "2"]
    limit = args.warmup + args.duration + 60
    done = subprocess.run(cmd, cwd=ROOT, timeout=limit, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"load generator failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())


def scrape_batches(port: int) -> dict[str, Any] | None:
    try:
        status, body = http("GET", f"http://127.0.0.1:{port}/metrics", timeout=5)
    except OSError:
        return None
    if status != 200:
        return None
    hist = parse_histogram(body.decode(), BATCH_METRIC)
    return hist if hist["buckets"] else None


def batch_stats(delta: dict[str, Any] | None) -> dict[str, Any] | None:
    """Batch sizes of one phase from the service's histogram: ORT calls per bucket, the exact mean, and the
    approximate share of requests per bucket (each call counted at its bucket's midpoint, scaled to the
    exact total of windows scored)."""
    if not delta or not delta["count"]:
        return None
    edges = [0.0] + [float(le) for le in delta["per_bucket"] if le != "+Inf"]
    rows: dict[str, float] = {}
    for i, (le, calls) in enumerate(delta["per_bucket"].items()):
        if le == "+Inf":
            mid = edges[-1] * 1.5
            label = f">{edges[-1]:.0f}"
        else:
            lo, hi = edges[i] + 1, edges[i + 1]
            mid = (lo + hi) / 2
            label = f"{hi:.0f}" if lo >= hi else f"{lo:.0f}-{hi:.0f}"
        rows[label] = calls * mid
    scale = delta["sum"] / (sum(rows.values()) or 1)
    labels = list(rows)
    calls_by = dict(zip(labels, delta["per_bucket"].values(), strict=True))
    return {
        "calls": delta["count"],
        "windows": int(delta["sum"]),
        "mean": delta["mean"],
        "calls_by_bucket": calls_by,
        "approx_request_share": {k: round(v * scale / delta["sum"], 4) for k, v in rows.items()},
    }


def measure(
    name: str,
    server: Child,
    port: int,
    redis_pid: int,
    templates: Path,
    work: Path,
    mode: str,
    args: argparse.Namespace,
    round_no: int,
    rate: float | None = None,
) -> dict[str, Any]:
    tag = f"p{next(PHASES)}-"  # event ids unique across the whole run: no request is a duplicate
    before_batches = scrape_batches(port) if name in NEXTACTS else None
    before, redis_before = process_tree_stats(server.pid), process_tree_stats(redis_pid)
    result = loadgen(port, templates, work / f"{name}-{mode}-{round_no}.json", mode, args, tag, rate)
    after, redis_after = process_tree_stats(server.pid), process_tree_stats(redis_pid)
    if not server.alive():
        raise BenchError(f"{name} died under load; log {server.log_path}:\n{server.log_tail()}")
    # CPU per request counts warm-up requests too (the counter cannot tell them apart): an estimate
    total_sent = result["requests"] * (args.warmup + args.duration) / args.duration
    per_req = lambda s: round(s * 1000 / total_sent, 3) if total_sent else None
    result["server_cpu_ms_per_request"] = per_req(after["cpu_s"] - before["cpu_s"])
    result["redis_cpu_ms_per_request"] = per_req(redis_after["cpu_s"] - redis_before["cpu_s"])
    result["server_rss_mib"] = after["rss_mib"]
    result["server_threads"] = after["threads"]
    if name in NEXTACTS:
        after_batches = scrape_batches(port)
        if before_batches and after_batches:
            result["batch_size"] = histogram_delta(before_batches, after_batches)
    bad = {k: v for k, v in result["statuses"].items() if not k.startswith("2")}
    if bad or result["errors"]:
        print(
            f"    !! {name} {mode}: statuses {result['statuses']} errors {result['errors']}: "
            f"{result['sample_response'][:300]}",
            flush=True,
        )
    lat = result["latency_ms"]
    offered = f" of {rate:.0f} offered" if rate else ""
    print(
        f"    {name:8} {mode:6} {result['rps']:8.1f} req/s{offered}  p50 {fmt(lat['p50'])}  p90 {fmt(lat['p90'])}  "
        f"p99 {fmt(lat['p99'])} ms  server cpu {fmt(result['server_cpu_ms_per_request'], '.3f')} ms/req",
        flush=True,
    )
    return result


# ---- summary ------------------------------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in TARGETS:
        runs = [r[name] for r in rounds if name in r]
        if not runs:
            continue
        s: dict[str, Any] = {}
        for mode in ("closed", "open", "open_own"):
            ms = [r[mode] for r in runs if mode in r]
            if not ms:
                continue
            s[mode] = {
                "rps": median([m["rps"] for m in ms]),
                "offered_rps": median([m.get("offered_rps") for m in ms]),
                **{q: median([m["latency_ms"][q] for m in ms]) for q in ("p50", "p90", "p99")},
                "server_cpu_ms_per_request": median([m["server_cpu_ms_per_request"] for m in ms]),
                "redis_cpu_ms_per_request": median([m["redis_cpu_ms_per_request"] for m in ms]),
                "errors": sum(
                    sum(m["errors"].values())
                    + sum(v for k, v in m["statuses"].items() if not k.startswith("2"))
                    for m in ms
                ),
            }
        s["rss_mib"] = max(m["server_rss_mib"] for r in runs for m in r.values())
        out[name] = s
    c, n, i, t = (
        out.get(k, {}).get("closed", {}).get("rps") for k in ("ceiling", "nextact", "incremental", "torch")
    )
    out["ratios"] = {
        "nextact_over_ceiling": round(n / c, 3) if n and c else None,
        "nextact_over_torch": round(n / t, 3) if n and t else None,
    }
    if i:
        cpu = {
            k: out[k]["closed"]["server_cpu_ms_per_request"] for k in ("nextact", "incremental") if k in out
        }
        out["ratios"] |= {
            "incremental_over_ceiling": round(i / c, 3) if c else None,
            "incremental_over_nextact": round(i / n, 3) if n else None,
            "nextact_cpu_over_incremental_cpu": (
                round(cpu["nextact"] / cpu["incremental"], 3)
                if len(cpu) == 2 and cpu["incremental"]
                else None
            ),
        }
    return out


def batch_histogram(rounds: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """nextact's batch sizes in one kind of phase, all rounds together."""
    total: dict[str, Any] | None = None
    for r in rounds:
        h = r.get("nextact", {}).get(mode, {}).get("batch_size")
        if not h:
            continue
        if total is None:
            total = {"per_bucket": dict.fromkeys(h["per_bucket"], 0), "count": 0, "sum": 0.0}
        for le, c in h["per_bucket"].items():
            total["per_bucket"][le] = total["per_bucket"].get(le, 0) + c
        total["count"] += h["count"]
        total["sum"] += h["sum"]
    if total and total["count"]:
        total["mean"] = round(total["sum"] / total["count"], 2)
    return batch_stats(total)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def markdown(res: dict[str, Any]) -> str:
    m, s, mach, cfg = res["model"], res["summary"], res["machine"], res["config"]
    rate = res["open_loop_rate"]
    rate_note = "" if cfg["rate"] else " (half the ceiling's closed-loop throughput)"
    lines = [
        f"# nextact service benchmark ({'quick' if cfg['quick'] else 'full'})",
        "",
        (
            f"- date: {mach['date']}; machine: {mach['cpu']}, {mach['cpu_count']} CPUs "
            f"({mach.get('memory_gib', '?')} GiB), {mach['os']}, Python {mach['python']}"
        ),
        (
            f"- load average at start / end: {mach['load_average_at_start']} / {res['load_average_at_end']} "
            "(the load generator and Redis share these CPUs with the server)"
        ),
        (
            f"- model: {m['cell'].upper()}, vocabulary {m['vocab']:,}, window {m['window']}, "
            f"embedding {m['embedding']}, hidden {m['hidden']}, {m['layers']} layer(s) ({m['version']}), "
            f"served from {cfg['artifact_dir']}"
        ),
        (
            f"- population: {cfg['users']:,} users with full windows of real actions from {cfg['population_data']}; "
            "each request posts one event (random user, real action, unique event_id) and asks k=10"
        ),
        (
            f"- one uvicorn worker each (uvloop, httptools); closed loop: {cfg['connections']} connections; "
            f"open loop: Poisson arrivals at {rate:.0f} req/s{rate_note}; "
            f"{cfg['warmup']} s warm-up + {cfg['duration']} s measured per phase; median of {cfg['rounds']} round(s)"
        ),
        f"- command: `{cfg['command']}`",
        "",
        (
            "| server | req/s at 64 conn | p50 | p90 | p99 ms (saturated) | open loop: answered req/s | p50 | p90 "
            "| p99 ms (open loop) | server CPU ms/req | Redis CPU ms/req | RSS MiB |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "ceiling": "bare FastAPI (ceiling)",
        "nextact": "**nextact**",
        "torch": "FastAPI + PyTorch eager",
        "incremental": "nextact (incremental state)",
    }
    for name in TARGETS:
        if name not in s:
            continue
        c, o = s[name].get("closed", {}), s[name].get("open", {})
        answered = fmt(o.get("rps"), ",.0f")
        if o.get("rps") is not None and o.get("offered_rps") and o["rps"] < 0.95 * o["offered_rps"]:
            answered += " (overloaded)"
        cells = [
            fmt(c.get("rps"), ",.0f"),
            *(fmt(c.get(q)) for q in ("p50", "p90", "p99")),
            answered,
            *(fmt(o.get(q)) for q in ("p50", "p90", "p99")),
            fmt(c.get("server_cpu_ms_per_request"), ".3f"),
            fmt(c.get("redis_cpu_ms_per_request"), ".3f"),
            fmt(s[name]["rss_mib"], ".0f"),
        ]
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    r = s["ratios"]
    t = res["targets"]
    lines += [
        "",
        (
            f"nextact / ceiling = **{r['nextact_over_ceiling']}** (target >= 0.6, stretch 0.8: "
            f"{'met' if t['ceiling_ratio_met'] else 'not met'}); nextact / PyTorch = **{r['nextact_over_torch']}** "
            f"(target >= 3: {'met' if t['torch_ratio_met'] else 'not met'}); nextact p99 at {rate:.0f} req/s = "
            f"**{s.get('nextact', {}).get('open', {}).get('p99')} ms** (target <= 10 ms: "
            f"{'met' if t['p99_met'] else 'not met'})."
        ),
    ]
    if r.get("incremental_over_nextact"):
        lines += [
            "",
            (
                f"nextact (incremental state) / nextact = **{r['incremental_over_nextact']}** in req/s, "
                f"**{r['nextact_cpu_over_incremental_cpu']}x** less server CPU per request; "
                f"/ ceiling = {r['incremental_over_ceiling']}."
            ),
        ]
    own = s.get("nextact", {}).get("open_own")
    if own:
        lines += [
            "",
            (
                f"nextact at half its own throughput ({own['offered_rps']:.0f} req/s offered, Poisson): "
                f"p50 {fmt(own['p50'])} ms, p90 {fmt(own['p90'])} ms, p99 {fmt(own['p99'])} ms, "
                f"{fmt(own['rps'], ',.0f')} req/s answered."
            ),
        ]
    hists = {mode: h for mode, h in res["batch_size_histogram"].items() if h}
    if hists:
        buckets = [
            b
            for b in next(iter(hists.values()))["approx_request_share"]
            if any(h["approx_request_share"].get(b) for h in hists.values())
        ]
        labels = {
            "closed": "saturated (64 connections)",
            "open": f"open loop, {rate:.0f} req/s",
            "open_own": "open loop, half nextact's throughput",
        }
        lines += [
            "",
            (
                "nextact micro-batches, from its nextact_inference_batch_size histogram on /metrics: ONNX "
                "Runtime calls, mean windows per call, and the approximate share of requests served in a "
                "batch of each size"
            ),
            "",
            "| phase | ORT calls | mean batch | " + " | ".join(buckets) + " |",
            "|---|---:|---:|" + "---:|" * len(buckets),
        ]
        for mode, h in hists.items():
            shares = " | ".join(f"{h['approx_request_share'][b]:.0%}" for b in buckets)
            lines.append(f"| {labels.get(mode, mode)} | {h['calls']:,} | {h['mean']} | {shares} |")
    else:
        lines += ["", "Batch sizes: not available (no nextact_inference_batch_size histogram on /metrics)."]
    if res.get("model_bench_markdown"):
        lines += [
            "",
            "## Model micro-benchmark (same model, one process, no HTTP)",
            "",
            res["model_bench_markdown"],
        ]
    return "\n".join(lines) + "\n"


# ---- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1-2 minute smoke run (1 round, short phases)")
    p.add_argument("--artifact-dir", type=Path, default=ROOT / "artifacts" / "beauty")
    p.add_argument("--data", type=Path, help="events for the population (default: the model's training file)")
    p.add_argument(
        "--train-epochs", type=int, default=3, help="epochs when the model has to be trained first"
    )
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument(
        "--templates", type=int, default=20_000, help="distinct requests the load generator cycles"
    )
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--open-connections", type=int, default=64)
    p.add_argument("--rate", type=float, help="open-loop offered rate (default: half the ceiling's req/s)")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-requests", type=int, default=300_000, help="per phase")
    p.add_argument(
        "--targets",
        default=",".join(t for t in TARGETS if t != "incremental"),
        help="servers to load (incremental is added by --incremental)",
    )
    p.add_argument("--skip-model-bench", action="store_true")
    p.add_argument(
        "--incremental",
        action="store_true",
        help="also serve 'nextact (incremental state)': NEXTACT_INCREMENTAL_STATE=true on its own copy "
        "of the population with states; exports step.onnx into the artifact if it has none",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the nextact server (e.g. NEXTACT_INTRA_OP_THREADS=1)",
    )
    p.add_argument(
        "--out", type=Path, help="results path without suffix (default bench/results/service[_quick])"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop every child
    if args.quick:
        args.duration, args.warmup, args.rounds = min(args.duration, 5.0), min(args.warmup, 1.5), 1
    out = args.out or RESULTS / ("service_quick" if args.quick else "service")
    targets = [
        t for t in TARGETS if t in args.targets.split(",") + (["incremental"] if args.incremental else [])
    ]
    started = time.monotonic()

    from app.manifest import read_manifest
    from app.redis_server import EmbeddedRedis

    art = ensure_artifact(args)
    manifest = read_manifest(art)
    data, col = population_source(manifest, args)
    rng = random.Random(args.seed)
    sequences = read_sequences(data, col)
    from bench.harness import make_windows

    windows = make_windows(sequences, args.users, manifest.window, rng)
    work = Path(tempfile.mkdtemp(prefix="nextact-bench-"))
    print(f"==> scratch directory {work} (logs, Redis data): removed after a successful run", flush=True)
    templates = work / "requests.json"
    request_templates(templates, sequences, args.users, args.templates, rng)

    result: dict[str, Any] = {
        "machine": machine(),
        "model": {
            "cell": manifest.cell,
            "vocab": manifest.vocab_size,
            "window": manifest.window,
            "embedding": manifest.embedding_dim,
            "hidden": manifest.hidden_dim,
            "layers": manifest.num_layers,
            "version": manifest.model_version,
        },
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "population_data": str(data),
            "command": " ".join(["python", "bench/run.py", *(argv or sys.argv[1:])]),
        },
        "notes": "Load generator, Redis and the server share the machine's CPUs; 'server CPU ms/req' is the "
        "server process's own CPU time per request (all its threads) and is the least noisy figure.",
    }
    if not args.skip_model_bench:
        print("==> model micro-benchmark (ONNX Runtime vs PyTorch eager)", flush=True)
        mb = work / "model_bench.json"
        budget = "0.2" if args.quick else "0.6"
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "model_bench.py"),
                "--artifact-dir",
                str(art),
                "--json",
                str(mb),
                "--budget-s",
                budget,
                "--quiet",
            ],
            cwd=ROOT,
            timeout=600,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"model_bench.py failed:\n{done.stderr[-2000:]}")
        result["model_bench"] = json.loads(mb.read_text())
        result["model_bench_markdown"] = done.stdout.strip()
        print(done.stdout, flush=True)

    children: list[Child] = []
    redis = EmbeddedRedis(work / "redis", port=0, appendfsync="everysec")
    try:
        redis.start()
        assert redis.process is not None
        print(
            f"==> Redis on {redis.url}: pre-filling {args.users:,} users x {manifest.window} events from {data}",
            flush=True,
        )
        seconds = asyncio.run(prefill(redis.url, windows, manifest.window))
        result["prefill_seconds"] = round(seconds, 2)
        if "incremental" in targets:
            stepped = ensure_step(art)
            print(f"==> the same users again under {INCREMENTAL_PREFIX}: with states", flush=True)
            seconds = asyncio.run(prefill(redis.url, windows, manifest.window, INCREMENTAL_PREFIX, stepped))
            result["prefill_incremental_seconds"] = round(seconds, 2)

        ports = {name: free_port() for name in targets}
        env_base = {
            "NEXTACT_REDIS_URL": redis.url,
            "NEXTACT_ARTIFACT_DIR": str(art),
            "NEXTACT_LOG_LEVEL": "warning",
            "NEXTACT_HOST": "127.0.0.1",
            "NEXTACT_WORKERS": "1",
        }
        extra = dict(e.split("=", 1) for e in args.env)
        cmds = {
            "nextact": [sys.executable, "-m", "app"],
            "incremental": [sys.executable, "-m", "app"],
            "ceiling": [sys.executable, str(ROOT / "bench" / "baseline_apps.py"), "ceiling"],
            "torch": [
                sys.executable,
                str(ROOT / "bench" / "baseline_apps.py"),
                "torch",
                "--artifact-dir",
                str(art),
            ],
        }
        servers: dict[str, Child] = {}
        for name in targets:
            env = {**env_base, "NEXTACT_PORT": str(ports[name]), **(extra if name in NEXTACTS else {})}
            if name == "incremental":
                env |= {"NEXTACT_INCREMENTAL_STATE": "true", "NEXTACT_KEY_PREFIX": INCREMENTAL_PREFIX}
            cmd = cmds[name] + ([] if name in NEXTACTS else ["--port", str(ports[name])])
            servers[name] = Child(name, cmd, work / f"{name}.log", env).start()
            children.append(servers[name])
        for name in targets:
            wait_ready(servers[name], ports[name], probe(templates, f"probe{name[0]}"))
        print(f"==> servers ready: {', '.join(f'{n} :{ports[n]}' for n in targets)}", flush=True)

        rate = args.rate
        rounds: list[dict[str, Any]] = []
        for r in range(1, args.rounds + 1):
            print(f"==> round {r}/{args.rounds}", flush=True)
            this: dict[str, Any] = {}
            for name in targets:
                this[name] = {
                    "closed": measure(
                        name,
                        servers[name],
                        ports[name],
                        redis.process.pid,
                        templates,
                        work,
                        "closed",
                        args,
                        r,
                    )
                }
                if rate is None:
                    base = this.get("ceiling", this[name])["closed"]["rps"]
                    rate = max(10.0, round(base / 2, -1))
            for name in targets:
                this[name]["open"] = measure(
                    name,
                    servers[name],
                    ports[name],
                    redis.process.pid,
                    templates,
                    work,
                    "open",
                    args,
                    r,
                    rate,
                )
            if "nextact" in this and not args.quick:
                # latency where nextact itself is half busy, whatever the ceiling is
                own = max(10.0, round(this["nextact"]["closed"]["rps"] / 2, -1))
                this["nextact"]["open_own"] = measure(
                    "nextact",
                    servers["nextact"],
                    ports["nextact"],
                    redis.process.pid,
                    templates,
                    work,
                    "open",
                    args,
                    r,
                    own,
                )
                this["nextact"]["open_own"]["offered_rps"] = own
            rounds.append(this)
        result["open_loop_rate"] = rate
        result["rounds"] = rounds
    finally:
        for child in children:
            child.stop()
        redis.stop()
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["summary"] = summary = summarise(rounds)
    result["batch_size_histogram"] = {
        mode: batch_histogram(rounds, mode) for mode in ("closed", "open", "open_own")
    }
    ratios = summary["ratios"]
    p99 = summary.get("nextact", {}).get("open", {}).get("p99")
    result["targets"] = {
        "ceiling_ratio_met": bool(ratios["nextact_over_ceiling"] and ratios["nextact_over_ceiling"] >= 0.6),
        "torch_ratio_met": bool(ratios["nextact_over_torch"] and ratios["nextact_over_torch"] >= 3),
        "p99_met": bool(p99 is not None and p99 <= 10),
    }
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

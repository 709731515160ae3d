"""The service benchmark, one command: nextact against a bare-FastAPI ceiling, a BentoML peer and a PyTorch floor.

    python bench/run.py            # ~10 minutes: writes bench/results/service.json and service.md
    python bench/run.py --quick    # 2-3 minute smoke run: writes bench/results/service_quick.{json,md}

Everything runs on 127.0.0.1 and is stopped at the end, also on errors and Ctrl-C: a real Redis without
persistence (the embedded redis-server, free port) pre-filled with --users full windows of real actions
from the model's training data; the servers (see TARGETS and LABELS), each one process with one uvicorn
worker (uvloop, httptools) unless its name says otherwise; the load generator (bench/loadgen.py) in its own
process. Per round and server: a closed loop at --connections for throughput and latency at saturation,
then an open loop (Poisson arrivals) at half of that server's own saturated throughput. The peer
(bench/peer_service.py, BentoML) runs in its own virtual environment, bench/.venv-peer, made here on first
use (bench/peer_env.py). The model micro-benchmark (bench/model_bench.py) runs first.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import signal
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
from bench.service_table import TARGETS, fmt, markdown, summarise

# the targets that are nextact itself (they take --env); the peer and the PyTorch floor are not
NEXTACTS = ("nextact-default", "nextact", "nextact-int8", "nextact-2w", "fullwindow")
INCREMENTAL_PREFIX = "nextinc"  # nextact's own copy of the population, with carried states (its default)
INT8_PREFIX = "nextint8"  # the same, with the int8 model's states (another model_version: its own copy)
KEY_PREFIX = "nextact"  # the population's windows: nextact's default NEXTACT_KEY_PREFIX
# "tuned": settings beyond the defaults that measured faster (docs/performance.md, Levers); the external Redis
# without persistence is the other half of "tuned"
TUNED_ENV: dict[str, str] = {"NEXTACT_REDIS_PIPELINE_MAX": "64"}  # coalesced Redis calls (the default)
BATCH_METRIC = "nextact_inference_batch_size"
PEER_BATCH_METRIC = "bentoml_service_adaptive_batch_size"
PHASES = itertools.count(1)


def batch_metric(name: str) -> str | None:
    """The histogram of requests per model call on the target's /metrics (the floor runs nextact's app)."""
    return None if name == "ceiling" else PEER_BATCH_METRIC if name == "peer" else BATCH_METRIC


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
        "--preset",
        "none",  # the Beauty shape: the plain E256 defaults, whatever --preset auto would choose
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
        "--engine",
        getattr(args, "client", "python"),
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


def add_client_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--client",
        choices=["python", "c"],
        default="python",
        help="the load generator's engine (bench/loadgen.py --engine): python, or c, the compiled one, "
        "which takes less of the shared CPUs and adds less delay of its own (needs a C compiler)",
    )


def scrape_batches(port: int, metric: str | None) -> dict[str, Any] | None:
    if metric is None:
        return None
    try:
        status, body = http("GET", f"http://127.0.0.1:{port}/metrics", timeout=5)
    except OSError:
        return None
    if status != 200:
        return None
    hist = parse_histogram(body.decode(), metric)
    return hist if hist["buckets"] else None


def own_stats(server_pid: int, redis_pid: int) -> dict[str, float]:
    """process_tree_stats of the server, less its Redis when that is its own child (the embedded one)."""
    import psutil

    stats = process_tree_stats(server_pid)
    try:
        inside = redis_pid in {p.pid for p in psutil.Process(server_pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        inside = False
    if inside:
        r = process_tree_stats(redis_pid)
        stats = {k: v - r[k] for k, v in stats.items()}
    return stats


def redis_child(server_pid: int, port: int) -> int | None:
    """The pid of the Redis server (redis-server or valkey-server) the server started on `port`, if any."""
    import psutil

    try:
        for p in psutil.Process(server_pid).children(recursive=True):
            cmd = p.cmdline()
            if "--port" in cmd and str(port) in cmd or any(c.endswith(f":{port}") for c in cmd):
                return int(p.pid)
    except psutil.NoSuchProcess:
        pass
    return None


def redis_bytes_per_user(url: str, prefix: str) -> dict[str, Any]:
    """MEMORY USAGE (SAMPLES 0: every element) of every key under `prefix`, per user (keys grouped by their
    {hash tag}, one per user whatever the key layout), and the window lengths seen."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        users: set[bytes] = set()
        total = keys = 0
        batch: list[bytes] = []

        def flush() -> None:
            nonlocal total, keys
            pipe = client.pipeline(transaction=False)
            for k in batch:
                pipe.memory_usage(k, samples=0)
            for k, size in zip(batch, pipe.execute(), strict=True):
                total += int(size or 0)
                keys += 1
                if b"{" in k:
                    users.add(k[k.index(b"{") : k.index(b"}") + 1])
            batch.clear()

        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                flush()
        if batch:
            flush()
        info = client.info("server")
        return {
            "prefix": prefix,
            "users": len(users),
            "keys": keys,
            "bytes_per_user": round(total / len(users)) if users else None,
            "server": f"{info.get('redis_version')} ({info.get('executable', '?').rsplit('/', 1)[-1]})",
        }
    finally:
        client.close()


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
    metric = batch_metric(name)
    before_batches = scrape_batches(port, metric)
    before, redis_before = own_stats(server.pid, redis_pid), process_tree_stats(redis_pid)
    result = loadgen(port, templates, work / f"{name}-{mode}-{round_no}.json", mode, args, tag, rate)
    after, redis_after = own_stats(server.pid, redis_pid), process_tree_stats(redis_pid)
    if not server.alive():
        raise BenchError(f"{name} died under load; log {server.log_path}:\n{server.log_tail()}")
    # CPU per request counts warm-up requests too (the counter cannot tell them apart): an estimate
    total_sent = result["requests"] * (args.warmup + args.duration) / args.duration
    per_req = lambda s: round(s * 1000 / total_sent, 3) if total_sent else None
    result["server_cpu_ms_per_request"] = per_req(after["cpu_s"] - before["cpu_s"])
    result["redis_cpu_ms_per_request"] = per_req(redis_after["cpu_s"] - redis_before["cpu_s"])
    result["server_rss_mib"] = after["rss_mib"]
    result["server_threads"] = after["threads"]
    if rate is not None:
        result["offered_rps"] = rate
    after_batches = scrape_batches(port, metric)
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
    batch = result.get("batch_size", {}).get("mean")
    print(
        f"    {name:15} {mode:6} {result['rps']:8.1f} req/s{offered}  p50 {fmt(lat['p50'])}  "
        f"p90 {fmt(lat['p90'])}  p99 {fmt(lat['p99'])} ms  server cpu "
        f"{fmt(result['server_cpu_ms_per_request'], '.3f')} ms/req  mean batch {fmt(batch)}",
        flush=True,
    )
    return result


# ---- the servers -------------------------------------------------------------------------------------------


def peer_description() -> str:
    from bench.peer_env import PINS

    return (
        f"bench/peer_service.py under `bentoml serve` (bench/.venv-peer: {', '.join(PINS)}), one worker process; "
        "adaptive batching on: max_batch_size 64, max_latency_ms 10000 (BentoML's latency budget: requests "
        "that would wait longer get 503); one batch at a time in one thread: nextact's append script for "
        "every request of the batch in one Redis pipeline, one ONNX Runtime call (nextact's session options), "
        "top-k"
    )


def ensure_int8(art: Path, args: argparse.Namespace, work: Path) -> Path:
    """The int8 copy of the artifact: --quantized-artifact-dir, else quantized here into the scratch directory."""
    if args.quantized_artifact_dir is not None:
        return Path(args.quantized_artifact_dir)
    out = work / "int8"
    print(f"==> quantizing the output layer of {art} into {out}", flush=True)
    cmd = [sys.executable, "-m", "training", "quantize", "--artifact", str(art), "--out", str(out), "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, timeout=600, check=False)
    if done.returncode != 0:
        raise BenchError(f"quantizing the benchmark model failed: {' '.join(cmd)}")
    return out


def server_specs(
    targets: list[str],
    art: Path,
    redis_url: str,
    work: Path,
    args: argparse.Namespace,
    int8: Path | None = None,
) -> dict[str, tuple[list[str], dict[str, str], int]]:
    """Per target: the command, its environment and its port."""
    extra = dict(e.split("=", 1) for e in args.env)
    base = {
        "NEXTACT_ARTIFACT_DIR": str(art),
        "NEXTACT_LOG_LEVEL": "warning",
        "NEXTACT_HOST": "127.0.0.1",
        "NEXTACT_WORKERS": "1",
    }
    specs = {}
    for name in targets:
        port = free_port()
        env = {**base, "NEXTACT_PORT": str(port), "NEXTACT_REDIS_URL": redis_url}
        cmd = [sys.executable, "-m", "app"]
        if name == "nextact-default":  # what a newcomer gets: no Redis URL, so nextact starts its own
            del env["NEXTACT_REDIS_URL"]
            env |= {
                "NEXTACT_DATA_DIR": str(work / "default-data"),
                "NEXTACT_EMBEDDED_REDIS_PORT": str(free_port()),
            }
        elif name in ("nextact", "nextact-int8", "nextact-2w", "fullwindow"):
            env |= TUNED_ENV
            if name == "nextact-int8":  # the same service on the int8 copy, with its own states
                assert int8 is not None
                env |= {"NEXTACT_ARTIFACT_DIR": str(int8), "NEXTACT_KEY_PREFIX": INT8_PREFIX}
            elif name == "nextact-2w":
                env["NEXTACT_WORKERS"] = "2"
            if name == "fullwindow":  # the whole window through model.onnx on every request
                env["NEXTACT_INCREMENTAL_STATE"] = "false"
            else:  # incremental state (the default): the population whose states the peer and floor never touch
                env["NEXTACT_KEY_PREFIX"] = INCREMENTAL_PREFIX
        elif name == "ceiling":
            cmd = [sys.executable, str(ROOT / "bench" / "baseline_apps.py"), "ceiling", "--port", str(port)]
        elif name == "torch":
            cmd = [sys.executable, str(ROOT / "bench" / "baseline_apps.py"), "torch", "--port", str(port)]
            cmd += ["--artifact-dir", str(art)]
        elif name == "peer":
            from bench import peer_env

            try:
                bentoml = peer_env.ensure()
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                raise BenchError(
                    f"{e}\n(leave the peer out with --targets, e.g. --targets nextact,ceiling)"
                ) from e
            cmd = [
                str(bentoml),
                "serve",
                "bench.peer_service:Peer",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            cmd += ["--working-dir", str(ROOT)]
            env = {
                "PEER_ARTIFACT_DIR": str(art),
                "PEER_REDIS_URL": redis_url,
                "PEER_KEY_PREFIX": KEY_PREFIX,
                "BENTOML_HOME": str(work / "bentoml"),
                "BENTOML_DO_NOT_TRACK": "true",
            }
        if name in NEXTACTS:
            env |= extra
        specs[name] = (cmd, env, port)
    return specs


# ---- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2-3 minute smoke run (1 round, short phases)")
    p.add_argument(
        "--artifact-dir",
        type=Path,
        default=ROOT / "artifacts" / "beauty",
        help="the model to serve; trained here on --data (default examples/beauty_sample.csv: item_id, "
        "window 50, --train-epochs) when the directory holds none, e.g. artifacts/beauty_sample",
    )
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
    p.add_argument(
        "--rate", type=float, help="open-loop offered rate for every server (default: half its own req/s)"
    )
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-requests", type=int, default=300_000, help="per phase")
    p.add_argument(
        "--targets",
        default=",".join(t for t in TARGETS if t not in ("fullwindow", "nextact-int8")),
        help=f"servers to load, of {', '.join(TARGETS)} (fullwindow is added by --full-window, nextact-int8 "
        "by --quantized-artifact-dir)",
    )
    p.add_argument(
        "--quantized-artifact-dir",
        type=Path,
        help="also serve 'nextact-int8': this int8 copy of --artifact-dir (python -m training quantize); "
        "with --targets nextact-int8 and no directory, the copy is made in the scratch directory",
    )
    p.add_argument("--skip-model-bench", action="store_true")
    p.add_argument(
        "--full-window",
        action="store_true",
        help="also serve 'nextact, full window': NEXTACT_INCREMENTAL_STATE=false, the whole window through "
        "model.onnx on every request (nextact's default carries each user's state when the artifact has step.onnx)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for every nextact server (e.g. NEXTACT_INTRA_OP_THREADS=1)",
    )
    p.add_argument(
        "--out", type=Path, help="results path without suffix (default bench/results/service[_quick])"
    )
    p.add_argument("--seed", type=int, default=0)
    add_client_option(p)
    args = p.parse_args(argv)
    unknown = set(args.targets.split(",")) - set(TARGETS)
    if unknown:
        p.error(f"--targets: unknown {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    if args.quick:
        args.duration, args.warmup, args.rounds = min(args.duration, 5.0), min(args.warmup, 1.5), 1
    return args


def model_bench(art: Path, work: Path, quick: bool) -> tuple[dict[str, Any], str]:
    print("==> model micro-benchmark (ONNX Runtime vs PyTorch eager)", flush=True)
    mb = work / "model_bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "model_bench.py"),
        "--artifact-dir",
        str(art),
        "--json",
        str(mb),
    ]
    cmd += ["--budget-s", "0.2" if quick else "0.6", "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, timeout=600, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"model_bench.py failed:\n{done.stderr[-2000:]}")
    print(done.stdout, flush=True)
    return json.loads(mb.read_text()), done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop every child
    out = args.out or RESULTS / ("service_quick" if args.quick else "service")
    wanted = args.targets.split(",") + (["fullwindow"] if args.full_window else [])
    wanted += ["nextact-int8"] if args.quantized_artifact_dir else []
    targets = [t for t in TARGETS if t in wanted]
    started = time.monotonic()

    from app.manifest import read_manifest
    from app.redis_server import EmbeddedRedis
    from bench.harness import make_windows
    from bench.service_table import targets as judge

    art = ensure_artifact(args)
    manifest = read_manifest(art)
    data, col = population_source(manifest, args)
    rng = random.Random(args.seed)
    sequences = read_sequences(data, col)
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
            "targets": targets,
            "tuned_env": TUNED_ENV,
            "population_data": str(data),
            "command": " ".join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        },
        "notes": "Load generator, Redis and the servers share the machine's CPUs; 'server CPU ms/req' is the "
        "server's own CPU time per request (all its processes and threads, less nextact-default's embedded "
        "Redis, which is counted as Redis) and is the least noisy figure.",
    }
    if "peer" in targets:
        result["peer"] = {"description": peer_description()}
    if not args.skip_model_bench:
        result["model_bench"], result["model_bench_markdown"] = model_bench(art, work, args.quick)

    children: list[Child] = []
    # the shared Redis: no persistence (what "tuned" means for nextact; the same for the peer and the floor)
    redis = EmbeddedRedis(work / "redis", port=0, extra_args=["--appendonly", "no"])
    memory: dict[str, Any] = {}
    try:
        redis.start()
        assert redis.process is not None
        print(
            f"==> Redis on {redis.url}: pre-filling {args.users:,} users x {manifest.window} events from {data}",
            flush=True,
        )
        result["prefill_seconds"] = round(asyncio.run(prefill(redis.url, windows, manifest.window)), 2)
        stepped = ensure_step(art) if any(t in targets for t in NEXTACTS) else None
        if "nextact" in targets or "nextact-2w" in targets:
            print(f"==> the same users again under {INCREMENTAL_PREFIX}: with states", flush=True)
            seconds = asyncio.run(prefill(redis.url, windows, manifest.window, INCREMENTAL_PREFIX, stepped))
            result["prefill_incremental_seconds"] = round(seconds, 2)
        int8 = None
        if "nextact-int8" in targets:
            int8 = ensure_int8(art, args, work)
            print(f"==> the same users again under {INT8_PREFIX}: with the int8 model's states", flush=True)
            seconds = asyncio.run(
                prefill(redis.url, windows, manifest.window, INT8_PREFIX, ensure_step(int8))
            )
            result["prefill_int8_seconds"] = round(seconds, 2)

        specs = server_specs(targets, art, redis.url, work, args, int8)
        servers: dict[str, Child] = {}
        for name, (cmd, env, _) in specs.items():
            servers[name] = Child(name, cmd, work / f"{name}.log", env).start()
            children.append(servers[name])
        redis_pids = dict.fromkeys(targets, redis.process.pid)
        own_urls: dict[str, str] = {}
        for name in targets:
            wait_ready(servers[name], specs[name][2], probe(templates, f"probe{name[0]}"), timeout=180)
            if name == "nextact-default":  # its own embedded Redis: the same population there
                own_port = int(specs[name][1]["NEXTACT_EMBEDDED_REDIS_PORT"])
                pid = redis_child(servers[name].pid, own_port)
                if pid is None:
                    raise BenchError(
                        f"nextact-default started no embedded Redis; log {servers[name].log_path}"
                    )
                redis_pids[name] = pid
                own_urls[name] = f"redis://127.0.0.1:{own_port}/0"
                print(f"==> pre-filling nextact-default's embedded Redis ({own_urls[name]})", flush=True)
                asyncio.run(prefill(own_urls[name], windows, manifest.window, KEY_PREFIX, stepped))
        print(f"==> servers ready: {', '.join(f'{n} :{specs[n][2]}' for n in targets)}", flush=True)

        rounds: list[dict[str, Any]] = []
        for r in range(1, args.rounds + 1):
            print(f"==> round {r}/{args.rounds}", flush=True)
            this: dict[str, Any] = {}
            for name in targets:
                run = (name, servers[name], specs[name][2], redis_pids[name], templates, work)
                this[name] = {"closed": measure(*run, "closed", args, r)}
                rate = args.rate or max(10.0, round(this[name]["closed"]["rps"] / 2, -1))
                this[name]["open"] = measure(*run, "open", args, r, rate)
            rounds.append(this)
        result["rounds"] = rounds
        print("==> Redis memory per user (MEMORY USAGE of every key)", flush=True)
        shared = redis_bytes_per_user(redis.url, KEY_PREFIX)
        memory = {
            t: shared for t in targets if t not in ("ceiling", "nextact-default", "nextact", "nextact-2w")
        }
        memory["window"] = shared  # windows without carried states: issue 11's 2 KB target
        result["redis_memory"] = {"shared Redis": shared}
        if "nextact-default" in own_urls:
            memory["nextact-default"] = redis_bytes_per_user(own_urls["nextact-default"], KEY_PREFIX)
            result["redis_memory"]["nextact-default's embedded Redis"] = memory["nextact-default"]
        if "nextact" in targets or "nextact-2w" in targets:
            with_state = redis_bytes_per_user(redis.url, INCREMENTAL_PREFIX)
            memory |= {t: with_state for t in ("nextact", "nextact-2w") if t in targets}
            result["redis_memory"]["shared Redis, nextact's population (window + incremental state)"] = (
                with_state
            )
        if "nextact-int8" in targets:
            memory["nextact-int8"] = redis_bytes_per_user(redis.url, INT8_PREFIX)
            result["redis_memory"]["shared Redis, nextact-int8's population"] = memory["nextact-int8"]
    finally:
        for child in children:
            child.stop()
        redis.stop()
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["summary"] = summary = summarise(rounds, memory)
    result["targets"] = judge(summary, memory)
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

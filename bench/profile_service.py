"""Where the service's time goes under load: py-spy samples of `python -m app` plus per-thread CPU time.

    python bench/profile_service.py [--duration 20] [--mode closed|open --rate 1000] [--env NEXTACT_X=Y]

Same set-up as bench/run.py (real Redis pre-filled with full windows, the Beauty model, one uvicorn
worker, bench/loadgen.py in its own process). While the load runs, py-spy samples the server's Python
threads without pausing it, and /proc gives each thread's CPU time (ONNX Runtime's own worker threads
run no Python, so only the second view sees them). Writes bench/results/service_profile.md and the raw
collapsed stacks to bench/results/tmp/ (feed them to speedscope or flamegraph.pl).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import RESULTS, BenchError, Child, free_port, make_windows, read_sequences, wait_ready
from bench.run import ensure_artifact, loadgen, population_source, prefill, probe, request_templates

# (category, substring of py-spy's short file name); a sample goes to the innermost frame that matches.
# Libraries without a rule (numpy, orjson, uuid, logging, typing...) count for whoever called them.
RULES: list[tuple[str, str]] = [
    ("ONNX Runtime session.run", "onnxruntime/"),
    ("app: model encode/pad/top-k", "app/model.py"),
    ("app: micro-batcher", "app/batching.py"),
    ("app: window store", "app/windows.py"),
    ("app: observability middleware", "app/observability.py"),
    ("app: body-limit middleware / errors", "app/errors.py"),
    ("app: routes, events, deps", "app/routes.py"),
    ("app: routes, events, deps", "app/events.py"),
    ("app: routes, events, deps", "app/deps.py"),
    ("app: routes, events, deps", "app/hotpath.py"),
    ("app: Redis client", "app/redis_client.py"),
    ("app: state saves, live quality", "app/statesave.py"),
    ("app: state saves, live quality", "app/quality.py"),
    ("app: other", "app/"),
    ("prometheus-client", "prometheus_client/"),
    ("redis-py client", "redis/"),
    ("pydantic validation", "pydantic"),
    ("thread hand-off: AnyIO threadpool (sync dependency)", "anyio/"),
    ("thread hand-off: AnyIO threadpool (sync dependency)", "starlette/concurrency.py"),
    ("FastAPI routing, dependencies", "fastapi/"),
    ("Starlette", "starlette/"),
    ("uvicorn HTTP protocol", "uvicorn/protocols/"),
    ("uvicorn HTTP protocol", "uvicorn/middleware/"),
]
# Plumbing that counts for the innermost owner above it, and only on its own when there is none (e.g. the
# event loop's own native work: socket reads/writes, HTTP parsing in httptools, callbacks).
HELPERS: list[tuple[str, str]] = [
    ("thread hand-off: executor / queue (idle waits included)", "concurrent/"),
    ("thread hand-off: executor / queue (idle waits included)", "threading.py"),
    ("thread hand-off: executor / queue (idle waits included)", "queue.py"),
    ("event loop itself (uvloop: sockets, httptools parsing, callbacks)", "asyncio/"),
    ("event loop itself (uvloop: sockets, httptools parsing, callbacks)", "uvloop/"),
]


def frame_file(frame: str) -> str:
    """'func (path/file.py:12)' -> 'path/file.py'."""
    if "(" not in frame:
        return ""
    return frame.rsplit("(", 1)[1].rstrip(")").rsplit(":", 1)[0]


# Outer frames every sample of the main thread has: they own nothing.
OUTER = (
    "app/__main__.py",
    "app/cli.py",
    "uvicorn/main.py",
    "uvicorn/server.py",
    "uvicorn/_compat.py",
    "<frozen runpy>",
)


def categorise(frames: list[str]) -> str:
    for rules in (RULES, HELPERS):
        for frame in reversed(frames):
            path = frame_file(frame)
            if path.startswith(OUTER):
                continue
            for category, needle in rules:
                if needle in path:
                    return category
    return "other (interpreter start-up, GC, unattributed)"


def summarise_stacks(raw: Path) -> dict[int, dict[str, Any]]:
    """Per Python thread (by native id): its name, sample count, components and own-time functions."""
    threads: dict[int, dict[str, Any]] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        head = frames[0]
        if not head.startswith("thread ("):
            continue
        tid = int(head[len("thread (") :].split(")", 1)[0], 0)
        name = head.split("): ", 1)[1] if "): " in head else "?"
        t = threads.setdefault(tid, {"name": name, "samples": 0, "categories": Counter(), "self": Counter()})
        n = int(count)
        frames = frames[1:]
        t["samples"] += n
        t["categories"][categorise(frames)] += n
        if frames:
            t["self"][frames[-1]] += n
    return threads


def thread_cpu(pid: int) -> dict[int, float]:
    """{tid: cpu seconds} from /proc (Linux)."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


def group_name(name: str) -> str:
    return "AnyIO worker threads (FastAPI's threadpool)" if name.startswith("AnyIO worker") else name


def report(
    stacks: dict[int, dict[str, Any]],
    before: dict[int, float],
    after: dict[int, float],
    load: dict[str, Any],
    args: argparse.Namespace,
    elapsed: float,
    redis_cpu: float | None = None,
) -> str:
    requests = max(1, round(load["requests"] * (1 + args.warmup / args.duration)))  # warm-up was sampled too
    cpu: dict[str, float] = {}
    for tid, seconds in after.items():
        used = seconds - before.get(tid, 0.0)
        name = (
            group_name(stacks[tid]["name"])
            if tid in stacks
            else "native threads (ONNX Runtime intra-op pool)"
        )
        cpu[name] = cpu.get(name, 0.0) + used
    total_cpu = sum(cpu.values())
    load_desc = (
        f"{args.connections} connections" if args.mode == "closed" else f"{args.rate:.0f} req/s offered"
    )
    lines = [
        "# Where nextact's time goes under load",
        "",
        (
            f"{args.mode} loop ({load_desc}), {args.warmup + args.duration:.0f} s sampled by py-spy at {args.rate_hz} Hz "
            f"(non-blocking, idle excluded); {load['rps']:.0f} req/s answered, p50 {load['latency_ms']['p50']} ms, "
            f"p99 {load['latency_ms']['p99']} ms. Server process CPU {total_cpu:.1f} s = "
            f"**{total_cpu * 1000 / requests:.3f} ms per request**. "
            + (
                f"Redis CPU {redis_cpu * 1000 / requests:.3f} ms per request (its process, /proc). "
                if redis_cpu is not None
                else ""
            )
            + f"Machine load average at the end: {[round(x, 2) for x in os.getloadavg()]}."
        ),
        "",
        "## CPU time by thread (/proc; the only view that sees ONNX Runtime's native worker threads)",
        "",
        "| thread | CPU s | share | ms per request |",
        "|---|---:|---:|---:|",
        *[
            f"| {n} | {c:.2f} | {c / total_cpu:.0%} | {c * 1000 / requests:.3f} |"
            for n, c in sorted(cpu.items(), key=lambda kv: -kv[1])
            if c > 0
        ],
    ]
    for name in ("MainThread", "nextact-infer_0"):
        tids = [tid for tid, t in stacks.items() if t["name"] == name]
        if not tids:
            continue
        t = stacks[tids[0]]
        total = t["samples"] or 1
        ms = cpu.get(name, 0.0) * 1000 / requests
        lines += [
            "",
            f"## {name}: components ({total} samples; a sample counts for its innermost known frame)",
            "",
            "| component | share of the thread | ≈ ms per request |",
            "|---|---:|---:|",
            *[f"| {c} | {n / total:.1%} | {n / total * ms:.3f} |" for c, n in t["categories"].most_common()],
            "",
            f"{name}: top functions by own samples",
            "",
            "| function | share |",
            "|---|---:|",
            *[f"| `{f}` | {n / total:.1%} |" for f, n in t["self"].most_common(15)],
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact-dir", type=Path, default=ROOT / "artifacts" / "beauty")
    p.add_argument("--data", type=Path)
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--templates", type=int, default=20_000)
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--rate", type=float, default=1000.0, help="open loop: offered req/s")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--open-connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rate-hz", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--max-requests", type=int, default=500_000)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--out", type=Path, default=RESULTS / "service_profile.md")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop every child
    if not shutil.which("py-spy"):
        raise BenchError("py-spy not found: pip install py-spy")

    from app.manifest import read_manifest
    from app.redis_server import EmbeddedRedis

    art = ensure_artifact(args)
    manifest = read_manifest(art)
    data, col = population_source(manifest, args)
    rng = random.Random(args.seed)
    sequences = read_sequences(data, col)
    work = Path(tempfile.mkdtemp(prefix="nextact-profile-"))
    print(f"==> scratch directory {work} (logs, Redis data): removed after a successful run", flush=True)
    templates = work / "requests.json"
    request_templates(templates, sequences, args.users, args.templates, rng)
    raw_dir = RESULTS / "tmp"
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw = raw_dir / "service_profile.collapsed"
    redis = EmbeddedRedis(work / "redis", port=0, appendfsync="everysec")
    server: Child | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        redis.start()
        asyncio.run(
            prefill(redis.url, make_windows(sequences, args.users, manifest.window, rng), manifest.window)
        )
        port = free_port()
        env = {
            "NEXTACT_REDIS_URL": redis.url,
            "NEXTACT_ARTIFACT_DIR": str(art),
            "NEXTACT_LOG_LEVEL": "warning",
            "NEXTACT_HOST": "127.0.0.1",
            "NEXTACT_PORT": str(port),
            "NEXTACT_WORKERS": "1",
            **dict(e.split("=", 1) for e in args.env),
        }
        server = Child("nextact", [sys.executable, "-m", "app"], work / "nextact.log", env).start()
        wait_ready(server, port, probe(templates, "probe"))
        # uvicorn may run the app in the process it was started as (1 worker): that is the one to sample
        before = thread_cpu(server.pid)
        assert redis.process is not None
        redis_before = sum(thread_cpu(redis.process.pid).values())
        cpu0 = time.monotonic()
        spy = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(server.pid),
                "--rate",
                str(args.rate_hz),
                "--duration",
                str(int(args.duration + args.warmup)),
                "--format",
                "raw",
                "--nonblocking",
                "--threads",
                "--function",
                "--output",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        load = loadgen(port, templates, work / "load.json", args.mode, args, "prof-", args.rate)
        after = thread_cpu(server.pid)
        redis_cpu = sum(thread_cpu(redis.process.pid).values()) - redis_before
        elapsed = time.monotonic() - cpu0
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0 or not raw.is_file():
            raise BenchError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-1500:]}")
        spy = None
    finally:
        if spy is not None and spy.poll() is None:
            os.killpg(spy.pid, 15)
            spy.wait(10)
        if server is not None:
            server.stop()
        redis.stop()
    text = report(summarise_stacks(raw), before, after, load, args, elapsed, redis_cpu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    print(text)
    print(f"==> wrote {args.out}; raw stacks in {raw}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"profile failed: {e}", file=sys.stderr)
        sys.exit(1)

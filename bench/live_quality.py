"""What live quality and a shadow candidate cost: server CPU per request, Redis CPU per request, bytes per user.

    python bench/live_quality.py --quick     # ~2 minutes: writes bench/results/live_quality.{json,md}

One real Redis (embedded, free port) and, per configuration, one `python -m app` (one uvicorn worker) on
loopback, driven by bench/loadgen.py in a closed loop (POST /v1/users/{id}/events?k=10, one real action per
request, random users of a fixed population, so after the first event of a user every event is scored).
Configurations: live quality off, on, and on with a shadow candidate (the same network under another version,
so it costs what a candidate of the same size costs). CPU is the server's process-tree CPU time (and Redis's)
over the measured seconds divided by the requests answered; rounds alternate the configurations, and each
figure is reported as the range over rounds (the machine may be shared: read ranges, not single numbers).
"""

from __future__ import annotations

import argparse
import json
import random
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
    machine,
    process_tree_stats,
    read_sequences,
    user_id,
    wait_ready,
    write_json,
)

CONFIGS: dict[str, dict[str, str]] = {
    "live quality off": {"NEXTACT_LIVE_QUALITY": "false"},
    "live quality on": {"NEXTACT_LIVE_QUALITY": "true"},
    "live quality on + shadow candidate": {
        "NEXTACT_LIVE_QUALITY": "true",
        "NEXTACT_CANDIDATE_MODE": "shadow",
    },
}


def train(out: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "training",
        "train",
        "--data",
        str(SAMPLE_DATA),
        "--action-col",
        "item_id",
        "--out",
        str(out),
        "--quiet",
        "--seed",
        "7",
        "--window",
        "50",
        "--epochs",
        "1",
        "--preset",
        "none",  # the plain defaults, as measured
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise BenchError(f"training failed: {done.stderr[-2000:]}")
    return out


def requests_file(path: Path, sequences: list[list[str]], users: int, n: int, rng: random.Random) -> None:
    reqs = []
    for _ in range(n):
        body = json.dumps(
            {"action": rng.choice(rng.choice(sequences)), "event_id": PLACEHOLDER}, separators=(",", ":")
        )
        reqs.append({"path": f"/v1/users/{user_id(rng.randrange(users))}/events?k=10", "body": body})
    path.write_text(json.dumps({"method": "POST", "placeholder": PLACEHOLDER, "requests": reqs}))


def measure(
    name: str,
    env: dict[str, str],
    args: argparse.Namespace,
    work: Path,
    redis_pid: int,
    templates: Path,
    rnd: int,
) -> dict[str, Any]:
    port = free_port()
    child = Child(
        f"nextact ({name})",
        [sys.executable, "-m", "app"],
        work / f"server-{rnd}-{port}.log",
        {"NEXTACT_PORT": str(port), "NEXTACT_LOG_LEVEL": "warning", **env},
    ).start()
    try:
        first = json.loads(templates.read_text())["requests"][0]
        wait_ready(
            child, port, (first["path"], first["body"].replace(PLACEHOLDER, "probe" + "0" * 16).encode())
        )
        tag = f"r{rnd}{port}"
        warm = [
            sys.executable,
            str(ROOT / "bench" / "loadgen.py"),
            "--port",
            str(port),
            "--requests",
            str(templates),
            "--mode",
            "closed",
            "--connections",
            str(args.connections),
            "--warmup",
            "0",
            "--duration",
            str(args.warmup),
            "--tag",
            tag + "w",
        ]
        subprocess.run(warm, cwd=ROOT, capture_output=True, timeout=args.warmup + 60, check=True)
        before, redis_before = process_tree_stats(child.pid)["cpu_s"], process_tree_stats(redis_pid)["cpu_s"]
        out = work / f"load-{rnd}-{port}.json"
        cmd = [*warm[:-6], "--warmup", "0", "--duration", str(args.duration), "--tag", tag, "--out", str(out)]
        subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=args.duration + 60, check=True)
        cpu = process_tree_stats(child.pid)["cpu_s"] - before
        redis_cpu = process_tree_stats(redis_pid)["cpu_s"] - redis_before
        load = json.loads(out.read_text())
        done = load["ok"] if "ok" in load else load["requests"]
        return {
            "requests": done,
            "throughput_rps": round(done / args.duration, 1),
            "server_cpu_us_per_request": round(cpu / done * 1e6, 1),
            "redis_cpu_us_per_request": round(redis_cpu / done * 1e6, 1),
        }
    finally:
        child.stop()


def micro(artifact: Path, redis_url: str, n: int = 4096, batch: int = 16) -> dict[str, float]:
    """CPU time (this process, so robust to a busy machine) of each piece live quality adds to a request, us."""
    import asyncio

    import numpy as np
    from prometheus_client import CollectorRegistry

    from app.model import load_model
    from app.quality import DEPTH, LiveQuality, PredictionLog, pack, score_event
    from app.redis_client import connect
    from app.windows import SCORED, LastPrediction, NewEvent, WindowStore

    plain = load_model(artifact, device="cpu", intra_op_threads=1)
    ranked = load_model(artifact, device="cpu", intra_op_threads=1, rank_depth=DEPTH)
    vocab = plain.manifest.vocabulary[2:]
    rng = random.Random(1)
    windows = [[rng.choice(vocab) for _ in range(plain.manifest.window)] for _ in range(n)]

    def per_request(fn: Any, count: int = n) -> float:
        start = time.process_time()
        fn()
        return (time.process_time() - start) / count * 1e6

    batches = [[(w, 10) for w in windows[i : i + batch]] for i in range(0, n, batch)]
    probs = [
        plain.probabilities([plain.encode(w)[0] for w, _ in b]) for b in batches
    ]  # (B, V) each, run once

    def decode(
        model: Any,
    ) -> None:  # top-k (and the ranking) from the same probabilities: the part that differs
        for b, p in zip(batches, probs, strict=True):
            model._decode(p.copy(), [k for _, k in b], [0] * len(b))

    out = {
        "decode_top10_us": per_request(lambda: decode(plain)),
        "decode_top10_plus_ranked20_us": per_request(lambda: decode(ranked)),
        "model_run_us": per_request(
            lambda: [plain.probabilities([plain.encode(w)[0] for w, _ in b]) for b in batches]
        ),
    }
    preds = [p for i in range(0, n, batch) for p in ranked.predict([(w, 10) for w in windows[i : i + batch]])]
    out["pack_us"] = per_request(
        lambda: [pack([(ranked.version, p.ranked, ranked.vocab_size)]) for p in preds]
    )
    lasts = [LastPrediction(SCORED, 0, pack([(ranked.version, p.ranked, ranked.vocab_size)])) for p in preds]
    events = [[NewEvent("e", rng.choice(vocab), 1.0)] for _ in range(n)]
    quality = LiveQuality(CollectorRegistry())
    by_version = {ranked.version: ranked}.get
    out["score_us"] = per_request(
        lambda: [score_event(quality, last, ev, by_version) for last, ev in zip(lasts, events, strict=True)]
    )

    async def writes() -> float:
        conn = connect(redis_url, max_connections=16, timeout_seconds=2, retries=1)
        store = WindowStore(conn.client, "micro", 3600, conn.address, direct=conn.direct)
        await store.load_script()
        log = PredictionLog(store, quality)
        blob = pack([(ranked.version, np.arange(DEPTH), ranked.vocab_size)])
        start = time.process_time()
        for i in range(0, n, batch):  # a micro-batch's worth of answers per event-loop turn
            for j in range(i, i + batch):
                await log.settle(f"u{j}")
                log.remember(f"u{j}", 0, blob)
            await asyncio.sleep(0)
            await log.drain()
        spent = (time.process_time() - start) / n * 1e6
        await conn.close()
        return spent

    out["store_prediction_us"] = asyncio.run(writes())
    out["live_quality_total_us"] = (
        out["decode_top10_plus_ranked20_us"]
        - out["decode_top10_us"]
        + out["pack_us"]
        + out["score_us"]
        + out["store_prediction_us"]
    )
    return {k: round(v, 1) for k, v in out.items()}


def bytes_per_user(url: str, prefix: str, users: int) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        sizes, records = [], []
        for i in range(users):
            key = f"{prefix}:{{{user_id(i)}}}:s"
            if client.exists(key):
                sizes.append(client.memory_usage(key) or 0)
                records.append(len(client.hget(key, "p") or b""))
        if not sizes:
            return {}
        return {
            "users_sampled": len(sizes),
            "record_bytes_mean": round(sum(records) / len(records), 1),
            "redis_memory_usage_bytes_mean": round(sum(sizes) / len(sizes), 1),
        }
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds of 6 s per configuration")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument(
        "--artifact", type=Path, help="a trained artifact (default: train one on the Beauty sample)"
    )
    p.add_argument(
        "--micro-only",
        action="store_true",
        help="re-measure only the in-process pieces, into the results file",
    )
    args = p.parse_args(argv)
    if args.micro_only:
        return micro_only(args)
    if args.quick:
        args.rounds, args.duration, args.warmup = 2, 6.0, 2.0
    from app.redis_server import EmbeddedRedis
    from tests.artifact_edits import new_version

    with tempfile.TemporaryDirectory(prefix="nextact-lq-") as tmp:
        work = Path(tmp)
        artifact = args.artifact or train(work / "live")
        candidate = work / "candidate"
        new_version(artifact, candidate, "shadow")
        redis = EmbeddedRedis(work / "redis", port=0).start()
        try:
            templates = work / "requests.json"
            requests_file(
                templates, read_sequences(SAMPLE_DATA, "item_id"), args.users, 20_000, random.Random(0)
            )
            base = {
                "NEXTACT_ARTIFACT_DIR": str(artifact),
                "NEXTACT_REDIS_URL": redis.url,
                "NEXTACT_CANDIDATE_ARTIFACT_DIR": "",
            }
            rows: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
            for rnd in range(args.rounds):
                for i, (name, env) in enumerate(CONFIGS.items()):
                    extra = dict(env)
                    if "NEXTACT_CANDIDATE_MODE" in extra:
                        extra["NEXTACT_CANDIDATE_ARTIFACT_DIR"] = str(candidate)
                    else:
                        extra.pop("NEXTACT_CANDIDATE_ARTIFACT_DIR", None)
                    env_all = {
                        **{k: v for k, v in base.items() if v},
                        **extra,
                        "NEXTACT_KEY_PREFIX": f"lq{i}",
                    }
                    rows[name].append(measure(name, env_all, args, work, redis.process.pid, templates, rnd))
                    print(name, rows[name][-1], flush=True)
            memory = bytes_per_user(redis.url, "lq1", args.users)
            pieces = micro(artifact, redis.url)
            print(pieces, flush=True)
        finally:
            redis.stop()
    result = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rounds": rows,
        "bytes_per_user": memory,
        "micro_us": pieces,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(RESULTS / "live_quality.json", result)
    (RESULTS / "live_quality.md").write_text(report(result))
    print(report(result))
    return 0


def micro_only(args: argparse.Namespace) -> int:
    from app.redis_server import EmbeddedRedis

    result = json.loads((RESULTS / "live_quality.json").read_text())
    with tempfile.TemporaryDirectory(prefix="nextact-lq-") as tmp:
        artifact = args.artifact or train(Path(tmp) / "live")
        redis = EmbeddedRedis(Path(tmp) / "redis", port=0).start()
        try:
            result["micro_us"] = micro(artifact, redis.url)
        finally:
            redis.stop()
    write_json(RESULTS / "live_quality.json", result)
    (RESULTS / "live_quality.md").write_text(report(result))
    print(report(result))
    return 0


def report(result: dict[str, Any]) -> str:
    rows = result["rounds"]
    off = rows["live quality off"]
    lines = [
        "# Live quality and shadow scoring: cost per request",
        "",
        (
            f"Machine: {result['machine'].get('cpu')} ({result['machine'].get('cpu_affinity')} CPUs usable, "
            "shared with other work: ranges over rounds)."
        ),
        "",
        (
            "| configuration | throughput (req/s) | server CPU per request (us) | vs off, same round "
            "| Redis CPU per request (us) |"
        ),
        "|---|---|---|---|---|",
    ]
    base = [r["server_cpu_us_per_request"] for r in off]
    for name, rs in rows.items():
        cpu = [r["server_cpu_us_per_request"] for r in rs]
        rps = [r["throughput_rps"] for r in rs]
        red = [r["redis_cpu_us_per_request"] for r in rs]
        extra = [100 * (c / b - 1) for c, b in zip(cpu, base, strict=True)]
        lines.append(
            f"| {name} | {min(rps):.0f}-{max(rps):.0f} | {min(cpu):.0f}-{max(cpu):.0f} | "
            f"{min(extra):+.1f}% to {max(extra):+.1f}% (median {sorted(extra)[len(extra) // 2]:+.1f}%) | "
            f"{min(red):.0f}-{max(red):.0f} |"
        )
    mu = result["micro_us"]
    median_off = sorted(base)[len(base) // 2]
    lines += [
        "",
        (
            "CPU time of each piece live quality adds, measured in-process (process CPU time, so much less "
            "affected by other work on the machine), per request, us:"
        ),
        "",
        "| piece | us per request |",
        "|---|---|",
        (
            f"| top-20 ranking kept beside the top-10 answer (batches of 16) | "
            f"{mu['decode_top10_plus_ranked20_us'] - mu['decode_top10_us']:.1f} |"
        ),
        f"| pack the top-20 record | {mu['pack_us']:.1f} |",
        f"| score the next event against it | {mu['score_us']:.1f} |",
        f"| store it (coalesced pipelined write, 16 per turn; client side) | {mu['store_prediction_us']:.1f} |",
        (
            f"| **total** | **{mu['live_quality_total_us']:.1f}** "
            f"({100 * mu['live_quality_total_us'] / median_off:.1f}% of the median server CPU per request "
            f"with live quality off, {median_off:.0f} us) |"
        ),
    ]
    m = result["bytes_per_user"]
    if m:
        lines += [
            "",
            (
                f"Stored per user for live quality: a {m['record_bytes_mean']:.0f}-byte record (field `p`) in the "
                f"user's `:s` hash; Redis MEMORY USAGE of that hash {m['redis_memory_usage_bytes_mean']:.0f} bytes "
                f"(mean over {m['users_sampled']} users)."
            ),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

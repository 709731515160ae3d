"""Redis memory per user window, one command:

    python bench/memory_per_user.py                 # 2,000 users per scenario, window 50: ~1 minute
    python bench/memory_per_user.py --users 500     # quicker
    python bench/memory_per_user.py --redis-url URL --out bench/results/memory_per_user.redis7
                                                    # another Redis (empty; it is flushed), e.g. production's

Starts the embedded redis-server (free loopback port, temporary directory, stopped at the end), then per
scenario: empties it, writes --users users through the service's own window store (app/windows.py: the
same Lua script, key layout and member encoding as POST /v1/users/{user_id}/events), `--events` events per
user in batches of `--batch`, so every window is full and has been trimmed, as in steady state. It then
reads MEMORY USAGE (SAMPLES 0: exact) of each user's two keys, their encodings, and the change of INFO
used_memory (which also counts the keyspace and TTL dictionaries). Writes bench/results/memory_per_user.json
and memory_per_user.md, with projections for 10 and 100 million users.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis

from app.redis_client import connect
from app.redis_server import EmbeddedRedis, redis_server_binary
from app.windows import NewEvent, WindowStore
from bench.harness import RESULTS, SAMPLE_DATA, machine, read_sequences, user_id, write_json

TAOBAO_DATA = ROOT / "examples" / "taobao_sample.csv"
PREFIX = "nextact"
TTL_SECONDS = 30 * 24 * 3600
PROJECTIONS = (10_000_000, 100_000_000)
GIB = 2**30


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    actions: Callable[[random.Random], str]
    event_id: Callable[[random.Random], str]


def scenarios() -> list[Scenario]:
    beauty = [a for seq in read_sequences(SAMPLE_DATA, "item_id") for a in seq]
    taobao = [a for seq in read_sequences(TAOBAO_DATA, "behavior") for a in seq]

    def server_id(_: random.Random) -> str:
        return uuid.uuid4().hex  # what the service assigns to an event sent without event_id (app/events.py)

    def client_uuid(_: random.Random) -> str:
        return str(uuid.uuid4())

    def asin(rng: random.Random) -> str:
        return "B0" + "".join(rng.choices("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=8))

    def long_id(rng: random.Random) -> str:
        return f"evt-{uuid.uuid4()}-{rng.randrange(10**6):06d}"  # 47 characters

    return [
        Scenario(
            "beauty-items",
            "Beauty sample item ids (1-5 digits), server-assigned event ids (32 hex)",
            lambda rng: rng.choice(beauty),
            server_id,
        ),
        Scenario(
            "taobao-behaviours",
            "Taobao behaviours (pv/cart/fav/buy), server-assigned event ids (32 hex)",
            lambda rng: rng.choice(taobao),
            server_id,
        ),
        Scenario(
            "asin-client-uuid",
            "Amazon-style item ids (10 chars), client event ids (36-char UUID)",
            asin,
            client_uuid,
        ),
        Scenario(
            "long-event-ids",
            "Beauty item ids, 47-character client event ids: members over 64 bytes",
            lambda rng: rng.choice(beauty),
            long_id,
        ),
    ]


async def fill(
    store: WindowStore, scenario: Scenario, users: int, events: int, batch: int, window: int, seed: int
) -> None:
    """Each user gets `events` events, minutes apart, in appends of `batch`; many users at once."""
    rng = random.Random(seed)
    start = time.time() - events * 300

    async def one(i: int) -> None:
        uid = user_id(i)
        ts = start + rng.random() * 100
        for first in range(0, events, batch):
            chunk = []
            for _ in range(min(batch, events - first)):
                ts += rng.uniform(1, 600)
                chunk.append(NewEvent(scenario.event_id(rng), scenario.actions(rng), ts))
            await store.append(uid, chunk, window)

    for lo in range(0, users, 200):
        await asyncio.gather(*(one(i) for i in range(lo, min(users, lo + 200))))


def measure(
    client: redis.Redis, store: WindowStore, users: int, window: int, baseline: int
) -> dict[str, Any]:
    used = int(client.info("memory")["used_memory"])
    per_user: list[int] = []
    lengths: list[int] = []
    per_key: dict[str, list[int]] = {"w": [], "i": []}
    encodings: Counter[str] = Counter()
    for i in range(users):
        total = 0
        for kind, key in zip(("w", "i"), store.keys(user_id(i)), strict=True):
            size = int(client.memory_usage(key, samples=0) or 0)
            per_key[kind].append(size)
            total += size
            encodings[f"{kind}:{client.object('encoding', key).decode()}"] += 1
        per_user.append(total)
        lengths.append(int(client.zcard(store.keys(user_id(i))[0])))
    assert min(lengths) == window, f"a window is not full: {min(lengths)} < {window}"
    per_user_used = (used - baseline) / users
    return {
        "memory_usage_per_user": {
            "mean": round(statistics.fmean(per_user), 1),
            "median": statistics.median(per_user),
            "min": min(per_user),
            "max": max(per_user),
            "window_zset_mean": round(statistics.fmean(per_key["w"]), 1),
            "dedupe_hash_mean": round(statistics.fmean(per_key["i"]), 1),
        },
        "used_memory_delta_per_user": round(per_user_used, 1),
        "encodings": dict(encodings),
        "projections_gib": {
            str(n): {
                "memory_usage": round(statistics.fmean(per_user) * n / GIB, 1),
                "used_memory": round(per_user_used * n / GIB, 1),
            }
            for n in PROJECTIONS
        },
    }


async def run_scenario(url: str, scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    with redis.Redis.from_url(url) as client:
        client.flushall()
        client.execute_command("SCRIPT", "FLUSH")
        baseline = int(client.info("memory")["used_memory"])  # before the service's connection pool exists
        conn = connect(url, max_connections=64, timeout_seconds=10, retries=0)
        store = WindowStore(conn.client, PREFIX, TTL_SECONDS, conn.address)
        try:
            await store.load_script()
            started = time.perf_counter()
            await fill(store, scenario, args.users, args.events, args.batch, args.window, args.seed)
            seconds = time.perf_counter() - started
        finally:
            await conn.close()
        wait_for_one_client(client)  # the pool's query buffers are not user data
        result = measure(client, store, args.users, args.window, baseline)
        member = client.zrange(store.keys(user_id(0))[0], -1, -1)[0]
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "fill_seconds": round(seconds, 1),
        "sample_member": f"{member.decode()} ({len(member)} bytes)",
        **result,
    }


def wait_for_one_client(client: redis.Redis, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while int(client.info("clients")["connected_clients"]) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def markdown(report: dict[str, Any]) -> str:
    cfg, m = report["config"], report["machine"]
    lines = [
        "# Redis memory per user window",
        "",
        (
            f"`{report['command']}` on {m['date']}: redis-server {report['redis_version']}, {report['redis']}, "
            f"allocator {report['redis_allocator']}; {cfg['users']:,} users per scenario, window {cfg['window']}, "
            f"{cfg['events']} events per user sent in batches of {cfg['batch']} (every window full and trimmed)."
        ),
        "",
        "Per user: two keys, the window (sorted set) and its dedupe index (hash). `MEMORY USAGE` is Redis's own",
        "count for the two keys (SAMPLES 0); `used_memory` delta also counts the keyspace and TTL dictionaries.",
        "",
        (
            "| scenario | MEMORY USAGE / user (mean) | zset | hash | used_memory delta / user "
            "| 10M users | 100M users | encodings |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["scenarios"]:
        mu, p = r["memory_usage_per_user"], r["projections_gib"]
        enc = ", ".join(f"{k} {v}" for k, v in sorted(r["encodings"].items()))
        lines.append(
            f"| {r['scenario']} | {mu['mean']:,.0f} B | {mu['window_zset_mean']:,.0f} B | "
            f"{mu['dedupe_hash_mean']:,.0f} B | {r['used_memory_delta_per_user']:,.0f} B | "
            f"{p['10000000']['used_memory']:,.1f} GiB | {p['100000000']['used_memory']:,.1f} GiB | {enc} |"
        )
    lines += ["", "Scenarios:", ""]
    lines += [
        f"- **{r['scenario']}**: {r['description']}; a member: `{r['sample_member']}`"
        for r in report["scenarios"]
    ]
    limits = ", ".join(f"{k} {v}" for k, v in sorted(report["redis_encoding_limits"].items()))
    lines += [
        "",
        "Compact encodings (ziplist/listpack) hold while a key has at most the configured entries and every",
        f"member is at most the configured bytes ({limits}); past either, the sorted set",
        "becomes a skiplist and costs about twice as much (the long-event-ids row).",
        "",
        "Projections are the used_memory delta times the user count: the data set alone. Size `maxmemory` and",
        "the host above it: allocator fragmentation and the copy-on-write of an append-only-file rewrite or",
        "snapshot fork need headroom (1.5x to 2x the data set is the usual rule).",
        "",
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nextact-memory-") as tmp:
        server: EmbeddedRedis | None = None
        if args.redis_url:
            url = args.redis_url
        else:
            server = EmbeddedRedis(Path(tmp), port=0, extra_args=["--appendonly", "no"]).start()
            url = server.url
        try:
            with redis.Redis.from_url(url) as client:
                if client.dbsize():
                    raise SystemExit(
                        f"{url} holds {client.dbsize()} keys: the benchmark needs an empty database"
                    )
                info = client.info("server")
                allocator = client.info("memory").get("mem_allocator", "?")
                limits = {**client.config_get("zset-max-*"), **client.config_get("hash-max-*")}
            results = []
            for scenario in scenarios():
                if args.only and scenario.name not in args.only:
                    continue
                print(f"{scenario.name}: filling {args.users} users ...", file=sys.stderr, flush=True)
                results.append(await run_scenario(url, scenario, args))
        finally:
            if server is not None:
                server.stop()
    return {
        "command": "python bench/memory_per_user.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "machine": machine(),
        "redis_version": info["redis_version"],
        "redis_allocator": allocator,
        "redis": f"embedded ({Path(redis_server_binary()).name})" if server else "external (--redis-url)",
        "redis_encoding_limits": limits,
        "config": {
            "users": args.users,
            "window": args.window,
            "events": args.events,
            "batch": args.batch,
            "ttl_seconds": TTL_SECONDS,
            "key_prefix": PREFIX,
            "user_id_example": user_id(0),
        },
        "scenarios": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--window", type=int, default=50, help="Events kept per user (the model's window).")
    parser.add_argument("--events", type=int, default=60, help="Events sent per user (more than the window).")
    parser.add_argument("--batch", type=int, default=5, help="Events per append call.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", nargs="*", help="Run only these scenarios.")
    parser.add_argument(
        "--redis-url", help="Measure this (empty; it is flushed) Redis instead of the embedded one."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "memory_per_user",
        help="Output path without suffix (.json and .md are written).",
    )
    args = parser.parse_args()
    if args.events < args.window:
        parser.error("--events must be at least --window so that every window is full")
    report = asyncio.run(main_async(args))
    write_json(Path(f"{args.out}.json"), report)
    Path(f"{args.out}.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

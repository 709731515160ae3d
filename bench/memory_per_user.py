"""Redis memory per user window, one command:

    python bench/memory_per_user.py                 # 2,000 users per scenario, window 50: ~1 minute
    python bench/memory_per_user.py --users 500     # quicker
    python bench/memory_per_user.py --redis-url URL --out bench/results/memory_per_user.redis7
                                                    # another Redis (empty; it is flushed), e.g. production's
    python bench/memory_per_user.py --layout old --out bench/results/memory_per_user.old
                                                    # the layout before the packed window, for comparison

Starts the embedded redis-server (free loopback port, temporary directory, stopped at the end), then per
scenario: empties it, writes --users users through the service's own window store (app/windows.py: the
same Lua script, key layout and record encoding as POST /v1/users/{user_id}/events; with --layout old the
earlier versions' script, app/windows_legacy.py), `--events` events per user in batches of `--batch`, so
every window is full and has been trimmed, as in steady state. It then reads MEMORY USAGE (SAMPLES 0: exact)
of each user's window keys, their encodings, and the change of INFO used_memory (which also counts the
keyspace and TTL dictionaries). Then, apart from the window, the user's `:s` hash: first with the live-quality
record the service stores by default (one model's top-20 ids), then with incremental state added (the
recurrent state as float32: 2 x --state-layers x --state-hidden x 4 bytes). Writes
bench/results/memory_per_user.json and memory_per_user.md, with projections for 10 and 100 million users.
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

import numpy as np
import redis

from app import windows_legacy as legacy
from app.quality import pack
from app.redis_client import connect
from app.redis_server import EmbeddedRedis, redis_server_binary
from app.windows import HEADER, SCRIPTS, NewEvent, WindowStore, _record, _unpack
from bench.harness import RESULTS, SAMPLE_DATA, machine, read_sequences, user_id, write_json

TAOBAO_DATA = ROOT / "examples" / "taobao_sample.csv"
PREFIX = "nextact"
TTL_SECONDS = 30 * 24 * 3600
PROJECTIONS = (10_000_000, 100_000_000)
GIB = 2**30
BEAUTY_VOCABULARY = 12_070  # the Beauty-shaped model of issue 11: prediction ids take 2 bytes each


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


def window_keys(store: WindowStore, layout: str, uid: str) -> dict[str, str]:
    """The keys holding a user's window, by kind."""
    if layout == "old":
        zset, index, _ = legacy.keys(store.prefix, uid)
        return {"zset": zset, "hash": index}
    return {"window": store.keys(uid)[0]}


async def fill(
    store: WindowStore, scenario: Scenario, args: argparse.Namespace, sync: redis.Redis | None = None
) -> None:
    """Each user gets `events` events, minutes apart, in appends of `batch`; many users at once. With `sync`
    (the old layout), through the earlier versions' script."""
    users, events, batch, window = args.users, args.events, args.batch, args.window
    rng = random.Random(args.seed)
    start = time.time() - events * 300

    async def one(i: int) -> None:
        uid = user_id(i)
        ts = start + rng.random() * 100
        for first in range(0, events, batch):
            chunk = []
            for _ in range(min(batch, events - first)):
                ts += rng.uniform(1, 600)
                chunk.append(NewEvent(scenario.event_id(rng), scenario.actions(rng), ts))
            if sync is None:
                await store.append(uid, chunk, window)
            else:
                sync.execute_command(
                    *legacy.append_command(store.prefix, uid, chunk, window, store.ttl_seconds)
                )

    for lo in range(0, users, 200):
        await asyncio.gather(*(one(i) for i in range(lo, min(users, lo + 200))))


def window_length(client: redis.Redis, layout: str, keys: dict[str, str]) -> int:
    if layout == "old":
        return int(client.zcard(keys["zset"]))
    return len(_unpack(client.get(keys["window"]) or b""))


def measure(
    client: redis.Redis, store: WindowStore, args: argparse.Namespace, baseline: int
) -> dict[str, Any]:
    users, layout = args.users, args.layout
    used = int(client.info("memory")["used_memory"])
    per_user: list[int] = []
    lengths: list[int] = []
    per_key: dict[str, list[int]] = {}
    encodings: Counter[str] = Counter()
    for i in range(users):
        total = 0
        keys = window_keys(store, layout, user_id(i))
        for kind, key in keys.items():
            size = int(client.memory_usage(key, samples=0) or 0)
            per_key.setdefault(kind, []).append(size)
            total += size
            encodings[f"{kind}:{client.object('encoding', key).decode()}"] += 1
        per_user.append(total)
        lengths.append(window_length(client, layout, keys))
    assert min(lengths) == args.window, f"a window is not full: {min(lengths)} < {args.window}"
    per_user_used = (used - baseline) / users
    return {
        "memory_usage_per_user": {
            "mean": round(statistics.fmean(per_user), 1),
            "median": statistics.median(per_user),
            "min": min(per_user),
            "max": max(per_user),
            **{f"{kind}_mean": round(statistics.fmean(v), 1) for kind, v in per_key.items()},
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


async def serving_state(store: WindowStore, client: redis.Redis, args: argparse.Namespace) -> dict[str, Any]:
    """MEMORY USAGE of the `:s` hash: with the live-quality record alone, then with incremental state too."""
    rng = np.random.default_rng(args.seed)
    state = bytes(2 * args.state_layers * args.state_hidden * 4)  # h and c, float32
    sizes: dict[str, list[int]] = {"live_quality": [], "live_quality_and_state": []}
    encodings: Counter[str] = Counter()
    for i in range(args.users):
        uid = user_id(i)
        seq = int.from_bytes((client.get(store.keys(uid)[0]) or b"")[1:HEADER], "big")
        ids = rng.choice(BEAUTY_VOCABULARY, size=20, replace=False)
        assert await store.save_prediction(uid, seq, pack([("v1", ids, BEAUTY_VOCABULARY)]))
        sizes["live_quality"].append(int(client.memory_usage(store.state_key(uid), samples=0) or 0))
        assert await store.save_state(uid, seq, "v1", state)
        sizes["live_quality_and_state"].append(int(client.memory_usage(store.state_key(uid), samples=0) or 0))
        encodings[client.object("encoding", store.state_key(uid)).decode()] += 1
    return {
        "state_bytes": len(state),
        "memory_usage_mean": {k: round(statistics.fmean(v), 1) for k, v in sizes.items()},
        "encodings_with_state": dict(encodings),
    }


async def run_scenario(url: str, scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    with redis.Redis.from_url(url) as client:
        client.execute_command("FLUSHALL", "SYNC")  # Valkey flushes in the background by default
        client.execute_command("SCRIPT", "FLUSH", "SYNC")
        for source in (*SCRIPTS.values(), legacy.APPEND_LUA):  # the script cache is not user data
            client.script_load(source)
        baseline = int(client.info("memory")["used_memory"])  # before the service's connection pool exists
        conn = connect(url, max_connections=64, timeout_seconds=10, retries=0)
        store = WindowStore(conn.client, PREFIX, TTL_SECONDS, conn.address)
        sync = redis.Redis.from_url(url) if args.layout == "old" else None
        try:
            await store.load_script()
            if sync is not None:
                sync.script_load(legacy.APPEND_LUA)
            started = time.perf_counter()
            await fill(store, scenario, args, sync)
            seconds = time.perf_counter() - started
        finally:
            await conn.close()
            if sync is not None:
                sync.close()
        wait_for_one_client(client)  # the pool's query buffers are not user data
        result = measure(client, store, args, baseline)
        state = None
        if args.layout == "packed":
            conn = connect(url, max_connections=4, timeout_seconds=10, retries=0)
            try:
                store = WindowStore(conn.client, PREFIX, TTL_SECONDS, conn.address)
                state = await serving_state(store, client, args)
            finally:
                await conn.close()
        if args.layout == "old":
            member = client.zrange(window_keys(store, "old", user_id(0))["zset"], -1, -1)[0]
            sample = f"a member: `{member.decode()}` ({len(member)} bytes)"
        else:
            value = client.get(store.keys(user_id(0))[0]) or b""
            last = _unpack(value)[-1]
            record = _record(NewEvent(last.event_id, last.action, last.timestamp))
            assert value.endswith(record)
            sample = (
                f"the packed window: {len(value):,} bytes ({HEADER} of header, "
                f"{(len(value) - HEADER) / args.window:.1f} per event); its newest record: `{record.hex()}`"
            )
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "fill_seconds": round(seconds, 1),
        "sample": sample,
        **result,
        **({"serving_state": state} if state else {}),
    }


def wait_for_one_client(client: redis.Redis, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while int(client.info("clients")["connected_clients"]) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def markdown(report: dict[str, Any]) -> str:
    cfg, m = report["config"], report["machine"]
    old = cfg["layout"] == "old"
    kinds = ["zset", "hash"] if old else ["window"]
    what = (
        "two keys, the window (sorted set) and its dedupe index (hash): the layout before the packed window"
        if old
        else "one key, the packed window (a string: events, ids, arrival counter)"
    )
    lines = [
        "# Redis memory per user window" + (" (old layout)" if old else ""),
        "",
        (
            f"`{report['command']}` on {m['date']}: {report['server']}, {report['redis']}, "
            f"allocator {report['redis_allocator']}; {cfg['users']:,} users per scenario, window {cfg['window']}, "
            f"{cfg['events']} events per user sent in batches of {cfg['batch']} (every window full and trimmed)."
        ),
        "",
        f"Per user: {what}. `MEMORY USAGE` is Redis's own count for the window's keys (SAMPLES 0);",
        "`used_memory` delta also counts the keyspace and TTL dictionaries.",
        "",
        (
            f"| scenario | MEMORY USAGE / user (mean) | {' | '.join(kinds)} | used_memory delta / user "
            "| 10M users | 100M users | encodings |"
        ),
        "|---|---:|" + "---:|" * len(kinds) + "---:|---:|---:|---|",
    ]
    for r in report["scenarios"]:
        mu, p = r["memory_usage_per_user"], r["projections_gib"]
        enc = ", ".join(f"{k} {v}" for k, v in sorted(r["encodings"].items()))
        per_kind = " | ".join(f"{mu[f'{k}_mean']:,.0f} B" for k in kinds)
        lines.append(
            f"| {r['scenario']} | {mu['mean']:,.0f} B | {per_kind} | {r['used_memory_delta_per_user']:,.0f} B | "
            f"{p['10000000']['used_memory']:,.1f} GiB | {p['100000000']['used_memory']:,.1f} GiB | {enc} |"
        )
    lines += ["", "Scenarios:", ""]
    lines += [f"- **{r['scenario']}**: {r['description']}; {r['sample']}" for r in report["scenarios"]]
    if not old:
        states = [r for r in report["scenarios"] if "serving_state" in r]
        if states:
            st = states[0]["serving_state"]
            lines += [
                "",
                "Apart from the window, the user's `:s` hash (`MEMORY USAGE`, mean; the same in every layout):",
                "",
                "| scenario | live-quality record (default) | plus incremental state | state bytes | encoding |",
                "|---|---:|---:|---:|---|",
            ]
            for r in states:
                mu = r["serving_state"]["memory_usage_mean"]
                enc = ", ".join(f"{k} {v}" for k, v in r["serving_state"]["encodings_with_state"].items())
                lines.append(
                    f"| {r['scenario']} | {mu['live_quality']:,.0f} B | {mu['live_quality_and_state']:,.0f} B | "
                    f"{r['serving_state']['state_bytes']:,} | {enc} |"
                )
            lines += [
                "",
                (
                    f"Live quality stores one model's top-20 ids (vocabulary {BEAUTY_VOCABULARY:,}: 2 bytes "
                    f"each); incremental state adds the recurrent state as float32, 2 (h and c) x "
                    f"{cfg['state_layers']} layer(s) x {cfg['state_hidden']} x 4 = {st['state_bytes']:,} bytes."
                ),
            ]
    limits = ", ".join(f"{k} {v}" for k, v in sorted(report["redis_encoding_limits"].items()))
    if old:
        lines += [
            "",
            "Compact encodings (ziplist/listpack) hold while a key has at most the configured entries and every",
            f"member is at most the configured bytes ({limits}); past either, the sorted set",
            "becomes a skiplist and costs about twice as much (the long-event-ids row).",
        ]
    lines += [
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
        "server": (
            f"valkey-server {info['valkey_version']}"
            if "valkey_version" in info
            else f"redis-server {info['redis_version']}"
        ),
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
            "layout": args.layout,
            "state_hidden": args.state_hidden,
            "state_layers": args.state_layers,
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
        "--layout",
        choices=("packed", "old"),
        default="packed",
        help="packed: this version's window; old: the sorted set + hash of earlier versions.",
    )
    parser.add_argument("--state-hidden", type=int, default=256, help="Hidden size of the measured state.")
    parser.add_argument("--state-layers", type=int, default=1, help="Recurrent layers of the measured state.")
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

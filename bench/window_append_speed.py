"""Redis time per append, packed window vs the old sorted set + hash layout, one command:

    python bench/window_append_speed.py                    # the embedded server, ~30 s
    python bench/window_append_speed.py --redis-url URL --out bench/results/window_append_speed.redis7

Fills --users users per layout with full windows (--window Beauty events, server-assigned ids), then sends
rounds of appends of one new event to those full windows (each trims one event), alternating old and new
scripts round by round, and reads Redis's own time per call from INFO commandstats (usec_per_call of
EVALSHA, reset before each round): the script's cost inside Redis, without the network or the client.
Writes bench/results/window_append_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import timeit
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis

from app import windows_legacy as legacy
from app.redis_server import EmbeddedRedis, redis_server_binary
from app.windows import APPEND_LUA, NewEvent, WindowStore, _actions
from bench.harness import RESULTS, SAMPLE_DATA, machine, read_sequences, user_id, write_json

TTL_SECONDS = 30 * 24 * 3600


def commands(layout: str, prefix: str, uid: str, events: list[NewEvent], window: int) -> list[Any]:
    if layout == "old":
        return legacy.append_command(prefix, uid, events, window, TTL_SECONDS)
    sha, keys, args = WindowStore(None, prefix, TTL_SECONDS, "").append_call(uid, events, window)
    return ["EVALSHA", sha, len(keys), *keys, *args]


def usec_per_call(client: redis.Redis) -> float:
    return float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])


def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    actions = [a for seq in read_sequences(SAMPLE_DATA, "item_id") for a in seq]
    rng = random.Random(args.seed)
    client = redis.Redis.from_url(url)
    client.execute_command("FLUSHALL", "SYNC")
    client.script_load(legacy.APPEND_LUA)
    client.script_load(APPEND_LUA)
    clock = {"old": 1.6e9, "new": 1.6e9}

    def send(layout: str, events_per_user: int) -> None:
        pipe = client.pipeline(transaction=False)
        for i in range(args.users):
            events = [
                NewEvent(uuid.uuid4().hex, rng.choice(actions), clock[layout] + j)
                for j in range(events_per_user)
            ]
            pipe.execute_command(*commands(layout, layout, user_id(i), events, args.window))
        pipe.execute()
        clock[layout] += events_per_user

    for layout in ("old", "new"):
        send(layout, args.window + 1)  # full, and trimmed once
    rounds: dict[str, list[float]] = {"old": [], "new": []}
    started = time.perf_counter()
    for _ in range(args.rounds):
        for layout in ("old", "new"):
            client.config_resetstat()
            send(layout, 1)
            rounds[layout].append(usec_per_call(client))
    seconds = time.perf_counter() - started
    parse_us = {}
    for layout, parse in (("old", legacy.actions), ("new", _actions)):  # the service's parse of the reply
        reply = client.execute_command(
            *commands(layout, layout, user_id(0), [NewEvent("x", "1", 0)], args.window)
        )
        assert len(parse(reply[2])) == args.window
        best = min(timeit.repeat(lambda p=parse, b=reply[2]: p(b), number=2000, repeat=5)) / 2000  # type: ignore[misc]
        parse_us[layout] = round(best * 1e6, 2)
    info = client.info("server")
    client.close()
    return {
        "redis_version": info["redis_version"],
        "server": (
            f"valkey-server {info['valkey_version']}"
            if "valkey_version" in info
            else f"redis-server {info['redis_version']}"
        ),
        "seconds": round(seconds, 1),
        "python_parse_us": parse_us,
        "usec_per_call": {
            layout: {
                "median": round(statistics.median(v), 2),
                "min": min(v),
                "max": max(v),
                "rounds": v,
            }
            for layout, v in rounds.items()
        },
    }


def markdown(report: dict[str, Any]) -> str:
    cfg, r = report["config"], report["usec_per_call"]
    old, new = r["old"]["median"], r["new"]["median"]
    return "\n".join(
        [
            "# Redis time per append: packed window vs sorted set + hash",
            "",
            (
                f"`{report['command']}` on {report['machine']['date']}: {report['server']}, "
                f"{report['redis']}; {cfg['users']:,} users per layout with full windows of {cfg['window']} "
                f"(Beauty item ids, server-assigned event ids), {cfg['rounds']} rounds of one 1-event append "
                "per user, old and new alternating."
            ),
            "",
            "`usec_per_call` of EVALSHA from INFO commandstats (Redis's own time in the script), per round:",
            "",
            "| layout | median | min | max |",
            "|---|---:|---:|---:|",
            f"| old: sorted set + dedupe hash | {old:.2f} µs | {r['old']['min']:.2f} | {r['old']['max']:.2f} |",
            f"| new: packed string | {new:.2f} µs | {r['new']['min']:.2f} | {r['new']['max']:.2f} |",
            "",
            f"New / old: {new / old:.2f}.",
            "",
            (
                "The service's parse of the reply into the window's actions (Python, best of 5 x 2,000): "
                f"old format {report['python_parse_us']['old']:.2f} µs, packed window "
                f"{report['python_parse_us']['new']:.2f} µs."
            ),
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10, help="Rounds per layout, alternating.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--redis-url", help="Measure this (empty; it is flushed) Redis instead of the embedded one."
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "window_append_speed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nextact-append-speed-") as tmp:
        server = None
        if not args.redis_url:
            server = EmbeddedRedis(Path(tmp), port=0, extra_args=["--appendonly", "no"]).start()
        try:
            result = run(args.redis_url or server.url, args)  # type: ignore[union-attr]
        finally:
            if server is not None:
                server.stop()
    report = {
        "command": "python bench/window_append_speed.py"
        + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "machine": machine(),
        "redis": f"embedded ({Path(redis_server_binary()).name})" if server else "external (--redis-url)",
        "config": {"users": args.users, "window": args.window, "rounds": args.rounds, "seed": args.seed},
        **result,
    }
    write_json(Path(f"{args.out}.json"), report)
    Path(f"{args.out}.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

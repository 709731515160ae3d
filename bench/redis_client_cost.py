"""The service's CPU per Redis script call on the hot path, client side only, one command:

    python bench/redis_client_cost.py            # the embedded server, ~20 s

What a request costs the event-loop thread for its Redis calls, measured the way the service makes them:
rounds of --users appends (APPEND_STATE_LUA, one new event each) issued together, then those users' state saves
(SAVE_STATE_LUA, 2 KiB of state each) issued together. Two client paths, alternating round by round:

- `redis-py connection`: what `DirectCommands` did up to stage 3, one pipeline per batch on a redis-py
  connection (`pack_commands`, `send_packed_command`, then `read_response` per reply);
- `direct connection`: this stage's exchange on one connection (`app/redis_client.py`: its own RESP packing,
  the replies parsed by a hiredis reader of its own, one bound per try);
- `DirectCommands.execute`: the whole path the service takes, the same exchange plus the per-caller futures,
  the coalescing into pipelines and the sender task.

CPU is the thread's own (`time.thread_time`), so Redis's time and the machine's load count only through
cache effects. Then the CPU of what a call may be wrapped in: a task of its own (`bounded`, for redis-py's own
calls), `asyncio.timeout`, a plain timer. Writes bench/results/redis_client_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.redis_client import bounded, connect
from app.redis_server import EmbeddedRedis
from app.windows import SAVE_STATE_SHA, NewEvent, WindowStore
from bench.harness import RESULTS, machine, write_json

Command = tuple[Any, ...]


def batches(store: WindowStore, users: int, rng: random.Random) -> tuple[list[Command], list[Command]]:
    """One round: every user's one-event append, then every user's state save."""
    state = rng.randbytes(2048)  # 2 x 256 float32: the Beauty-shaped model's LSTM state
    appends, saves = [], []
    for u in range(users):
        uid = f"cost-{u}"
        event = NewEvent(uuid.uuid4().hex, str(rng.randint(1, 12_000)), time.time())
        sha, keys, args = store.append_call(uid, [event], 50, "v1")
        appends.append(("EVALSHA", sha, len(keys), *keys, *args))
        keys = (store.keys(uid)[0], store.state_key(uid))
        saves.append(("EVALSHA", SAVE_STATE_SHA, len(keys), *keys, 1, "v1", state, 3600))
    return appends, saves


async def measure(url: str, users: int, rounds: int, seed: int) -> dict[str, list[float]]:
    conn = connect(url, max_connections=64, timeout_seconds=2.0, retries=2, max_pipeline=64)
    assert conn.direct is not None
    direct = conn.direct
    store = WindowStore(conn.client, "cost", 3600, "bench", 64, direct)
    await store.load_script()
    rng = random.Random(seed)
    plain = direct._pool.connection_class(**direct._pool.connection_kwargs)  # a redis-py connection
    await plain.connect()

    async def redis_py(commands: list[Command]) -> None:
        await plain.send_packed_command(plain.pack_commands(commands))
        for _ in commands:
            await plain.read_response()

    link = direct._new()  # a direct connection of this stage: its own packing, a hiredis reader

    async def lean(commands: list[Command]) -> None:
        await link.exchange(b"".join([direct._pack(c) for c in commands]), len(commands), 2.0)

    async def direct_path(commands: list[Command]) -> None:
        await asyncio.gather(*(direct.execute(*c) for c in commands))

    paths: dict[str, Callable[[list[Command]], Awaitable[None]]] = {
        "redis-py connection": redis_py,
        "direct connection": lean,
        "DirectCommands.execute": direct_path,
    }
    per_call: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds + 2):  # two warm-up rounds
        for name, send in paths.items():
            appends, saves = batches(store, users, rng)  # built outside the timing
            t0 = time.thread_time()
            await send(appends)
            await send(saves)
            spent = time.thread_time() - t0
            if r >= 2:
                per_call[name].append(spent / (2 * users) * 1e6)
    await plain.disconnect()
    await link.conn.disconnect()
    await conn.close()
    return per_call


async def primitives(n: int = 20_000) -> dict[str, float]:
    """µs of CPU per use of what a Redis call may be wrapped in: a task of its own (`bounded`), a timeout."""
    loop = asyncio.get_running_loop()

    async def nothing() -> int:
        return 1

    async def timeout() -> None:
        async with asyncio.timeout(5.0):
            await nothing()

    async def timer() -> None:
        handle = loop.call_later(5.0, print)
        await nothing()
        handle.cancel()

    out: dict[str, float] = {}
    for name, run in (
        ("plain await", nothing),
        ("bounded(call, 5.0): a task of its own", lambda: bounded(nothing, 5.0)),
        ("asyncio.timeout(5.0)", timeout),
        ("loop.call_later + cancel", timer),
    ):
        t0 = time.thread_time()
        for _ in range(n):
            await run()
        out[name] = (time.thread_time() - t0) / n * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=32, help="calls issued together (a micro-batch's users)")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "redis_client_cost")
    args = p.parse_args(argv)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="nextact-cost-") as work:
        redis = EmbeddedRedis(Path(work), port=0, appendfsync="no")
        redis.start()
        try:
            per_call = uvloop.run(measure(redis.url, args.users, args.rounds, args.seed))
            wrappers = uvloop.run(primitives())
        finally:
            redis.stop()
    medians = {name: statistics.median(v) for name, v in per_call.items()}
    base = medians["redis-py connection"]
    lines = [
        "# Client CPU per Redis script call (the event-loop thread's own time)",
        "",
        (
            f"`python bench/redis_client_cost.py --users {args.users} --rounds {args.rounds}`: rounds of "
            f"{args.users} appends issued together, then {args.users} state saves (2 KiB each) issued together, "
            "the paths alternating round by round. Load average at the end: "
            f"{[round(x, 2) for x in os.getloadavg()]}."
        ),
        "",
        "| client path | µs per call, median | p10 | p90 | vs redis-py connection |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in per_call.items():
        q = statistics.quantiles(values, n=10)
        lines.append(
            f"| {name} | {medians[name]:.1f} | {q[0]:.1f} | {q[-1]:.1f} | {medians[name] / base:.2f}x |"
        )
    lines += [
        "",
        "What a call may be wrapped in (uvloop, CPU µs per use, 20,000 uses):",
        "",
        "| wrapper | µs |",
        "|---|---:|",
        *[f"| {name} | {us:.2f} |" for name, us in wrappers.items()],
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    write_json(
        args.out.with_suffix(".json"),
        {"machine": machine(), "args": vars(args), "per_call_us": per_call, "wrappers_us": wrappers},
    )
    print(text)
    print(f"==> wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

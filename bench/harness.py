"""What the benchmark scripts share: child processes, the user population, request templates, machine facts."""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SAMPLE_DATA = ROOT / "examples" / "beauty_sample.csv"
PLACEHOLDER = "EVENTIDEVENTIDEVENTID"  # replaced per request by the load generator, same length


class BenchError(RuntimeError):
    """A benchmark step that cannot go on; the message names the step and where to look."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    """A child process in its own process group, logging to a file; stop() ends the whole group."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> Child:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout)
            else:  # the leader is gone; its group may not be
                os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            self.process = None
            if self._log:
                self._log.close()


def http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(child: Child, port: int, probe: tuple[str, bytes], timeout: float = 90.0) -> None:
    """Wait until the server answers the probe request (path, body) with 200."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(
                f"{child.name} exited during start-up; log {child.log_path}:\n{child.log_tail()}"
            )
        try:
            status, body = http("POST", f"http://127.0.0.1:{port}{probe[0]}", probe[1], timeout=10)
            if status == 200:
                return
            last = f"HTTP {status}: {body[:300]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise BenchError(
        f"{child.name} not ready on port {port} within {timeout}s ({last}); log {child.log_path}"
    )


# ---- the population ---------------------------------------------------------------------------------------


def read_sequences(
    path: Path, action_col: str, user_col: str = "user_id", time_col: str = "timestamp"
) -> list[list[str]]:
    """Each user's actions in time order (ties keep file order)."""
    by_user: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    with path.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            by_user[row[user_col]].append((float(row.get(time_col) or i), i, row[action_col]))
    return [[a for _, _, a in sorted(events)] for events in by_user.values() if events]


def make_windows(sequences: list[list[str]], users: int, window: int, rng: random.Random) -> list[list[str]]:
    """`users` full windows of real actions: a random real user's history, preceded by other real
    histories until `window` events are there (most Beauty users have fewer than 50 reviews)."""
    out = []
    for _ in range(users):
        events: list[str] = []
        while len(events) < window:
            events = rng.choice(sequences) + events
        out.append(events[-window:])
    return out


def user_id(i: int) -> str:
    return f"bench-{i:06d}"


# ---- prometheus text ----------------------------------------------------------------------------------------


def parse_histogram(text: str, name: str) -> dict[str, Any]:
    """Cumulative buckets, sum and count of one unlabelled histogram from Prometheus exposition text."""
    buckets: dict[str, float] = {}
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count = float(line.rsplit(" ", 1)[1])
    return {"buckets": buckets, "sum": total, "count": count}


def histogram_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per-bucket (not cumulative) counts of what happened between two scrapes."""
    cum = {le: after["buckets"][le] - before["buckets"].get(le, 0.0) for le in after["buckets"]}
    per, prev = {}, 0.0
    for le, c in cum.items():
        per[le] = int(c - prev)
        prev = c
    n = after["count"] - before["count"]
    total = after["sum"] - before["sum"]
    return {"per_bucket": per, "count": int(n), "sum": total, "mean": round(total / n, 2) if n else None}


# ---- the machine ------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for mod in ("fastapi", "uvicorn", "onnxruntime", "torch", "numpy", "redis", "pydantic"):
        try:
            info.setdefault("versions", {})[mod] = __import__(mod).__version__
        except ImportError:
            info.setdefault("versions", {})[mod] = None
    return info


def process_tree_stats(pid: int) -> dict[str, float]:
    """RSS (MiB) and CPU seconds (user+system) of a process and its children."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {"rss_mib": 0.0, "cpu_s": 0.0, "threads": 0}
    rss = cpu = 0.0
    threads = 0
    for q in procs:
        try:
            rss += q.memory_info().rss
            t = q.cpu_times()
            cpu += t.user + t.system
            threads += q.num_threads()
        except psutil.NoSuchProcess:
            continue
    return {"rss_mib": round(rss / 2**20, 1), "cpu_s": cpu, "threads": threads}


def python() -> str:
    return sys.executable


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")

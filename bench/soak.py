"""Bounded soak: minutes of mixed traffic through a Redis restart and a model reload, then the audit.

    python bench/soak.py --minutes 3

Starts its own Redis (append-only, appendfsync always) and the service (`python -m app`, authenticated) on
loopback ports, drives single-event posts, bulk posts and prediction reads from concurrent clients, kills
Redis with SIGKILL part-way and starts it again on the same port and data directory, swaps the artifact to
a new version and calls POST /v1/model/reload, then stops the service with SIGTERM. It passes when

  * every event acknowledged with a 2xx is in its user's window afterwards (each user gets fewer events
    than the window holds, so nothing may be trimmed),
  * the only 5xx answers are 503s while Redis was down, and the service recovered by itself,
  * after the reload every response carries the new model_version,
  * the service's RSS levelled off (median of the last third within 10% + 16 MiB of the middle third's),
  * the service exits 0 on SIGTERM.

Figures go to bench/results/soak.json and soak.md; the exit status is 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.manifest import MANIFEST_FILE, MODEL_FILE, read_manifest
from app.redis_server import EmbeddedRedis, free_port
from app.reload import model_hash

API_KEY = "soak-" + uuid.uuid4().hex
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Tally:
    """What the clients saw."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    latencies: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    acked: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    sent_per_user: Counter[str] = field(default_factory=Counter)
    errors_5xx_outside_outage: int = 0
    missing_retry_after: int = 0
    transport_errors: int = 0
    versions_after_reload: Counter[str] = field(default_factory=Counter)
    outage: tuple[float, float] | None = None  # monotonic start/end of the Redis outage (+ grace)
    reload_done_at: float | None = None


def _retag(src: Path, dst: Path, tag: str) -> str:
    """A copy of the artifact under a new content hash: same network, new graph doc string."""
    import onnx

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / MODEL_FILE))
    model.graph.doc_string = f"soak {tag}"
    onnx.save(model, str(dst / MODEL_FILE))
    version = model_hash(dst / MODEL_FILE)
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    manifest["model_version"] = version
    (dst / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return version


def _point(link: Path, target: Path) -> None:
    """Atomically repoint a symlink (rename over the old link)."""
    tmp = link.with_name(link.name + ".new")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.tally = Tally()
        self.stop_at = 0.0
        self.redis: EmbeddedRedis | None = None
        self.service: subprocess.Popen[bytes] | None = None
        self.rss: list[tuple[float, int]] = []
        self.events: list[str] = []
        self.base = ""
        self.window = 0
        self.recovery_seconds: float | None = None
        self.outage_503s = 0

    # processes ----------------------------------------------------------------------------------------
    def start_redis(self, port: int) -> None:
        self.redis = EmbeddedRedis(
            self.work / "redis", port=port, extra_args=["--appendfsync", "always"]
        ).start()

    def kill_redis(self) -> None:
        assert self.redis is not None and self.redis.process is not None
        self.redis.process.kill()  # SIGKILL: no shutdown flush; only what appendfsync always wrote survives
        self.redis.process.wait(10)
        self.redis.owned = True
        self.redis.stop()

    def start_service(self, artifact: Path, redis_url: str, port: int) -> None:
        env = {
            **os.environ,
            "NEXTACT_REDIS_URL": redis_url,
            "NEXTACT_ARTIFACT_DIR": str(artifact),
            "NEXTACT_PORT": str(port),
            "NEXTACT_HOST": "127.0.0.1",
            "NEXTACT_API_KEYS": API_KEY,
            "NEXTACT_LOG_LEVEL": "warning",
            "NEXTACT_SHUTDOWN_TIMEOUT_SECONDS": "10",
        }
        self.log_path = self.work / "service.log"
        self.service = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.base = f"http://127.0.0.1:{port}"

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.service is not None
            if self.service.poll() is not None:
                raise RuntimeError(f"service exited with {self.service.returncode}; see {self.log_path}")
            try:
                if (await client.get(f"{self.base}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"service not ready after {timeout}s; see {self.log_path}")

    # traffic -------------------------------------------------------------------------------------------
    def _user_for_event(self, rng: random.Random, users: list[str]) -> str:
        """A user that has room for one more event (fewer than `window` sent), creating users as needed."""
        while True:
            if len(users) < 64 or rng.random() < 0.02:
                users.append(f"soak-{uuid.uuid4().hex[:12]}-{'ü' if rng.random() < 0.1 else ''}")
            user = users[rng.randrange(len(users))]
            if self.tally.sent_per_user[user] < self.window - 1:
                self.tally.sent_per_user[user] += 1
                return user
            users.remove(user)

    def _record(self, op: str, response: httpx.Response, started: float) -> None:
        now = time.monotonic()
        t = self.tally
        t.statuses[(op, response.status_code)] += 1
        t.latencies[op].append(now - started)
        if response.status_code >= 500:
            # a 503 is expected from a request that may have reached Redis between the kill and shortly after
            # the restart (the pool reconnects on first use); anything else is a failure
            o = t.outage
            expected = (
                response.status_code == 503
                and o is not None
                and o[0] - self.args.request_timeout <= started <= o[1] + 5
            )
            if expected:
                self.outage_503s += 1
            else:
                t.errors_5xx_outside_outage += 1
            if response.status_code == 503 and "retry-after" not in response.headers:
                t.missing_retry_after += 1
        if t.reload_done_at is not None and started > t.reload_done_at and response.status_code < 300:
            t.versions_after_reload[response.headers.get("x-model-version", "<none>")] += 1

    async def client_loop(self, client: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        users: list[str] = []
        while time.monotonic() < self.stop_at:
            roll = rng.random()
            started = time.monotonic()
            try:
                if roll < 0.6:
                    user = self._user_for_event(rng, users)
                    event_id = uuid.uuid4().hex
                    body = {
                        "action": rng.choice(self.events),
                        "event_id": event_id,
                        "timestamp": time.time() - rng.random() * 3600,
                    }
                    r = await client.post(f"{self.base}/v1/users/{user}/events", json=body, headers=HEADERS)
                    self._record("post_event", r, started)
                    if 200 <= r.status_code < 300:
                        self.tally.acked[user].add(event_id)
                elif roll < 0.75:
                    batch: list[dict[str, Any]] = []
                    for _ in range(rng.randint(2, 20)):
                        user = self._user_for_event(rng, users)
                        batch.append(
                            {
                                "user_id": user,
                                "action": rng.choice(self.events),
                                "event_id": uuid.uuid4().hex,
                                "timestamp": time.time(),
                            }
                        )
                    r = await client.post(f"{self.base}/v1/events", json={"events": batch}, headers=HEADERS)
                    self._record("post_bulk", r, started)
                    if 200 <= r.status_code < 300:
                        for e in batch:
                            self.tally.acked[str(e["user_id"])].add(str(e["event_id"]))
                else:
                    user = users[rng.randrange(len(users))] if users else "nobody"
                    r = await client.get(
                        f"{self.base}/v1/users/{user}/predictions", params={"k": 5}, headers=HEADERS
                    )
                    self._record("predict", r, started)
            except httpx.TransportError:
                self.tally.transport_errors += 1
                await asyncio.sleep(0.05)

    async def sample_rss(self) -> None:
        assert self.service is not None
        proc = psutil.Process(self.service.pid)
        start = time.monotonic()
        while time.monotonic() < self.stop_at:
            try:
                self.rss.append((time.monotonic() - start, proc.memory_info().rss))
            except psutil.Error:
                return
            await asyncio.sleep(1.0)

    async def redis_outage(self, client: httpx.AsyncClient, at: float, down_for: float) -> None:
        await asyncio.sleep(at)
        assert self.redis is not None
        port = self.redis.port
        began = time.monotonic()
        self.tally.outage = (began, float("inf"))
        self.kill_redis()
        await asyncio.sleep(down_for)
        self.start_redis(port)
        restarted = time.monotonic()
        self.tally.outage = (began, restarted)
        while time.monotonic() < self.stop_at:  # recovered: the first authenticated read that succeeds
            r = await client.get(f"{self.base}/v1/users/probe/predictions", headers=HEADERS)
            if r.status_code == 200:
                self.recovery_seconds = time.monotonic() - restarted
                return
            await asyncio.sleep(0.05)

    async def reload(self, client: httpx.AsyncClient, at: float, live: Path, target: Path) -> dict[str, Any]:
        await asyncio.sleep(at)
        _point(live, target)
        started = time.monotonic()
        r = await client.post(f"{self.base}/v1/model/reload", headers=HEADERS, timeout=60)
        self.tally.reload_done_at = time.monotonic()
        model = (await client.get(f"{self.base}/v1/model", headers=HEADERS)).json()
        return {
            "status": r.status_code,
            "seconds": round(time.monotonic() - started, 3),
            "body": r.json(),
            "serving": model.get("version") or model.get("model_version"),
        }

    async def audit(self, client: httpx.AsyncClient) -> dict[str, int]:
        lost = 0
        checked = 0
        sem = asyncio.Semaphore(16)

        async def one(user: str, want: set[str]) -> None:
            nonlocal lost, checked
            async with sem:
                r = await client.get(f"{self.base}/v1/users/{user}/events", headers=HEADERS)
                r.raise_for_status()
                have = {e["event_id"] for e in r.json()["events"]}
                lost += len(want - have)
                checked += len(want)

        await asyncio.gather(*(one(u, ids) for u, ids in self.tally.acked.items()))
        return {"acked_events_checked": checked, "acked_events_lost": lost, "users": len(self.tally.acked)}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rss_verdict(samples: list[tuple[float, int]]) -> dict[str, Any]:
    mib = [s / 2**20 for _, s in samples]
    third = max(1, len(mib) // 3)
    middle, last = statistics.median(mib[third : 2 * third] or mib), statistics.median(mib[-third:])
    return {
        "samples": len(mib),
        "start_mib": round(mib[0], 1),
        "max_mib": round(max(mib), 1),
        "end_mib": round(mib[-1], 1),
        "middle_third_median_mib": round(middle, 1),
        "last_third_median_mib": round(last, 1),
        "bounded": last <= middle * 1.10 + 16,
    }


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    soak = Soak(args, work)
    source = Path(args.artifact).resolve()
    manifest = read_manifest(source)
    soak.window = args.window or manifest.window
    soak.events = [a for a in manifest.vocabulary[2:]][:50] + ["never-seen-action"]
    v1, v2 = work / "v1", work / "v2"
    shutil.copytree(source, v1)
    version_2 = _retag(source, v2, uuid.uuid4().hex)
    live = work / "live"
    _point(live, v1)

    soak.start_redis(free_port())
    assert soak.redis is not None
    soak.start_service(live, soak.redis.url, free_port())
    duration = args.minutes * 60
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    try:
        async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
            await soak.wait_ready(client)
            started = time.monotonic()
            soak.stop_at = started + duration
            tasks = [asyncio.create_task(soak.client_loop(client, seed)) for seed in range(args.concurrency)]
            tasks.append(asyncio.create_task(soak.sample_rss()))
            outage = asyncio.create_task(soak.redis_outage(client, duration * 0.35, args.redis_down_seconds))
            reload = asyncio.create_task(soak.reload(client, duration * 0.65, live, v2))
            await asyncio.gather(*tasks, outage)
            reload_result = await reload
            elapsed = time.monotonic() - started
            audit = await soak.audit(client)
    finally:
        exit_code = None
        if soak.service is not None:
            soak.service.send_signal(signal.SIGTERM)
            try:
                exit_code = soak.service.wait(args.shutdown_wait)
            except subprocess.TimeoutExpired:
                os.killpg(soak.service.pid, signal.SIGKILL)
                soak.service.wait(10)
        if soak.redis is not None:
            soak.redis.stop()

    t = soak.tally
    requests = sum(t.statuses.values())
    rss = _rss_verdict(soak.rss)
    by_op = {
        op: {
            "requests": sum(n for (o, _), n in t.statuses.items() if o == op),
            "statuses": {str(s): n for (o, s), n in sorted(t.statuses.items()) if o == op},
            "p50_ms": round(_pct(lat, 0.5) * 1000, 2),
            "p99_ms": round(_pct(lat, 0.99) * 1000, 2),
            "max_ms": round(max(lat) * 1000, 1) if lat else None,
        }
        for op, lat in sorted(t.latencies.items())
    }
    checks = {
        "no_acknowledged_event_lost": audit["acked_events_lost"] == 0 and audit["acked_events_checked"] > 0,
        "only_503_during_outage": t.errors_5xx_outside_outage == 0 and t.missing_retry_after == 0,
        "recovered_without_restart": soak.recovery_seconds is not None,
        "reload_served_new_version": reload_result["status"] == 200
        and reload_result["serving"] == version_2
        and set(t.versions_after_reload) == {version_2},
        "rss_bounded": rss["bounded"],
        "clean_exit_on_sigterm": exit_code == 0,
    }
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {
            "minutes": args.minutes,
            "concurrency": args.concurrency,
            "window": soak.window,
            "redis_down_seconds": args.redis_down_seconds,
            "artifact": str(source),
        },
        "seconds": round(elapsed, 1),
        "requests": requests,
        "requests_per_second": round(requests / elapsed, 1),
        "by_op": by_op,
        "transport_errors": t.transport_errors,
        "outage": {
            "503_answers": soak.outage_503s,
            "recovery_seconds_after_restart": None
            if soak.recovery_seconds is None
            else round(soak.recovery_seconds, 3),
        },
        "reload": {
            **reload_result,
            "new_version": version_2,
            "responses_after_reload_by_version": dict(t.versions_after_reload),
        },
        "audit": audit,
        "rss": rss,
        "service_exit_code": exit_code,
        "checks": checks,
        "passed": all(checks.values()),
    }


def write_results(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Soak ({result['when']})",
        "",
        (
            f"`python bench/soak.py --minutes {result['settings']['minutes']}` on {result['machine']['cpus']} CPUs: "
            f"{result['seconds']} s, {result['requests']} requests ({result['requests_per_second']}/s) from "
            f"{result['settings']['concurrency']} concurrent clients; Redis SIGKILLed for "
            f"{result['settings']['redis_down_seconds']} s at 35%, model reloaded at 65%."
        ),
        "",
        "| operation | requests | statuses | p50 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for op, row in result["by_op"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in row["statuses"].items())
        lines.append(
            f"| {op} | {row['requests']} | {statuses} | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} |"
        )
    a, o, r, m = result["audit"], result["outage"], result["reload"], result["rss"]
    lines += [
        "",
        (
            f"- acknowledged events checked: {a['acked_events_checked']} across {a['users']} users; lost: "
            f"**{a['acked_events_lost']}**"
        ),
        (
            f"- Redis outage: {o['503_answers']} answers were 503 + Retry-After; service answered again "
            f"{o['recovery_seconds_after_restart']} s after Redis was back, with no restart"
        ),
        (
            f"- reload: HTTP {r['status']} in {r['seconds']} s, now serving {r['serving']}; responses after it by "
            f"version: {r['responses_after_reload_by_version']}"
        ),
        (
            f"- service RSS: start {m['start_mib']} MiB, max {m['max_mib']} MiB, end {m['end_mib']} MiB; median of "
            f"middle third {m['middle_third_median_mib']} MiB, last third {m['last_third_median_mib']} MiB"
        ),
        f"- exit code on SIGTERM: {result['service_exit_code']}",
        "",
        "| check | passed |",
        "| --- | --- |",
        *[f"| {name} | {'yes' if ok else '**NO**'} |" for name, ok in result["checks"].items()],
    ]
    (out / "soak.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="traffic duration (default 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument(
        "--artifact", default=str(ROOT / "artifacts" / "demo"), help="model artifact to serve"
    )
    parser.add_argument("--window", type=int, default=0, help="events kept per user (default: the model's)")
    parser.add_argument("--redis-down-seconds", type=float, default=3.0)
    parser.add_argument("--request-timeout", type=float, default=10.0)
    parser.add_argument("--shutdown-wait", type=float, default=30.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if not (Path(args.artifact) / MANIFEST_FILE).is_file():
        print(
            f"no artifact at {args.artifact}: run ./dev.sh serve once (it trains the demo model) or pass "
            "--artifact",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="nextact-soak-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    write_results(result, Path(args.out))
    print((Path(args.out) / "soak.md").read_text())
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

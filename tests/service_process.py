"""The service as a real child process (`python -m app`, as the image runs it) on a loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.redis_server import free_port
from tests.deploy_files import ROOT, Dockerfile, compose_env, load_compose


def image_command() -> list[str]:
    """The serving image's CMD, with `python` meaning this interpreter (the venv, like /opt/venv in the image)."""
    cmd = Dockerfile.parse().last("serve", "CMD").exec_form()
    assert cmd, "the serving image's CMD must be in exec form"
    return [sys.executable if word == "python" else word for word in cmd]


def image_environment(redis_url: str, artifact_dir: Path, port: int, **overrides: str) -> dict[str, str]:
    """NEXTACT_* as the container sees them: the image's ENV, then the compose api service's environment.

    Only what cannot hold on this machine is replaced: the Redis URL, the artifact directory, and the
    listening address (a free loopback port instead of 0.0.0.0:8000).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTACT_")}
    image = Dockerfile.parse().env("serve")
    env |= {k: v for k, v in image.items() if k.startswith("NEXTACT_")}
    env |= compose_env(load_compose(env={})["services"]["api"])
    env |= {
        "NEXTACT_REDIS_URL": redis_url,
        "NEXTACT_ARTIFACT_DIR": str(artifact_dir),
        "NEXTACT_HOST": "127.0.0.1",
        "NEXTACT_PORT": str(port),
        **overrides,
    }
    return env


@dataclass
class ServiceProcess:
    """One `python -m app` child; its output goes to a log file that failures quote."""

    process: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    log_path: Path

    @classmethod
    def start(cls, redis_url: str, artifact_dir: Path, log_dir: Path, **overrides: str) -> ServiceProcess:
        port = free_port()
        env = image_environment(redis_url, artifact_dir, port, **overrides)
        log_path = log_dir / f"service-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                image_command(), cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        return cls(process, port, env, log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until /readyz answers 200; fails early, with the log, if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited with {self.process.returncode} before ready:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"service on port {self.port} not ready after {timeout}s:\n{self.log()}")

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, as `docker stop` sends it; the exit code (killed, and -9, if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return int(self.process.returncode)

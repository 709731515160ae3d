"""`nextact` (app/cli.py) and `./dev.sh serve`: help, version, errors, and flags that really reach the service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app import __version__
from app.redis_server import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
NEXTACT = [sys.executable, "-m", "app.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTACT_")}
    return subprocess.run(
        [*NEXTACT, *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_the_commands_with_examples() -> None:
    done = run("--help")
    assert done.returncode == 0, done.stderr
    for command in ("serve", "train", "evaluate", "quantize"):
        assert command in done.stdout
    assert "nextact serve --port 8001" in done.stdout


@pytest.mark.parametrize("command", ["serve", "train", "evaluate", "quantize"])
def test_each_command_help_shows_defaults_and_one_example(command: str) -> None:
    done = run(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: nextact {command}")
    assert "default" in done.stdout and f"example:\n  nextact {command} " in done.stdout


def test_serve_help_shows_the_effective_default_and_its_variable() -> None:
    plain = " ".join(run("serve", "--help").stdout.split())  # argparse wraps to the terminal width
    assert "(default: 8000; env NEXTACT_PORT)" in plain
    from_env = " ".join(run("serve", "--help", env={"NEXTACT_PORT": "9123"}).stdout.split())
    assert "(default: 9123 from NEXTACT_PORT; env NEXTACT_PORT)" in from_env


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"nextact {__version__}"


@pytest.mark.parametrize("args", [["serve", "--prot", "8001"], ["train", "--bogus"], ["frobnicate"], []])
def test_unknown_flags_and_commands_are_errors(args: list[str]) -> None:
    done = run(*args)
    assert done.returncode == 2
    assert "usage: nextact" in done.stderr and "error:" in done.stderr


def test_bad_flag_value_names_the_flag_and_its_variable() -> None:
    done = run("serve", "--port", "0")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "nextact serve: --port / NEXTACT_PORT: Input should be greater than or equal to 1 (got '0')"
    )


def test_train_errors_come_from_the_training_package() -> None:
    done = run("train", "--data", "no-such-file.csv", "--out", "unused")
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "no-such-file.csv" in done.stderr


def _wait_healthy(process: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"exited with {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"nothing answered on port {port} in {timeout}s:\n{log.read_text(errors='replace')}")


def _serve(command: list[str], env: dict[str, str], port: int, log: Path) -> dict[str, object]:
    """Start `command`, wait for /healthz on `port`, return /v1/model, stop it with SIGTERM."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTACT_")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**clean, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(process, port, log)
        model = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=5)
        assert model.status_code == 200, model.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text(errors="replace")
        return dict(model.json())
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_flags_override_the_environment(
    redis_server: EmbeddedRedis, behavior_artifact: Path, tmp_path: Path
) -> None:
    port, env_port = free_port(), free_port()
    env = {"NEXTACT_PORT": str(env_port), "NEXTACT_ARTIFACT_DIR": str(tmp_path / "not-a-model")}
    model = _serve(
        [
            *NEXTACT,
            "serve",
            "--port",
            str(port),
            "--artifact-dir",
            str(behavior_artifact),
            "--redis-url",
            redis_server.url,
            "--host",
            "127.0.0.1",
        ],
        env,
        port,
        tmp_path / "serve.log",
    )
    assert model["window"] == 20  # the behaviour artifact, not the environment's directory


def test_dev_sh_serve_passes_its_arguments_through(
    redis_server: EmbeddedRedis, behavior_artifact: Path, tmp_path: Path
) -> None:
    venv = Path(sys.prefix)
    if not (venv / ".nextact-installed").is_file():
        pytest.skip(f"{venv} was not made by ./dev.sh setup: dev.sh would reinstall it")
    port = free_port()
    model = _serve(
        [
            "./dev.sh",
            "serve",
            "--port",
            str(port),
            "--artifact-dir",
            str(behavior_artifact),
            "--redis-url",
            redis_server.url,
        ],
        {"NEXTACT_VENV": str(venv)},
        port,
        tmp_path / "dev-serve.log",
    )
    assert model["window"] == 20


def _without(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`nextact ARGS` in a process where `module` cannot be imported (as if it were not installed)."""
    code = f"import sys; sys.modules[{module!r}] = None; from app.cli import main; sys.exit(main({list(args)!r}))"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTACT_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_train_without_torch_says_what_to_install() -> None:
    done = _without("torch", "train", "--data", "events.csv", "--out", "out")
    assert done.returncode == 2
    assert done.stderr.startswith("nextact train: torch not installed; install the training dependencies: ")
    assert 'pip install "nextact[train]"' in done.stderr and "download.pytorch.org/whl/cpu" in done.stderr


def test_train_without_the_training_package_says_so() -> None:
    done = _without("training", "evaluate", "--help")
    assert done.returncode == 2
    assert "nextact evaluate: the training package is not installed here" in done.stderr


def test_serve_without_onnxruntime_names_the_extras(tmp_path: Path) -> None:
    done = _without("onnxruntime", "serve", "--artifact-dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        'nextact serve: ONNX Runtime is not installed: pip install "nextact[cpu]" (or "nextact[gpu]" on a host '
        "with an NVIDIA GPU)"
    )

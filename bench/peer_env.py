"""The peer's own virtual environment (bench/.venv-peer, git-ignored), made on demand by bench/run.py.

    python bench/peer_env.py            # create or refresh it; prints its python

BentoML brings many dependencies of its own that may clash with nextact's locks, so it never enters them:
it lives here, pinned. onnxruntime, numpy, redis and hiredis are the versions nextact's CPU lock has,
uvloop and httptools too (uvicorn, under BentoML, picks them up as nextact's does), so the two servers run
the same runtime and the same Redis client; only the framework differs.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv-peer"
PINS = (
    "bentoml==1.4.40",
    "onnxruntime==1.31.1",
    "numpy==2.4.6",
    "redis==8.1.0",
    "hiredis==3.5.0",
    "uvloop==0.23.0",
    "httptools==0.9.0",
)


def ensure(python: str = sys.executable) -> Path:
    """The peer environment's bentoml executable; installs the pins first if they changed (a few minutes)."""
    stamp = VENV / ".pins"
    want = hashlib.sha256("\n".join(PINS).encode()).hexdigest()
    bentoml = VENV / "bin" / "bentoml"
    if bentoml.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return bentoml
    print(f"==> installing the peer's environment into {VENV}: {' '.join(PINS)} (a few minutes)", flush=True)
    if not (VENV / "bin" / "python").is_file():
        subprocess.run([python, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*pip, *PINS], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"installing {' '.join(PINS)} into {VENV} failed:\n{done.stderr[-3000:]}")
    stamp.write_text(want + "\n")
    return bentoml


if __name__ == "__main__":
    print(ensure().parent / "python")

"""Reading the lock files in requirements/ (written by requirements/lock.sh from pyproject.toml)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
LOCKS = ("serve-cpu", "serve-gpu", "train-cpu", "dev-cpu", "dev-gpu")
_PIN = re.compile(r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s;]+)\s*(?:;\s*(.+))?$")


def read_lock(name: str) -> dict[str, list[tuple[str, str | None]]]:
    """package (normalised name) -> [(version, marker or None)]; a universal lock may pin one per marker."""
    pins: dict[str, list[tuple[str, str | None]]] = {}
    for line in (REQUIREMENTS / f"{name}.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _PIN.match(line)
        assert m, f"requirements/{name}.txt: not an exact pin: {line!r}"
        pins.setdefault(normalise(m.group(1)), []).append((m.group(2), m.group(3)))
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def package(requirement: str) -> str:
    return normalise(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])

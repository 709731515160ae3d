"""The peer service's Redis windows: nextact's own append script, called for a whole batch in one pipeline.

The peer (bench/peer_service.py, BentoML) must do the same Redis work as nextact without importing app/:
the script's text is read from app/windows.py's source (its string constants, evaluated with ast, never
imported), the key layout is the same (one hash tag per user, so the same keys a nextact population
has), and so is the reply (the window's actions as one `<len: 4 hex><action>...` string). What differs
is only how it is called: synchronously with redis-py, every request of a batch in one pipeline.

Needs only `redis` (the peer's own virtual environment has it; so does nextact's, for the test that
checks this module and app.windows agree: tests/test_peer_window.py).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WINDOWS_SOURCE = Path(__file__).resolve().parent.parent / "app" / "windows.py"
_LEN = 4  # hex digits of each action's length in the script's reply


def script_text(name: str = "APPEND_LUA", source: Path = WINDOWS_SOURCE) -> str:
    """A module-level string constant of app/windows.py (literals and `+` of earlier constants only)."""
    values: dict[str, str] = {}

    def value(node: ast.expr) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return value(node.left) + value(node.right)
        raise ValueError(f"{source}: {name} is not built from string literals ({ast.dump(node)[:80]})")

    for stmt in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            target = stmt.targets[0].id
            try:
                values[target] = value(stmt.value)
            except ValueError:
                if target == name:
                    raise
    if name not in values:
        raise ValueError(f"{source} has no string constant {name}")
    return values[name]


def user_tag(prefix: str, user_id: str) -> str:
    """`prefix:{id}`, or `prefix:x:{hex}` for an id with a brace (app.windows.user_tag's layout)."""
    if "{" in user_id or "}" in user_id:
        return f"{prefix}:x:{{{user_id.encode('utf-8', 'surrogatepass').hex()}}}"
    return f"{prefix}:{{{user_id}}}"


def window_keys(prefix: str, user_id: str) -> tuple[str, str, str]:
    """(window zset, dedupe hash, state hash) of a user: the script's KEYS."""
    tag = user_tag(prefix, user_id)
    return f"{tag}:w", f"{tag}:i", f"{tag}:s"


def parse_actions(blob: bytes) -> list[str]:
    """The script's <len: 4 hex><action>... string as a list, oldest first."""
    out, i, end = [], 0, len(blob)
    while i < end:
        n = int(blob[i : i + _LEN], 16)
        i += _LEN
        out.append(blob[i : i + n].decode())
        i += n
    return out


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """One request's event, with the server-filled id and timestamp."""

    user_id: str
    event_id: str
    action: str
    timestamp: float


class PeerWindows:
    """Appends a batch of events (one per request) with nextact's script in one pipeline; sync redis-py."""

    def __init__(self, client: Any, prefix: str, ttl_seconds: int, capacity: int) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.capacity = capacity
        self.script = script_text()
        self.sha = hashlib.sha1(self.script.encode()).hexdigest()

    def load(self) -> None:
        self.client.script_load(self.script)

    def append_many(self, events: Sequence[PeerEvent]) -> list[list[str]]:
        """Each event appended to its user's window (dedupe, trim, TTL: the script); the windows after it."""
        pipe = self.client.pipeline(transaction=False)
        for e in events:
            args = (self.capacity, self.ttl_seconds, e.event_id, e.action, repr(e.timestamp))
            pipe.evalsha(self.sha, 3, *window_keys(self.prefix, e.user_id), *args)
        replies = pipe.execute(raise_on_error=False)
        if any(_no_script(r) for r in replies):  # Redis restarted or flushed its scripts: once more
            self.load()
            return self.append_many(events)
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return [parse_actions(r[2]) for r in replies]


def _no_script(reply: Any) -> bool:
    return isinstance(reply, Exception) and "NOSCRIPT" in str(reply)

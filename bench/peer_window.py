"""The peer service's Redis windows: nextact's own append script, called for a whole batch in one pipeline.

The peer (bench/peer_service.py, BentoML) must do the same Redis work as nextact without importing app/:
the script's text is read from app/windows.py's source (its string constants, evaluated with ast, never
imported), the key layout is the same (one hash tag per user, so the same keys a nextact population
has), and so are the script's arguments and reply: each event packed as one record (timestamp, id,
action: pack_record) and the packed window back (its actions read out: actions_of). What differs is only
how it is called: synchronously with redis-py, every request of a batch in one pipeline.

Needs only `redis` (the peer's own virtual environment has it; so does nextact's, for the test that
checks this module and app.windows agree: tests/test_peer_window.py).
"""

from __future__ import annotations

import ast
import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WINDOWS_SOURCE = Path(__file__).resolve().parent.parent / "app" / "windows.py"
HEADER = 7  # bytes of the packed window before its first record: format, arrival counter
_TS = struct.Struct(">d")
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_UUID_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


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


def window_keys(prefix: str, user_id: str) -> tuple[str, str, str, str]:
    """The append script's KEYS: packed window, state hash, and the old layout's sorted set and index."""
    tag = user_tag(prefix, user_id)
    return f"{tag}:e", f"{tag}:s", f"{tag}:w", f"{tag}:i"


def _length(n: int, limit: int, escape: int) -> bytes:
    return bytes((n,)) if n < limit else bytes((escape,)) + n.to_bytes(4, "big")


def pack_record(timestamp: float, event_id: str, action: str) -> bytes:
    """One event as the packed window stores it (app/windows.py's docstring has the format)."""
    ts, act = _TS.pack(timestamp), action.encode()
    base, raw = 0, b""
    if len(event_id) == 32 and _HEX_ID.fullmatch(event_id):
        base, raw = 128, bytes.fromhex(event_id)
    elif len(event_id) == 36 and _UUID_ID.fullmatch(event_id):
        base, raw = 192, bytes.fromhex(event_id.replace("-", ""))
    if base:
        if len(act) < 63:
            return ts + bytes((base + len(act),)) + raw + act
        return ts + bytes((base + 63,)) + raw + len(act).to_bytes(4, "big") + act
    eid = event_id.encode()
    return ts + _length(len(eid), 127, 127) + eid + _length(len(act), 255, 255) + act


def actions_of(value: bytes) -> list[str]:
    """The actions of a packed window, oldest first."""
    out, p, end = [], HEADER, len(value)
    while p < end:
        t = value[p + 8]
        if t >= 128:  # a 16-byte id, then the action: t - 128 (t - 192) bytes; 63 = a 4-byte length first
            a = p + 25
            p = a + (t - 128 if t < 192 else t - 192)
            if t in (191, 255):
                a += 4
                p = a + int.from_bytes(value[a - 4 : a], "big")
        else:  # the id as sent (t bytes; 127 = a 4-byte length first), then <n: 1 byte> and the action
            a = p + 9 + t
            if t == 127:
                a = p + 13 + int.from_bytes(value[p + 9 : p + 13], "big")
            n = value[a]
            a += 1
            if n == 255:
                a += 4
                n = int.from_bytes(value[a - 4 : a], "big")
            p = a + n
        out.append(value[a:p].decode())
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
            keys = window_keys(self.prefix, e.user_id)
            record = pack_record(e.timestamp, e.event_id, e.action)
            pipe.evalsha(self.sha, len(keys), *keys, self.capacity, self.ttl_seconds, record)
        replies = pipe.execute(raise_on_error=False)
        if any(_no_script(r) for r in replies):  # Redis restarted or flushed its scripts: once more
            self.load()
            return self.append_many(events)
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return [actions_of(r[2]) for r in replies]


def _no_script(reply: Any) -> bool:
    return isinstance(reply, Exception) and "NOSCRIPT" in str(reply)

"""Per-user event windows in Redis: key layout and the atomic append/dedupe/trim/expire/read script.

Key layout (one hash slot per user: the user's tag is the key's hash tag, so this works unchanged on a cluster).
<tag> is `{<user_id>}` for an id without braces (the layout of earlier versions, so their windows stay
readable), and `x:{<hex of the id's UTF-8>}` for an id containing `{` or `}`: one slot per user for any id,
and no two ids share a key (the two forms differ right after the prefix). See user_tag().

    {prefix}:<tag>:w         ZSET  the window. score = event timestamp (epoch seconds, float);
                                   member = <seq: 12 hex><len(event_id): 4 hex><event_id><action> (UTF-8).
                                   seq is the user's arrival counter, so equal timestamps keep arrival order
                                   (Redis orders equal scores by member bytes). ZRANGE = oldest first.
    {prefix}:<tag>:i         HASH  dedupe index: event_id -> "" for every event in the window; the field ""
                                   (never a valid event id) holds the arrival counter.
    {prefix}:<tag>:s         HASH  per-user serving state, refreshed, expired and deleted with the other two.
                                   Incremental state (only with NEXTACT_INCREMENTAL_STATE): v = model_version,
                                   n = the arrival counter it has consumed up to, x = the recurrent state
                                   (float32 bytes). Live quality (NEXTACT_LIVE_QUALITY): pn = the arrival
                                   counter of the window the last predictions were made from, p = those
                                   predictions (each model's version and top-20 ids, see app/quality.py).

Both keys are written by one Lua script (APPEND_LUA) that, atomically: skips event ids already in the
index, inserts the rest in timestamp order, trims the oldest beyond the window's capacity (and their index
entries), refreshes the TTLs and returns the counts and the window. Windows hold action strings, not
model ids, so a model with another vocabulary can be served on the same data.

Live quality rides on the same script: it also returns the predictions stored for the window as it was
before this append, when the append's earliest new event is the next one after that window (not late, not
only duplicates, no other event in between). The service scores that event against them and, after
predicting, stores the new predictions with SAVE_PREDICTION_LUA, compare-and-set on the arrival counter.

With incremental state, APPEND_STATE_LUA does the same and also returns the stored state when it is usable
for this append: written for the caller's model version, covering every event that arrived before this append
(n = the arrival counter), and every accepted event no older than the window's newest (so the new events are
the window's tail, in order). The state computed from it is written back by SAVE_STATE_LUA only if no other
event arrived meanwhile (compare-and-set on the counter); otherwise the next append rebuilds it.

Dedupe covers the events in the window: an event that was trimmed away and is sent again is inserted and,
being older than the rest, trimmed again at once (unless it ties with the oldest timestamp).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from app.redis_client import DirectCommands, is_transient

log = logging.getLogger(__name__)

V = TypeVar("V")

# Both scripts answer the window's actions, oldest first, as ONE string of <len: 4 hex><action> records:
# one bulk reply parses much faster in Python than an array of `window` replies.
_ACTIONS_LUA = """
local function actions(members)
  local out = {}
  for i, m in ipairs(members) do
    local a = string.sub(m, 17 + tonumber(string.sub(m, 13, 16), 16))
    out[i] = string.format('%04x', #a) .. a
  end
  return table.concat(out)
end
"""

# The append shared by both append scripts. KEYS[1] window zset, KEYS[2] index hash, KEYS[3] state hash;
# ARGV[1] capacity, ARGV[2] ttl seconds, then one (event_id, action, timestamp) triple per event from
# ARGV[first]. Skips ids already indexed, inserts the rest, trims the oldest beyond the capacity (and their
# index entries), stores the arrival counter and refreshes the three TTLs. Returns accepted, duplicates, the
# arrival counter before and after, whether no accepted event is older than the window's newest before, and
# the index (0-based, among the events) of the earliest accepted event (-1 if none).
_APPEND_FN_LUA = """
local function append(first)
  local cap = tonumber(ARGV[1])
  local ttl = tonumber(ARGV[2])
  local seq = tonumber(redis.call('HGET', KEYS[2], '') or '0')
  local before = seq
  local newest = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2] or '')
  local in_order = true
  local accepted, duplicates = 0, 0
  local earliest, earliest_ts = -1, nil
  for i = first, #ARGV, 3 do
    local id = ARGV[i]
    if redis.call('HSETNX', KEYS[2], id, '') == 1 then
      seq = seq + 1
      local ts = tonumber(ARGV[i + 2])
      redis.call('ZADD', KEYS[1], ARGV[i + 2], string.format('%012x%04x', seq, #id) .. id .. ARGV[i + 1])
      accepted = accepted + 1
      if newest and ts < newest then in_order = false end
      if earliest_ts == nil or ts < earliest_ts then earliest, earliest_ts = (i - first) / 3, ts end
    else
      duplicates = duplicates + 1
    end
  end
  local excess = redis.call('ZCARD', KEYS[1]) - cap
  if excess > 0 then
    for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, excess - 1)) do
      redis.call('HDEL', KEYS[2], string.sub(m, 17, 16 + tonumber(string.sub(m, 13, 16), 16)))
    end
    redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
  end
  redis.call('HSET', KEYS[2], '', seq)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
  return accepted, duplicates, before, seq, in_order, earliest
end

-- Live quality: the predictions stored after the window as it was before this append (KEYS[3] fields pn =
-- the arrival counter they were made at, p = the records), if the append's earliest new event is the next
-- event after that window. Returns {outcome, event index, records}: outcome 0 scored, 1 nothing new
-- (duplicates only), 2 late (a new event older than the window's newest), 3 no prediction for that window.
local function last_prediction(accepted, before, in_order, earliest)
  if accepted == 0 then return {1, -1, ''} end
  if not in_order then return {2, -1, ''} end
  local pr = redis.call('HMGET', KEYS[3], 'pn', 'p')
  if pr[2] and tonumber(pr[1]) == before then return {0, earliest, pr[2]} end
  return {3, -1, ''}
end
"""

# Events from ARGV[3]. Returns {accepted, duplicates, actions, arrival counter after, last prediction}.
APPEND_LUA = (
    _ACTIONS_LUA
    + _APPEND_FN_LUA
    + """
local accepted, duplicates, before, seq, in_order, earliest = append(3)
return {accepted, duplicates, actions(redis.call('ZRANGE', KEYS[1], 0, -1)), seq,
        last_prediction(accepted, before, in_order, earliest)}
"""
)

# The same plus ARGV[3] model version; events from ARGV[4]. Returns {accepted, duplicates, actions, arrival
# counter after the append, last prediction, state bytes or "" when the state is not usable}.
APPEND_STATE_LUA = (
    _ACTIONS_LUA
    + _APPEND_FN_LUA
    + """
local accepted, duplicates, before, seq, in_order, earliest = append(4)
local state = ''
local st = redis.call('HMGET', KEYS[3], 'v', 'n', 'x')
if in_order and accepted > 0 and accepted < tonumber(ARGV[1]) and st[1] == ARGV[3]
    and tonumber(st[2]) == before then
  state = st[3]
end
return {accepted, duplicates, actions(redis.call('ZRANGE', KEYS[1], 0, -1)), seq,
        last_prediction(accepted, before, in_order, earliest), state}
"""
)

# KEYS[1] index hash, KEYS[2] state hash. ARGV[1] arrival counter the state covers, ARGV[2] model version,
# ARGV[3] state bytes, ARGV[4] ttl. Writes only if no event arrived since; returns 1 if written, else 0.
SAVE_STATE_LUA = """
if tonumber(redis.call('HGET', KEYS[1], '') or '-1') ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], 'v', ARGV[2], 'n', ARGV[1], 'x', ARGV[3])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return 1
"""

# KEYS[1] index hash, KEYS[2] state hash. ARGV[1] arrival counter the predictions were made at, ARGV[2] the
# records, ARGV[3] ttl. Writes only if no event arrived since; returns 1 if written, else 0.
SAVE_PREDICTION_LUA = """
if tonumber(redis.call('HGET', KEYS[1], '') or '-1') ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], 'pn', ARGV[1], 'p', ARGV[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""

# KEYS[1] window zset. ARGV[1] how many of the newest. Returns the actions string.
READ_LUA = (
    _ACTIONS_LUA
    + """
return actions(redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[1]), -1))
"""
)
APPEND_SHA = hashlib.sha1(APPEND_LUA.encode()).hexdigest()
READ_SHA = hashlib.sha1(READ_LUA.encode()).hexdigest()
APPEND_STATE_SHA = hashlib.sha1(APPEND_STATE_LUA.encode()).hexdigest()
SAVE_STATE_SHA = hashlib.sha1(SAVE_STATE_LUA.encode()).hexdigest()
SAVE_PREDICTION_SHA = hashlib.sha1(SAVE_PREDICTION_LUA.encode()).hexdigest()
SCRIPTS = {
    APPEND_SHA: APPEND_LUA,
    READ_SHA: READ_LUA,
    APPEND_STATE_SHA: APPEND_STATE_LUA,
    SAVE_STATE_SHA: SAVE_STATE_LUA,
    SAVE_PREDICTION_SHA: SAVE_PREDICTION_LUA,
}

_SEQ, _LEN = 12, 4  # hex digits of the member's arrival counter and of its event-id length


def user_tag(prefix: str, user_id: str) -> str:
    """`prefix:{id}`, or `prefix:x:{hex}` when the id holds a brace (it would break the cluster hash tag)."""
    if "{" in user_id or "}" in user_id:
        return f"{prefix}:x:{{{user_id.encode('utf-8', 'surrogatepass').hex()}}}"
    return f"{prefix}:{{{user_id}}}"


def legacy_keys(prefix: str, user_id: str) -> tuple[str, ...]:
    """Keys earlier versions used for an id with braces (they are erased with the user, never read)."""
    if "{" in user_id or "}" in user_id:
        base = f"{prefix}:{{{user_id}}}"
        return f"{base}:w", f"{base}:i", f"{base}:s"
    return ()


class StoreError(Exception):
    """Redis refused a call in a way that will not change on retry (cross-slot keys, wrong type, script error).

    `log_message` is the same without the user id.
    """

    def __init__(self, message: str, log_message: str) -> None:
        super().__init__(message)
        self.log_message = log_message


class StoreUnavailable(Exception):
    """Redis did not answer (down, timing out, or refusing); the message names the server and the operation.

    `log_message` is the same without the user id, for logs (user ids can be personal data).
    """

    def __init__(self, message: str, log_message: str | None = None) -> None:
        super().__init__(message)
        self.log_message = log_message or message


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event ready to store: the server has filled in a missing id and timestamp."""

    event_id: str
    action: str
    timestamp: float


@dataclass(frozen=True, slots=True)
class StoredEvent:
    event_id: str
    action: str
    timestamp: float


@dataclass(frozen=True, slots=True)
class LastPrediction:
    """What the append found for live quality: the stored predictions for the window before it, if usable."""

    outcome: int  # SCORED, NOTHING_NEW, LATE or NO_PREDICTION
    event: int  # index (in the request's events) of the event to score; -1 unless SCORED
    records: bytes  # the stored prediction records (app/quality.py's format); b"" unless SCORED


SCORED, NOTHING_NEW, LATE, NO_PREDICTION = range(4)
_NONE = LastPrediction(NO_PREDICTION, -1, b"")


@dataclass(frozen=True, slots=True)
class AppendResult:
    accepted: int
    duplicates: int
    actions: list[str]  # the window after the append, oldest first
    seq: int = 0  # the user's arrival counter after the append
    last: LastPrediction = _NONE


@dataclass(frozen=True, slots=True)
class StatefulAppend:
    """An append with incremental state: the window, the arrival counter after it, the usable stored state."""

    result: AppendResult
    seq: int
    state: bytes | None  # covers the window before the `accepted` new events (its tail); None: rebuild


def _split(member: bytes) -> tuple[str, str]:
    """(event_id, action) of a window member."""
    n = int(member[_SEQ : _SEQ + _LEN], 16)
    start = _SEQ + _LEN
    return member[start : start + n].decode(), member[start + n :].decode()


def _append_result(reply: Any) -> AppendResult:
    outcome, event, records = reply[4]
    last = (
        LastPrediction(int(outcome), int(event), bytes(records)) if int(outcome) != NO_PREDICTION else _NONE
    )
    return AppendResult(int(reply[0]), int(reply[1]), _actions(reply[2]), int(reply[3]), last)


def _actions(blob: bytes) -> list[str]:
    """The scripts' <len: 4 hex><action>... string as a list."""
    out, i, end = [], 0, len(blob)
    while i < end:
        n = int(blob[i : i + _LEN], 16)
        i += _LEN
        out.append(blob[i : i + n].decode())
        i += n
    return out


class WindowStore:
    """Reads and writes user windows. All failures surface as StoreUnavailable."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        ttl_seconds: int,
        address: str,
        max_concurrency: int = 64,
        direct: DirectCommands | None = None,
        queue_timeout_seconds: float = 5.0,
        call_timeout_seconds: float | None = None,
    ) -> None:
        self.client = client
        self._direct = direct  # the scripts' fast path (single server); None: everything through `client`
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.address = address
        # Callers queue here (FIFO, no timeout) rather than in the pool: the single-server pool gives up after
        # its timeout ("No connection available") and the cluster pool at once, which would turn a burst
        # (one bulk request for 1000 users) into 503s although Redis is fine.
        # The wait is bounded all the same, so a hung Redis cannot pile up requests without end.
        self._limit = asyncio.Semaphore(max_concurrency)
        self._queue_timeout = queue_timeout_seconds
        self._call_timeout = (
            call_timeout_seconds  # all tries of one call (None: the client's own bounds only)
        )

    def keys(self, user_id: str) -> tuple[str, str]:
        """(window zset, dedupe hash) of a user."""
        base = user_tag(self.prefix, user_id)
        return f"{base}:w", f"{base}:i"

    def state_key(self, user_id: str) -> str:
        """The user's incremental-state hash (same hash tag, so the same cluster slot as the window)."""
        return f"{user_tag(self.prefix, user_id)}:s"

    async def load_script(self) -> None:
        """Preload the scripts (on every primary of a cluster) so requests can use EVALSHA."""
        for source in SCRIPTS.values():
            await self._guard("SCRIPT LOAD", partial(self.client.script_load, source))

    async def _evalsha(self, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._run_script(sha, keys, args)
        except NoScriptError:  # Redis restarted, failed over or flushed its scripts
            await self.client.script_load(SCRIPTS[sha])
            return await self._run_script(sha, keys, args)

    def _run_script(self, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Awaitable[Any]:
        if self._direct is not None:
            return self._direct.execute("EVALSHA", sha, len(keys), *keys, *args)
        return self.client.evalsha(sha, len(keys), *keys, *args)  # type: ignore[no-any-return]

    async def append(self, user_id: str, events: Sequence[NewEvent], capacity: int) -> AppendResult:
        """Store new events (skipping known ids), trim to capacity, refresh the TTL; one round trip."""
        args: list[Any] = [capacity, self.ttl_seconds]
        for e in events:
            args += (e.event_id, e.action, repr(e.timestamp))
        keys = (*self.keys(user_id), self.state_key(user_id))
        reply = await self._guard("append", lambda: self._evalsha(APPEND_SHA, keys, args), user_id)
        return _append_result(reply)

    async def append_with_state(
        self, user_id: str, events: Sequence[NewEvent], capacity: int, model_version: str
    ) -> StatefulAppend:
        """append(), plus the stored state when it covers the window before these events; one round trip."""
        args: list[Any] = [capacity, self.ttl_seconds, model_version]
        for e in events:
            args += (e.event_id, e.action, repr(e.timestamp))
        keys = (*self.keys(user_id), self.state_key(user_id))
        reply = await self._guard("append", lambda: self._evalsha(APPEND_STATE_SHA, keys, args), user_id)
        return StatefulAppend(_append_result(reply), int(reply[3]), bytes(reply[5]) or None)

    async def save_prediction(self, user_id: str, seq: int, records: bytes) -> bool:
        """Store the predictions made from the window at arrival counter `seq`, unless an event arrived since."""
        keys = (self.keys(user_id)[1], self.state_key(user_id))
        args = [seq, records, self.ttl_seconds]
        reply = await self._guard(
            "prediction", lambda: self._evalsha(SAVE_PREDICTION_SHA, keys, args), user_id
        )
        return bool(int(reply))

    async def save_predictions(self, items: Sequence[tuple[str, int, bytes]]) -> int:
        """save_prediction for many users: one write on a single server (a pipeline); returns how many stored."""
        if self._direct is None or len(items) == 1:
            done = await asyncio.gather(*(self.save_prediction(*item) for item in items))
            return sum(done)
        direct = self._direct
        commands = [
            (
                "EVALSHA",
                SAVE_PREDICTION_SHA,
                2,
                self.keys(u)[1],
                self.state_key(u),
                seq,
                rec,
                self.ttl_seconds,
            )
            for u, seq, rec in items
        ]
        replies = await self._guard("prediction", lambda: direct.execute_many(commands))
        if any(isinstance(r, NoScriptError) for r in replies):  # Redis restarted or flushed its scripts
            await self._guard("SCRIPT LOAD", partial(self.client.script_load, SAVE_PREDICTION_LUA))
            replies = await self._guard("prediction", lambda: direct.execute_many(commands))
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            raise StoreUnavailable(f"Redis at {self.address} refused storing predictions: {errors[0]}")
        return sum(int(r) for r in replies)

    async def save_state(self, user_id: str, seq: int, model_version: str, state: bytes) -> bool:
        """Store the state covering arrivals up to `seq`, unless another event arrived since; True if stored."""
        keys = (self.keys(user_id)[1], self.state_key(user_id))
        args = [seq, model_version, state, self.ttl_seconds]
        reply = await self._guard("state", lambda: self._evalsha(SAVE_STATE_SHA, keys, args), user_id)
        return bool(int(reply))

    async def actions(self, user_id: str, capacity: int) -> list[str]:
        """The newest `capacity` actions of the window, oldest first (read-only: the TTL is not refreshed)."""
        keys = self.keys(user_id)[:1]
        blob = await self._guard("read", lambda: self._evalsha(READ_SHA, keys, [capacity]), user_id)
        return _actions(blob)

    async def events(self, user_id: str) -> list[StoredEvent]:
        """The stored window with ids and timestamps, oldest first."""
        zkey = self.keys(user_id)[0]
        pairs = await self._guard("read", lambda: self.client.zrange(zkey, 0, -1, withscores=True), user_id)
        out = []
        for member, score in pairs:
            event_id, action = _split(member)
            out.append(StoredEvent(event_id, action, float(score)))
        return out

    async def delete(self, user_id: str) -> None:
        """Erase everything stored for the user (window, index and state: one command, one slot)."""
        keys = (*self.keys(user_id), self.state_key(user_id), *legacy_keys(self.prefix, user_id))
        await self._guard("delete", lambda: self.client.delete(*keys), user_id)

    async def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers."""
        await self._guard("PING", self.client.ping)

    async def _guard(self, op: str, call: Callable[[], Awaitable[V]], user_id: str | None = None) -> V:
        """Run one Redis call within the connection limit; failures become StoreUnavailable. The message (sent to
        the client) names the user; the log line does not."""

        def unavailable(why: str) -> StoreUnavailable:
            where = f"{op} for user {user_id!r}" if user_id is not None else op
            return StoreUnavailable(
                f"Redis at {self.address} is unavailable ({where}): {why}",
                f"Redis at {self.address} is unavailable ({op}): {why}",
            )

        try:
            async with asyncio.timeout(self._queue_timeout):
                await self._limit.acquire()
        except TimeoutError as e:
            raise unavailable(f"no connection free within {self._queue_timeout}s") from e
        try:
            async with asyncio.timeout(self._call_timeout):
                return await call()
        except TimeoutError as e:
            raise unavailable(
                f"no answer within {self._call_timeout}s" if self._call_timeout else repr(e)
            ) from e
        except (RedisError, RedisClusterException, OSError) as e:
            if not is_transient(e):  # the same call would fail again: not an outage to wait out
                where = f"{op} for user {user_id!r}" if user_id is not None else op
                why = f"{type(e).__name__}: {e}"
                raise StoreError(f"Redis refused {where}: {why}", f"Redis refused {op}: {why}") from e
            raise unavailable(f"{type(e).__name__}: {e}") from e
        finally:
            self._limit.release()

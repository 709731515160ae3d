"""Per-user event windows in Redis: key layout and the atomic append/dedupe/trim/expire/read script.

Key layout (one hash slot per user: the user's tag is the key's hash tag, so this works unchanged on a cluster).
<tag> is `{<user_id>}` for an id without braces (the layout of earlier versions, so their windows stay
readable), and `x:{<hex of the id's UTF-8>}` for an id containing `{` or `}`: one slot per user for any id,
and no two ids share a key (the two forms differ right after the prefix). See user_tag().

    {prefix}:<tag>:e         STRING the window, packed: a 7-byte header, then one record per event, oldest first.
                                   header = <format: 1 byte, 1><arrival counter: 6 bytes, big-endian>
                                   record = <timestamp: 8-byte big-endian double><t: 1 byte><id><action>
                                   t >= 128: an id of 16 bytes: t < 192 a server-assigned id (32 lowercase
                                             hex digits), t >= 192 a UUID (36 characters, lowercase); then
                                             the action: t - 128 (t - 192) bytes, but 63 means
                                             <length: 4 bytes> first (t = 191 or 255)
                                   t < 128:  the id as sent: t bytes (t = 127: <length: 4 bytes> first), then
                                             the action: <n: 1 byte> and n bytes (n = 255: <length: 4 bytes>)
                                   Ids and actions are UTF-8, lengths big-endian. Records are in timestamp
                                   order, equal timestamps in arrival order (a new event goes after every
                                   event with a timestamp <= its own), so no per-event counter is stored.
                                   The arrival counter counts every event ever accepted for the user.
    {prefix}:<tag>:s         HASH  per-user serving state, refreshed, expired and deleted with the window.
                                   Incremental state (only with NEXTACT_INCREMENTAL_STATE): v = model_version,
                                   n = the arrival counter it has consumed up to, x = the recurrent state
                                   (float32 bytes). Live quality (NEXTACT_LIVE_QUALITY): pn = the arrival
                                   counter of the window the last predictions were made from, p = those
                                   predictions (each model's version and top-20 ids, see app/quality.py).

The layout before (read and converted, never written; app/windows_legacy.py keeps its script):

    {prefix}:<tag>:w         ZSET  score = timestamp; member = <seq: 12 hex><len(event_id): 4 hex><event_id><action>
    {prefix}:<tag>:i         HASH  event_id -> "" for every event in the window; field "" = the arrival counter

One value per user instead of a sorted set and a hash: a full window of 50 Beauty events with server-assigned
ids takes 1,608 bytes instead of 6,288 on Redis 7 (MEMORY USAGE; bench/memory_per_user.py, docs/capacity.md).

The window is written by one Lua script (APPEND_LUA) that, atomically: skips event ids already in the window,
inserts the rest in timestamp order, trims the oldest beyond the window's capacity, refreshes the TTLs and
returns the counts and the packed window (the service reads the actions out of it: _actions). Dedupe is a scan of the window's records (a plain substring search first:
an id found nowhere in the value is new). Windows hold action strings, not model ids, so a model with another
vocabulary can be served on the same data. The service packs each event's record (_record); the scripts only
read ids and timestamps from them.

Upgrade: when the append finds the old sorted set, it folds its events into the packed window in the same
script (and deletes the old keys), so each window is converted by its user's next write. A window converted
from nothing keeps the old arrival counter, so stored state and predictions stay valid; events an older
replica wrote after the conversion (a rolling upgrade) are merged in as new arrivals. Reads (READ_LUA) fall
back to the old sorted set until then, packing it on the fly; DELETE erases both layouts.

Live quality rides on the same script: it also returns the predictions stored for the window as it was
before this append, when the append's earliest new event is the next one after that window (not late, not
only duplicates, no other event in between). The service scores that event against them and, after
predicting, stores the new predictions with SAVE_PREDICTION_LUA, compare-and-set on the arrival counter (with
incremental state, in the same SAVE_STATE_LUA call as the new state: one script call behind the answer).

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
import re
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from app.redis_client import DirectCommands, bounded, is_transient

log = logging.getLogger(__name__)

V = TypeVar("V")

# The packed window, shared by every script. The scripts answer with the packed window itself (one bulk
# reply): Python reads the actions out of it faster than out of an array or a list of <length><action>.
_PACKED_LUA = """
local FORMAT, HEADER = 1, 7
local WRONG = 'WRONGTYPE the window key holds a value that is not a packed nextact window'

-- The arrival counter in a packed window's header; raises on anything else.
local function counter(v)
  if string.byte(v, 1) ~= FORMAT or #v < HEADER then error({err = WRONG}) end
  return (struct.unpack('>I6', v, 2))
end

-- The arrival counter of the packed window at key, -1 if there is none.
local function arrivals(key)
  local h = redis.call('GETRANGE', key, 0, HEADER - 1)
  if h == '' then return -1 end
  return counter(h)
end

-- The record of s starting at p: first and last byte of its id, the id's kind (0 as sent, 1 32 hex digits,
-- 2 a UUID: both 16 bytes), and the record's last byte.
local function span(s, p)
  local t = string.byte(s, p + 8)
  if t >= 128 then
    local kind, n = 1, t - 128
    if t >= 192 then kind, n = 2, t - 192 end
    if n < 63 then return p + 9, p + 24, kind, p + 24 + n end
    return p + 9, p + 24, kind, p + 28 + struct.unpack('>I4', s, p + 25)
  end
  local b, e = p + 9, p + 8 + t
  if t == 127 then b, e = p + 13, p + 12 + struct.unpack('>I4', s, p + 9) end
  local n = string.byte(s, e + 1)
  if n < 255 then return b, e, 0, e + 1 + n end
  return b, e, 0, e + 5 + struct.unpack('>I4', s, e + 2)
end

-- The starts of the records of the packed window v (P, with P[n + 1] one past the last) and their number.
local function walk(v)
  local P, n, p, size = {}, 0, HEADER + 1, #v
  while p <= size do
    n = n + 1
    P[n] = p
    local t = string.byte(v, p + 8)
    if t >= 192 and t < 255 then  -- the usual records: an id of 16 bytes, a short action
      p = p + t - 167
    elseif t >= 128 and t < 191 then
      p = p + t - 103
    else
      local _, _, _, z = span(v, p)
      p = z + 1
    end
  end
  P[n + 1] = p
  return P, n
end

-- A member of the old layout's sorted set (<seq: 12 hex><id length: 4 hex><id><action>, scored by the
-- timestamp) as a record: the same bytes as the service's own encoding of the event.
local H = '[0-9a-f]'
local UUID = '^' .. H:rep(8) .. '%-' .. H:rep(4) .. '%-' .. H:rep(4) .. '%-' .. H:rep(4) .. '%-' .. H:rep(12) .. '$'
local function from_old(m, score)
  local n = tonumber(string.sub(m, 13, 16), 16)
  local id, act, ts = string.sub(m, 17, 16 + n), string.sub(m, 17 + n), tonumber(score)
  local base
  if #id == 32 and not string.find(id, '[^0-9a-f]') then
    base = 128
  elseif #id == 36 and string.find(id, UUID) then
    base = 192
  end
  if base then
    local hex = string.gsub(id, '%-', '')
    local raw = string.gsub(hex, '%x%x', function(h) return string.char(tonumber(h, 16)) end)
    if #act < 63 then return struct.pack('>dB', ts, base + #act) .. raw .. act end
    return struct.pack('>dB', ts, base + 63) .. raw .. struct.pack('>I4', #act) .. act
  end
  local head = #id < 127 and struct.pack('>dB', ts, #id) or struct.pack('>dBI4', ts, 127, #id)
  local tail = #act < 255 and string.char(#act) or struct.pack('>BI4', 255, #act)
  return head .. id .. tail .. act
end

-- The packed window at KEYS[1], or the old layout's sorted set at KEYS[2] packed (read only: its header's
-- counter is 0), or false when the user has neither.
local function read()
  local v = redis.call('GET', KEYS[1])
  if v then
    counter(v)
    return v
  end
  local old = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  if #old == 0 then return false end
  local out = {struct.pack('>BI6', FORMAT, 0)}
  for i = 1, #old, 2 do out[#out + 1] = from_old(old[i], old[i + 1]) end
  return table.concat(out)
end
"""

# The append shared by both append scripts. KEYS[1] the packed window, KEYS[2] the state hash, KEYS[3] and
# KEYS[4] the old layout's sorted set and index; ARGV[1] capacity, ARGV[2] ttl seconds, then one packed
# record per event from ARGV[first]. Folds the old layout in (if any), skips ids already in the window,
# inserts the rest in timestamp order, trims the oldest beyond the capacity, stores the window with the
# arrival counter and refreshes the two TTLs. Returns accepted, duplicates, the arrival counter before and
# after, whether no accepted event is older than the window's newest before, the index (0-based, among the
# events) of the earliest accepted event (-1 if none), and the packed window after.
_APPEND_FN_LUA = """
local function append(first)
  local cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
  local v = redis.call('GET', KEYS[1])
  local existed, seq, P, n = v ~= false, 0, {}, 0
  if existed then
    seq = counter(v)
    P, n = walk(v)
  else
    v = ''
  end
  -- The window, oldest first: the index of a record in v, or a new record.
  local order = {}
  for i = 1, n do order[i] = i end
  local function ts(x)
    if type(x) == 'number' then return (struct.unpack('>d', v, P[x])) end
    return (struct.unpack('>d', x))
  end

  -- Dedupe: ids added now, and those of v's records (collected only when an id occurs in v at all).
  local added, stored = {[0] = {}, {}, {}}, nil  -- by kind of id
  local function is_new(rec)
    local b, e, kind = span(rec, 1)
    local id = string.sub(rec, b, e)
    if added[kind][id] then return false end
    if n > 0 and string.find(v, id, HEADER + 1, true) then
      if not stored then
        stored = {[0] = {}, {}, {}}
        for i = 1, n do
          local sb, se, skind = span(v, P[i])
          stored[skind][string.sub(v, sb, se)] = true
        end
      end
      if stored[kind][id] then return false end
    end
    added[kind][id] = true
    return true
  end
  -- After every record with a timestamp <= its own: equal timestamps keep arrival order.
  local function insert(rec)
    local t = struct.unpack('>d', rec)
    local j = #order
    while j > 0 and ts(order[j]) > t do j = j - 1 end
    table.insert(order, j + 1, rec)
    return t
  end

  local changed = false
  if redis.call('EXISTS', KEYS[3], KEYS[4]) > 0 then  -- the old layout: fold it in, delete it
    if not existed then seq = tonumber(redis.call('HGET', KEYS[4], '') or '0') end
    local old = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
    for i = 1, #old, 2 do
      local rec = from_old(old[i], old[i + 1])
      if is_new(rec) then
        insert(rec)
        if existed then seq = seq + 1 end  -- written by an older replica after the conversion: new arrivals
      end
    end
    redis.call('DEL', KEYS[3], KEYS[4])
    changed = true
  end

  local before = seq
  local newest = #order > 0 and ts(order[#order]) or nil
  local in_order, accepted, duplicates = true, 0, 0
  local earliest, earliest_ts = -1, nil
  for i = first, #ARGV do
    local rec = ARGV[i]
    if is_new(rec) then
      local t = insert(rec)
      seq = seq + 1
      accepted = accepted + 1
      if newest and t < newest then in_order = false end
      if earliest_ts == nil or t < earliest_ts then earliest, earliest_ts = i - first, t end
    else
      duplicates = duplicates + 1
    end
  end

  local drop = math.max(#order - cap, 0)  -- the oldest beyond the capacity
  if accepted > 0 or changed or drop > 0 then
    local parts, k = {struct.pack('>BI6', FORMAT, seq)}, drop + 1
    while k <= #order do
      local x = order[k]
      if type(x) == 'number' then  -- a run of records kept from v: one substring
        local y = x
        while order[k + 1] == y + 1 do k, y = k + 1, y + 1 end
        parts[#parts + 1] = string.sub(v, P[x], P[y + 1] - 1)
      else
        parts[#parts + 1] = x
      end
      k = k + 1
    end
    v = table.concat(parts)
    redis.call('SET', KEYS[1], v, 'EX', ttl)
  else
    redis.call('EXPIRE', KEYS[1], ttl)
  end
  redis.call('EXPIRE', KEYS[2], ttl)
  return accepted, duplicates, before, seq, in_order, earliest, v
end

-- Live quality: the predictions stored after the window as it was before this append (KEYS[2] fields pn =
-- the arrival counter they were made at, p = the records), if the append's earliest new event is the next
-- event after that window. Returns {outcome, event index, records}: outcome 0 scored, 1 nothing new
-- (duplicates only), 2 late (a new event older than the window's newest), 3 no prediction for that window.
local function last_prediction(accepted, before, in_order, earliest)
  if accepted == 0 then return {1, -1, ''} end
  if not in_order then return {2, -1, ''} end
  local pr = redis.call('HMGET', KEYS[2], 'pn', 'p')
  if pr[2] and tonumber(pr[1]) == before then return {0, earliest, pr[2]} end
  return {3, -1, ''}
end
"""

# Events from ARGV[3]. Returns {accepted, duplicates, packed window, arrival counter after, last prediction}.
APPEND_LUA = (
    _PACKED_LUA
    + _APPEND_FN_LUA
    + """
local accepted, duplicates, before, seq, in_order, earliest, window = append(3)
return {accepted, duplicates, window, seq, last_prediction(accepted, before, in_order, earliest)}
"""
)

# The same plus ARGV[3] model version; events from ARGV[4]. Returns {accepted, duplicates, packed window,
# arrival counter after the append, last prediction, state bytes or "" when the state is not usable}.
APPEND_STATE_LUA = (
    _PACKED_LUA
    + _APPEND_FN_LUA
    + """
local accepted, duplicates, before, seq, in_order, earliest, window = append(4)
local state = ''
local st = redis.call('HMGET', KEYS[2], 'v', 'n', 'x')
if in_order and accepted > 0 and accepted < tonumber(ARGV[1]) and st[1] == ARGV[3]
    and tonumber(st[2]) == before then
  state = st[3]
end
return {accepted, duplicates, window, seq, last_prediction(accepted, before, in_order, earliest), state}
"""
)

# KEYS[1] packed window, KEYS[2] state hash. ARGV[1] arrival counter the state covers, ARGV[2] model version,
# ARGV[3] state bytes, ARGV[4] ttl, optionally ARGV[5] live quality's prediction records for the same window
# (what SAVE_PREDICTION_LUA writes, in the same call). Writes only if no event arrived since; returns 1 if
# written, else 0.
SAVE_STATE_LUA = (
    _PACKED_LUA
    + """
if arrivals(KEYS[1]) ~= tonumber(ARGV[1]) then return 0 end
if ARGV[5] then
  redis.call('HSET', KEYS[2], 'v', ARGV[2], 'n', ARGV[1], 'x', ARGV[3], 'pn', ARGV[1], 'p', ARGV[5])
else
  redis.call('HSET', KEYS[2], 'v', ARGV[2], 'n', ARGV[1], 'x', ARGV[3])
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return 1
"""
)

# KEYS[1] packed window, KEYS[2] state hash. ARGV[1] arrival counter the predictions were made at, ARGV[2]
# the records, ARGV[3] ttl. Writes only if no event arrived since; returns 1 if written, else 0.
SAVE_PREDICTION_LUA = (
    _PACKED_LUA
    + """
if arrivals(KEYS[1]) ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], 'pn', ARGV[1], 'p', ARGV[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""
)

# KEYS[1] packed window, KEYS[2] the old layout's sorted set (read when there is no packed window yet).
# Returns the packed window, or "" when there is none. Read only: no TTL is refreshed, nothing converted.
READ_LUA = (
    _PACKED_LUA
    + """
return read() or ''
"""
)


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


APPEND_SHA = _sha(APPEND_LUA)
READ_SHA = _sha(READ_LUA)
APPEND_STATE_SHA = _sha(APPEND_STATE_LUA)
SAVE_STATE_SHA = _sha(SAVE_STATE_LUA)
SAVE_PREDICTION_SHA = _sha(SAVE_PREDICTION_LUA)
SCRIPTS = {
    APPEND_SHA: APPEND_LUA,
    READ_SHA: READ_LUA,
    APPEND_STATE_SHA: APPEND_STATE_LUA,
    SAVE_STATE_SHA: SAVE_STATE_LUA,
    SAVE_PREDICTION_SHA: SAVE_PREDICTION_LUA,
}

HEADER = 7  # bytes before the first record: format, arrival counter
FORMAT = 1
_TS = struct.Struct(">d")
# Ids stored as their 16 bytes: what the service assigns (uuid4().hex), and a UUID in its usual form.
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_UUID_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


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
class StateWrite:
    """A user's new incremental state, covering arrivals up to `seq`, and live quality's predictions made from
    the same window (app/quality.py's records) when they are stored with it."""

    user_id: str
    seq: int
    model_version: str
    state: bytes
    predictions: bytes | None = None


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


def _length(n: int, limit: int, escape: int) -> bytes:
    """One byte when n < limit, else the escape byte and 4 bytes."""
    return bytes((n,)) if n < limit else bytes((escape,)) + n.to_bytes(4, "big")


def _record(e: NewEvent) -> bytes:
    """The event as the packed window stores it (the record format in the module docstring)."""
    ts, action, eid = _TS.pack(e.timestamp), e.action.encode(), e.event_id
    base = 0
    if len(eid) == 32 and _HEX_ID.fullmatch(eid):
        base, raw = 128, bytes.fromhex(eid)
    elif len(eid) == 36 and _UUID_ID.fullmatch(eid):
        base, raw = 192, bytes.fromhex(eid.replace("-", ""))
    if base:
        if len(action) < 63:
            return ts + bytes((base + len(action),)) + raw + action
        return ts + bytes((base + 63,)) + raw + len(action).to_bytes(4, "big") + action
    event_id = e.event_id.encode()
    return ts + _length(len(event_id), 127, 127) + event_id + _length(len(action), 255, 255) + action


def _unpack(value: bytes) -> list[StoredEvent]:
    """The events of a packed window, oldest first."""
    out, p, end = [], HEADER, len(value)
    while p < end:
        (ts,) = _TS.unpack_from(value, p)
        t = value[p + 8]
        if t >= 128:
            h, a, n = value[p + 9 : p + 25].hex(), p + 25, t - 128
            event_id = h
            if t >= 192:
                event_id, n = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}", t - 192
            long = n == 63
        else:
            b, n = p + 9, t
            if t == 127:
                b, n = b + 4, int.from_bytes(value[b : b + 4], "big")
            event_id, a = value[b : b + n].decode(), b + n + 1
            n = value[a - 1]
            long = n == 255
        if long:
            a, n = a + 4, int.from_bytes(value[a : a + 4], "big")
        out.append(StoredEvent(event_id, value[a : a + n].decode(), ts))
        p = a + n
    return out


def _append_result(reply: Any) -> AppendResult:
    outcome, event, records = reply[4]
    last = (
        LastPrediction(int(outcome), int(event), bytes(records)) if int(outcome) != NO_PREDICTION else _NONE
    )
    return AppendResult(int(reply[0]), int(reply[1]), _actions(reply[2]), int(reply[3]), last)


def _actions(value: bytes) -> list[str]:
    """The actions of a packed window, oldest first (_unpack without ids and timestamps: the hot path)."""
    out, p, end = [], HEADER, len(value)
    while p < end:
        t = value[p + 8]
        if t >= 128:
            a = p + 25
            p = a + (t - 128 if t < 192 else t - 192)
            if t == 191 or t == 255:
                a += 4
                p = a + int.from_bytes(value[a - 4 : a], "big")
        else:
            a = p + 9 + t  # the action's length byte, after the id
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

    def keys(self, user_id: str) -> tuple[str, ...]:
        """The keys of a user's window: one, the packed window."""
        return (f"{user_tag(self.prefix, user_id)}:e",)

    def old_keys(self, user_id: str) -> tuple[str, str]:
        """(sorted set, dedupe hash) of the layout before the packed window: read, converted, erased."""
        base = user_tag(self.prefix, user_id)
        return f"{base}:w", f"{base}:i"

    def state_key(self, user_id: str) -> str:
        """The user's incremental-state hash (same hash tag, so the same cluster slot as the window)."""
        return f"{user_tag(self.prefix, user_id)}:s"

    async def load_script(self) -> None:
        """Preload the scripts (on every primary of a cluster) so requests can use EVALSHA."""
        for source in SCRIPTS.values():
            await self._guard("SCRIPT LOAD", partial(self.client.script_load, source), via_client=True)

    async def _evalsha(self, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._run_script(sha, keys, args)
        except NoScriptError:  # Redis restarted, failed over or flushed its scripts
            # redis-py's own call: in a task of its own, so the caller's deadline holds (see bounded)
            await bounded(partial(self.client.script_load, SCRIPTS[sha]), self._call_timeout)
            return await self._run_script(sha, keys, args)

    def _run_script(self, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Awaitable[Any]:
        if self._direct is not None:
            return self._direct.execute("EVALSHA", sha, len(keys), *keys, *args)
        return self.client.evalsha(sha, len(keys), *keys, *args)  # type: ignore[no-any-return]

    def append_call(
        self, user_id: str, events: Sequence[NewEvent], capacity: int, model_version: str | None = None
    ) -> tuple[str, tuple[str, ...], list[Any]]:
        """(script sha, KEYS, ARGV) of one append: APPEND_LUA, or APPEND_STATE_LUA with a model version.

        KEYS: packed window, state hash, the old layout's two keys (all in the user's slot)."""
        keys = (self.keys(user_id)[0], self.state_key(user_id), *self.old_keys(user_id))
        if model_version is None:
            return APPEND_SHA, keys, [capacity, self.ttl_seconds, *map(_record, events)]
        return APPEND_STATE_SHA, keys, [capacity, self.ttl_seconds, model_version, *map(_record, events)]

    async def append(self, user_id: str, events: Sequence[NewEvent], capacity: int) -> AppendResult:
        """Store new events (skipping known ids), trim to capacity, refresh the TTL; one round trip."""
        sha, keys, args = self.append_call(user_id, events, capacity)
        reply = await self._guard("append", lambda: self._evalsha(sha, keys, args), user_id)
        return _append_result(reply)

    async def append_with_state(
        self, user_id: str, events: Sequence[NewEvent], capacity: int, model_version: str
    ) -> StatefulAppend:
        """append(), plus the stored state when it covers the window before these events; one round trip."""
        sha, keys, args = self.append_call(user_id, events, capacity, model_version)
        reply = await self._guard("append", lambda: self._evalsha(sha, keys, args), user_id)
        return StatefulAppend(_append_result(reply), int(reply[3]), bytes(reply[5]) or None)

    async def save_prediction(self, user_id: str, seq: int, records: bytes) -> bool:
        """Store the predictions made from the window at arrival counter `seq`, unless an event arrived since."""
        keys = (self.keys(user_id)[0], self.state_key(user_id))
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
                self.keys(u)[0],
                self.state_key(u),
                seq,
                rec,
                self.ttl_seconds,
            )
            for u, seq, rec in items
        ]
        replies = await self._guard("prediction", lambda: direct.execute_many(commands))
        if any(isinstance(r, NoScriptError) for r in replies):  # Redis restarted or flushed its scripts
            await self._guard(
                "SCRIPT LOAD", partial(self.client.script_load, SAVE_PREDICTION_LUA), via_client=True
            )
            replies = await self._guard("prediction", lambda: direct.execute_many(commands))
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            raise StoreUnavailable(f"Redis at {self.address} refused storing predictions: {errors[0]}")
        return sum(int(r) for r in replies)

    async def save_state(self, user_id: str, seq: int, model_version: str, state: bytes) -> bool:
        """Store the state covering arrivals up to `seq`, unless another event arrived since; True if stored."""
        keys = (self.keys(user_id)[0], self.state_key(user_id))
        args = [seq, model_version, state, self.ttl_seconds]
        reply = await self._guard("state", lambda: self._evalsha(SAVE_STATE_SHA, keys, args), user_id)
        return bool(int(reply))

    async def save_states(self, items: Sequence[StateWrite]) -> list[bool | StoreError]:
        """save_state for many users, sent together (one round trip on a single server, with whatever else is
        sent in this loop turn), each with its user's prediction records when given (one script call for both).

        Each user's outcome in order: True stored, False stale (another event arrived first), or the StoreError
        Redis answered for that user. StoreUnavailable when Redis does not answer.
        """
        calls = []
        for w in items:
            keys = (self.keys(w.user_id)[0], self.state_key(w.user_id))
            args: list[Any] = [w.seq, w.model_version, w.state, self.ttl_seconds]
            if w.predictions is not None:
                args.append(w.predictions)
            calls.append((keys, args))
        replies = await self._guard("state", lambda: self._evalsha_each(SAVE_STATE_SHA, calls))
        out: list[bool | StoreError] = []
        for w, reply in zip(items, replies, strict=True):
            if isinstance(reply, BaseException):
                why = f"{type(reply).__name__}: {reply}"
                out.append(
                    StoreError(
                        f"Redis refused state for user {w.user_id!r}: {why}", f"Redis refused state: {why}"
                    )
                )
            else:
                out.append(bool(int(reply)))
        return out

    async def _evalsha_each(
        self, sha: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Each call's reply, or its error reply in its place; raises when Redis did not answer."""
        replies = await self._send_each(sha, calls)
        again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if again:  # Redis restarted, failed over or flushed its scripts: load it, send those calls again
            await bounded(partial(self.client.script_load, SCRIPTS[sha]), self._call_timeout)
            for i, reply in zip(again, await self._send_each(sha, [calls[i] for i in again]), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, BaseException) and (
                is_transient(reply) or not isinstance(reply, RedisError)
            ):
                raise reply  # no answer (after every try), or a cluster's refusal: the whole write failed
        return replies

    async def _send_each(self, sha: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        if self._direct is None:  # a cluster: redis-py's client, one call per user's slot, concurrently
            sent = [self.client.evalsha(sha, len(k), *k, *a) for k, a in calls]
            return list(await asyncio.gather(*sent, return_exceptions=True))
        return await self._direct.execute_all([("EVALSHA", sha, len(k), *k, *a) for k, a in calls])

    async def actions(self, user_id: str, capacity: int) -> list[str]:
        """The newest `capacity` actions of the window, oldest first (read-only: the TTL is not refreshed)."""
        keys = (self.keys(user_id)[0], self.old_keys(user_id)[0])
        value = await self._guard("read", lambda: self._evalsha(READ_SHA, keys, []), user_id)
        found = _actions(value)
        return found[max(len(found) - capacity, 0) :]

    async def events(self, user_id: str) -> list[StoredEvent]:
        """The stored window with ids and timestamps, oldest first."""
        keys = (self.keys(user_id)[0], self.old_keys(user_id)[0])
        value = await self._guard("read", lambda: self._evalsha(READ_SHA, keys, []), user_id)
        return _unpack(value)

    async def delete(self, user_id: str) -> None:
        """Erase everything stored for the user (window and state, in either layout: one command, one slot)."""
        keys = (
            *self.keys(user_id),
            self.state_key(user_id),
            *self.old_keys(user_id),
            *legacy_keys(self.prefix, user_id),
        )
        await self._guard("delete", lambda: self.client.delete(*keys), user_id, via_client=True)

    async def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers."""
        await self._guard("PING", self.client.ping, via_client=True)

    async def _guard(
        self, op: str, call: Callable[[], Awaitable[V]], user_id: str | None = None, via_client: bool = False
    ) -> V:
        """Run one Redis call within the connection limit; failures become StoreUnavailable. The message (sent to
        the client) names the user; the log line does not."""

        def unavailable(why: str) -> StoreUnavailable:
            where = f"{op} for user {user_id!r}" if user_id is not None else op
            return StoreUnavailable(
                f"Redis at {self.address} is unavailable ({where}): {why}",
                f"Redis at {self.address} is unavailable ({op}): {why}",
            )

        if self._limit.locked():  # wait for a free slot, at most the queue timeout
            try:
                async with asyncio.timeout(self._queue_timeout):
                    await self._limit.acquire()
            except TimeoutError as e:
                raise unavailable(f"no connection free within {self._queue_timeout}s") from e
        else:  # a free slot: taken at once, without arming a timer
            await self._limit.acquire()
        try:
            if via_client or self._direct is None:  # redis-py's own calls: a task of their own (see bounded)
                return await bounded(call, self._call_timeout)
            async with asyncio.timeout(
                self._call_timeout
            ):  # DirectCommands: the caller waits on a future only
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

"""The window layout before the packed window (a sorted set and a dedupe hash per user), kept verbatim.

The service never writes it: it reads such windows and converts each on its user's next append
(app/windows.py). This module writes windows exactly as earlier versions did, for the upgrade tests and for
the old-vs-new comparison in bench/memory_per_user.py.

    {prefix}:<tag>:w   ZSET  score = timestamp; member = <seq: 12 hex><len(event_id): 4 hex><event_id><action>
    {prefix}:<tag>:i   HASH  event_id -> "" for every event in the window; the field "" = the arrival counter
    {prefix}:<tag>:s   HASH  serving state (the same fields as now)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from app.windows import NewEvent, user_tag

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

APPEND_SHA = hashlib.sha1(APPEND_LUA.encode()).hexdigest()


def keys(prefix: str, user_id: str) -> tuple[str, str, str]:
    """(window zset, dedupe hash, state hash): the old append script's KEYS."""
    base = user_tag(prefix, user_id)
    return f"{base}:w", f"{base}:i", f"{base}:s"


def append_command(
    prefix: str, user_id: str, events: Sequence[NewEvent], capacity: int, ttl_seconds: int
) -> list[Any]:
    """The EVALSHA command an earlier version sent for an append (load APPEND_LUA first)."""
    args: list[Any] = [capacity, ttl_seconds]
    for e in events:
        args += (e.event_id, e.action, repr(e.timestamp))
    return ["EVALSHA", APPEND_SHA, 3, *keys(prefix, user_id), *args]


def actions(blob: bytes) -> list[str]:
    """The old scripts' reply, <len: 4 hex><action>..., as a list (how earlier versions parsed it)."""
    out, i, end = [], 0, len(blob)
    while i < end:
        n = int(blob[i : i + 4], 16)
        i += 4
        out.append(blob[i : i + n].decode())
        i += n
    return out

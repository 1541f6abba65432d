"""The Lua scripts the counting policies run on Redis: one atomic script per check.

Every script reads the Redis server's clock (``TIME``), so units whose clocks
differ still share one timeline, and does its read and its write in one step,
so N units admit exactly what one would (no read-then-write race). Times are
integers in microseconds (sliding log, fixed window) or milliseconds (leases):
well inside the 2**53 a Lua number holds exactly.

=====================  ==========================================================
script                 semantics (docs/policies.md, docs/cluster.md)
=====================  ==========================================================
:data:`SLIDING_LOG`    rate-limit(-by-key): a sorted set of admitted handshakes'
                       times; an event at ``t`` counts while ``now < t + period``;
                       at most ``calls`` in any window (exact sliding log)
:data:`FIXED_WINDOW`   quota(-by-key): a hash {start, calls, bytes}; the window
                       opens at the first use and lasts ``period``
:data:`ACQUIRE`        limit-concurrency: a sorted set of leases scored by expiry;
                       expired leases are dropped before counting
:data:`RENEW`          the keeper's heartbeat: every lease it holds expires
                       ``lease_ttl`` from now (re-added if Redis lost it)
:data:`RELEASE`        a pair ended: its leases go
=====================  ==========================================================
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "FIXED_WINDOW", "RELEASE", "RENEW", "SLIDING_LOG"]

#: KEYS[1] sorted set; ARGV calls, period (µs). Returns 0 (admitted) or µs to wait.
SLIDING_LOG = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local calls = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
local n = redis.call('ZCARD', KEYS[1])
if n < calls then
  -- Unique: within one microsecond n only grows (nothing that recent is removed).
  redis.call('ZADD', KEYS[1], now, t[1] .. '.' .. t[2] .. '.' .. n)
  redis.call('PEXPIRE', KEYS[1], math.ceil(period / 1000))
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, math.ceil(tonumber(oldest[2]) + period - now))
"""

#: KEYS[1] hash; ARGV calls (-1: none), bytes (-1: none), period (µs), "call" or
#: "bytes", bytes to charge. Returns 0 (within quota, or bytes charged) or µs
#: until the window renews.
FIXED_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[3])
local start = tonumber(redis.call('HGET', KEYS[1], 's'))
if start == nil or now >= start + period then
  start = now
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 's', string.format('%.0f', now), 'c', 0, 'b', 0)
  redis.call('PEXPIRE', KEYS[1], math.ceil(period / 1000))
end
if ARGV[4] == 'bytes' then
  redis.call('HINCRBY', KEYS[1], 'b', ARGV[5])
  return 0
end
local used = redis.call('HMGET', KEYS[1], 'c', 'b')
local calls = tonumber(ARGV[1])
local nbytes = tonumber(ARGV[2])
if (calls >= 0 and tonumber(used[1]) >= calls) or (nbytes >= 0 and tonumber(used[2]) >= nbytes) then
  return math.max(1, math.ceil(start + period - now))
end
redis.call('HINCRBY', KEYS[1], 'c', 1)
return 0
"""

# The key lives as long as its longest lease: PEXPIREAT to the highest score.
_EXPIRE_WITH_LEASES = """
local top = redis.call('ZRANGE', KEYS[{i}], -1, -1, 'WITHSCORES')
if top[2] then redis.call('PEXPIREAT', KEYS[{i}], top[2]) end
"""

#: KEYS[1] sorted set; ARGV max_count, lease_ttl (ms), lease id. Returns 1 (taken) or 0.
ACQUIRE = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
"""
    + _EXPIRE_WITH_LEASES.format(i=1)
    + """
return 1
"""
)

#: KEYS sorted sets; ARGV lease_ttl (ms), then one lease id per key. Returns how many.
RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, expiry, ARGV[i + 1])
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', key, top[2])
end
return #KEYS
"""

#: KEYS sorted sets; ARGV one lease id per key. Returns how many were still held.
RELEASE = """
local n = 0
for i, key in ipairs(KEYS) do
  n = n + redis.call('ZREM', key, ARGV[i])
end
return n
"""

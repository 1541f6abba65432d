"""The live units of a deployment and their open pairs, in Redis with a TTL.

Each unit keeps, renewed by its keeper (:class:`~.member.Member`):

* ``{key_prefix}unit:{id}``: JSON (id, addresses, start time, config
  version, open pairs), expiring after ``lease_ttl``;
* ``{key_prefix}pairs:{id}``: a hash, correlation id -> the pair as
  ``GET /connections`` lists it, expiring with it;
* its id in ``{key_prefix}units``, a sorted set scored by the unit's expiry
  (Redis server time, ms), so a listing finds every live unit without a scan
  and drops the ones past their expiry.

A unit killed outright stops renewing, so its entries vanish within
``lease_ttl``. Commands to a unit (close a pair) go to the channel
``{key_prefix}unit:{id}:commands``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .redis import RedisClient

__all__ = ["PUBLISH", "UnitRegistry"]

#: KEYS = unit key, pairs hash, units set; ARGV = ttl ms, unit id, unit JSON,
#: "1" to replace every pair (else update), n, n (id, JSON) pairs to set, ids to remove.
PUBLISH = """
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[3], 'PX', ttl)
redis.call('ZADD', KEYS[3], now + ttl, ARGV[2])
if ARGV[4] == '1' then redis.call('DEL', KEYS[2]) end
local n = tonumber(ARGV[5])
local i = 6
for _ = 1, n do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  i = i + 1
end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

#: KEYS = unit key, pairs hash, units set; ARGV = unit id. A unit that stops.
LEAVE = """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

#: KEYS = units set; ARGV = key prefix, "1" to include each unit's pairs.
#: Returns {{unit JSON, {pair JSON...}}...} for every live unit.
LIST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local info = redis.call('GET', ARGV[1] .. 'unit:' .. id)
  if info then
    local held = {}
    if ARGV[2] == '1' then held = redis.call('HVALS', ARGV[1] .. 'pairs:' .. id) end
    table.insert(out, {info, held})
  end
end
return out
"""

#: KEYS = units set; ARGV = key prefix, correlation id, command JSON (or "" to only look).
#: Returns {owner unit id or "", pair JSON or "", receivers of the command}.
FIND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local pair = redis.call('HGET', ARGV[1] .. 'pairs:' .. id, ARGV[2])
  if pair then
    local receivers = 0
    if ARGV[3] ~= '' then
      receivers = redis.call('PUBLISH', ARGV[1] .. 'unit:' .. id .. ':commands', ARGV[3])
    end
    return {id, pair, receivers}
  end
end
return {'', '', 0}
"""


class UnitRegistry:
    """This unit's entries in Redis, and the listing of every live unit.

    Each call is one script bounded by ``[cluster] timeout``; each raises
    :class:`~wsgate.errors.ClusterUnavailable` when Redis does not answer.
    """

    def __init__(self, client: RedisClient, unit_id: str) -> None:
        self.client = client
        self.unit_id = unit_id
        self.prefix = client.config.key_prefix
        self.ttl_ms = max(1, math.ceil(client.config.lease_ttl * 1000))
        self._keys = [
            f"{self.prefix}unit:{unit_id}",
            f"{self.prefix}pairs:{unit_id}",
            f"{self.prefix}units",
        ]
        #: The channel this unit takes commands on.
        self.commands = f"{self.prefix}unit:{unit_id}:commands"

    async def publish(
        self,
        unit: Mapping[str, Any],
        pairs: Mapping[str, Mapping[str, Any]],
        removed: Sequence[str] = (),
        *,
        replace: bool = False,
    ) -> None:
        """Renew this unit's entries, set ``pairs`` (all if ``replace``), drop ``removed``."""
        args: list[object] = [self.ttl_ms, self.unit_id, _json(unit), "1" if replace else "0"]
        args.append(len(pairs))
        for correlation_id, pair in pairs.items():
            args += [correlation_id, _json(pair)]
        args += list(removed)
        await self.client.script(PUBLISH, self._keys, args)

    async def leave(self) -> None:
        """Remove this unit's entries at once (a graceful stop)."""
        await self.client.script(LEAVE, self._keys, [self.unit_id])

    async def units(self, *, with_pairs: bool = False) -> list[tuple[dict[str, Any], list[Any]]]:
        """Every live unit's JSON, and (``with_pairs``) its pairs' JSON."""
        rows = await self.client.script(
            LIST, [self._keys[2]], [self.prefix, "1" if with_pairs else "0"]
        )
        return [
            (json.loads(info), [json.loads(pair) for pair in held]) for info, held in rows or []
        ]

    async def find(
        self, correlation_id: str, command: Mapping[str, Any] | None = None
    ) -> tuple[str | None, dict[str, Any] | None, int]:
        """The live unit holding pair ``correlation_id``, the pair, and how many
        of its subscribers got ``command`` (sent only if given)."""
        owner, pair, receivers = await self.client.script(
            FIND, [self._keys[2]], [self.prefix, correlation_id, _json(command) if command else ""]
        )
        if not owner:
            return None, None, 0
        return str(owner), json.loads(pair), int(receivers)


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))

"""The managed configuration of every unit, as one versioned document in Redis.

With ``[cluster]``, the APIs, products and subscriptions (the tables the
management API changes) live in one Redis hash, ``{key_prefix}config``:
``version`` (an integer, +1 per change) and ``document`` (JSON:
``{"apis": [...], "products": [...], "subscriptions": [...]}``, each item the
table the config file would hold). Every other table ([gateway], [admin],
[cluster]) stays each unit's own, from its file.

* A change is a compare-and-set on the version (:data:`CAS`, one Lua script):
  it is stored only if the document is still at the version the unit built the
  change on, and the new version is published on ``{key_prefix}config`` in the
  same script, so no change is announced that was not stored.
* Every unit applies an announced version when it hears it, and polls the
  version every :data:`POLL_INTERVAL` seconds to catch up on what it missed.
* A starting unit reads the document; its file's tables seed it only when Redis
  holds none (:data:`SEED`, which writes only if the hash does not exist).

:class:`ClusterManager` is the :class:`~wsgate.admin.manager.Manager` of a
unit: it validates a change exactly as without ``[cluster]``, then stores it
here before serving it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..admin.manager import Invalid, Manager, StaleVersion, Unavailable, problem
from ..admin.state import COLLECTIONS, Overrides, empty_overrides
from ..config import Config
from ..errors import ClusterUnavailable

if TYPE_CHECKING:
    from ..gateway import Gateway
    from .redis import RedisClient

__all__ = ["CAS", "POLL_INTERVAL", "SEED", "ClusterManager", "SharedConfig", "shared_tables"]

T = TypeVar("T")

#: Seconds between two polls of the shared version (the catch-up after a missed announcement).
POLL_INTERVAL = 2.0

#: Attempts at a change whose compare-and-set lost to another unit's (no If-Match given).
ATTEMPTS = 5

#: KEYS[1] = the hash; ARGV = expected version, document, channel.
#: Returns {1, new version, ""} or {0, current version, current document}.
CAS = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current, redis.call('HGET', KEYS[1], 'document') or ''}
end
local version = current + 1
redis.call('HSET', KEYS[1], 'version', version, 'document', ARGV[2])
redis.call('PUBLISH', ARGV[3], version)
return {1, version, ''}
"""

#: KEYS[1] = the hash; ARGV = version, document, channel. Writes only if there is none.
#: Returns {1, version, ""} or {0, current version, current document}.
SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, tonumber(redis.call('HGET', KEYS[1], 'version') or '0'),
          redis.call('HGET', KEYS[1], 'document') or ''}
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'document', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return {1, tonumber(ARGV[1]), ''}
"""

#: KEYS[1] = the hash. Returns {version (0: none), document or ""}.
READ = """
return {tonumber(redis.call('HGET', KEYS[1], 'version') or '0'),
        redis.call('HGET', KEYS[1], 'document') or ''}
"""

#: KEYS[1] = the hash. Returns the version (0: none).
VERSION = "return tonumber(redis.call('HGET', KEYS[1], 'version') or '0')"

Tables = dict[str, list[Any]]


def shared_tables(document: Mapping[str, Any]) -> Tables:
    """The managed collections of a config document (what the shared document holds)."""
    return {c: copy.deepcopy(list(document.get(c, []))) for c in COLLECTIONS}


class SharedConfig:
    """The Redis side of the shared document: read, seed, compare-and-set.

    Every call is one script, bounded by ``[cluster] timeout``; each raises
    :class:`~wsgate.errors.ClusterUnavailable` when Redis does not answer.
    """

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        prefix = client.config.key_prefix
        self.key = f"{prefix}config"
        #: Where each new version is announced (the message is the version).
        self.channel = f"{prefix}config"

    async def read(self) -> tuple[int, Tables | None]:
        """(version, tables), or (0, None) when Redis holds no document."""
        version, text = await self.client.script(READ, [self.key], [])
        return int(version), _decode(text)

    async def version(self) -> int:
        """The shared version (0: no document)."""
        return int(await self.client.script(VERSION, [self.key], []))

    async def cas(self, expected: int, tables: Tables) -> tuple[bool, int, Tables | None]:
        """Store ``tables`` as version ``expected + 1`` if the document is at ``expected``.

        Returns (stored, version, tables in Redis when not stored).
        """
        stored, version, text = await self.client.script(
            CAS, [self.key], [expected, _encode(tables), self.channel]
        )
        return bool(int(stored)), int(version), _decode(text)

    async def seed(self, version: int, tables: Tables) -> tuple[bool, int, Tables | None]:
        """Store ``tables`` at ``version`` only if Redis holds no document (like :meth:`cas`)."""
        stored, current, text = await self.client.script(
            SEED, [self.key], [version, _encode(tables), self.channel]
        )
        return bool(int(stored)), int(current), _decode(text)


def _encode(tables: Tables) -> str:
    return json.dumps(tables, separators=(",", ":"), sort_keys=True)


def _decode(text: str) -> Tables | None:
    if not text:
        return None
    document = json.loads(text)
    return {c: list(document.get(c, [])) for c in COLLECTIONS}


class _Lost(Exception):
    """The compare-and-set lost to another unit's change; the local state is synced."""


def _unavailable(exc: ClusterUnavailable) -> Unavailable:
    return Unavailable(
        [
            problem(
                None,
                f"the shared configuration (Redis, [cluster]) is unavailable: {exc}; nothing"
                " changed. The gateway keeps serving its last configuration; retry later",
            )
        ]
    )


class ClusterManager(Manager):
    """A unit's Manager: changes are stored in :class:`SharedConfig` before they are served.

    ``version`` is the shared document's version this unit runs. ``state_file``
    is not used: Redis holds the changes.
    """

    def __init__(self, gateway: Gateway, shared: SharedConfig) -> None:
        super().__init__(gateway, None)
        self.shared = shared
        self.version = 0  # none yet: start() reads or seeds it
        self._failed_version = 0  # a shared version that does not fit this unit (logged once)

    # -- start, follow -------------------------------------------------------------
    async def start(self) -> None:
        """Run the shared document, or seed it with this unit's tables if there is none.

        If Redis does not answer, the unit runs its file and catches up later
        (:meth:`sync`, from the poller).
        """
        async with self._lock:
            try:
                stored, version, tables = await self.shared.seed(1, self._tables())
            except ClusterUnavailable as exc:
                self._log.warning(
                    "cluster_config_unavailable",
                    error=str(exc),
                    detail="serving the config file until Redis answers",
                )
                return
            if stored:
                self.version = version
                self._log.info("cluster_config_seeded", version=version)
            elif tables is not None:
                self._apply(version, tables)

    async def sync(self, known: int | None = None) -> None:
        """Apply the shared document if its version differs from this unit's.

        ``known`` is an announced version (skip the read if it is ours).
        Re-seeds Redis with this unit's document when it holds none (restarted
        empty). Raises ClusterUnavailable.
        """
        if known is not None and known == self.version:
            return
        async with self._lock:
            version, tables = await self.shared.read()
            if tables is None:
                stored, version, tables = await self.shared.seed(
                    max(self.version, 1), self._tables()
                )
                if stored:
                    self._log.warning("cluster_config_reseeded", version=version)
                    self.version = version
                    return
            if version != self.version and tables is not None:
                self._apply(version, tables)

    def _apply(self, version: int, tables: Tables) -> None:
        """Serve the shared ``tables`` at ``version`` (the lock is held)."""
        if version == self._failed_version:
            return
        base = {k: v for k, v in self._base.items() if k not in COLLECTIONS}
        base.update(copy.deepcopy(tables))
        try:
            config = self._build(base, None)
        except Invalid as exc:
            self._failed_version = version
            self._log.error(
                "cluster_config_rejected",
                version=version,
                running_version=self.version,
                errors=exc.problems,
                detail="the shared configuration does not fit this unit's file;"
                " it keeps serving its last configuration",
            )
            return
        self._base = base
        self._overrides = empty_overrides()
        self.version = version
        self.gateway.update_config(config)
        self._log.info(
            "cluster_config_applied", version=version, apis=[api.name for api in config.apis]
        )

    def _tables(self) -> Tables:
        return shared_tables(self._document(self._base, self._overrides))

    # -- changing ------------------------------------------------------------------
    async def create(
        self, collection: str, body: object, *, expect: int | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Like Manager.create, stored in Redis first (409 StaleVersion, 503 Unavailable)."""
        return await self._attempt(
            expect, lambda: super(ClusterManager, self).create(collection, body, expect=expect)
        )

    async def put(
        self, collection: str, key: str, body: object, *, expect: int | None = None
    ) -> tuple[bool, dict[str, Any]]:
        """Like Manager.put, stored in Redis first."""
        return await self._attempt(
            expect, lambda: super(ClusterManager, self).put(collection, key, body, expect=expect)
        )

    async def patch(
        self, collection: str, key: str, body: object, *, expect: int | None = None
    ) -> dict[str, Any]:
        """Like Manager.patch, stored in Redis first."""
        return await self._attempt(
            expect, lambda: super(ClusterManager, self).patch(collection, key, body, expect=expect)
        )

    async def delete(self, collection: str, key: str, *, expect: int | None = None) -> None:
        """Like Manager.delete, stored in Redis first."""
        await self._attempt(
            expect, lambda: super(ClusterManager, self).delete(collection, key, expect=expect)
        )

    async def _attempt(self, expect: int | None, change: Callable[[], Awaitable[T]]) -> T:
        """Run ``change`` on the current shared document, again if another unit's won.

        With ``expect`` (If-Match) a lost race is the caller's 409, not a retry.
        """
        try:
            if expect is not None and expect != self.version:
                await self.sync()  # this unit may lag behind the version the client saw
            for _ in range(ATTEMPTS):
                try:
                    return await change()
                except _Lost:
                    if expect is not None:
                        raise StaleVersion(self.version, expect) from None
        except ClusterUnavailable as exc:
            raise _unavailable(exc) from None
        raise Unavailable(
            [problem(None, f"the change lost {ATTEMPTS} races with other units' changes; retry")]
        )

    async def _commit(self, overrides: Overrides, config: Config, change: str) -> None:
        """Compare-and-set the new document in Redis, then serve it (the lock is held)."""
        document = self._document(self._base, overrides)
        tables = shared_tables(document)
        try:
            stored, version, current = await self.shared.cas(self.version, tables)
        except ClusterUnavailable as exc:
            raise _unavailable(exc) from None
        if not stored:
            if current is not None:
                self._apply(version, current)
            elif version == 0:  # Redis restarted empty: this unit's document seeds it again
                await self.shared.seed(max(self.version, 1), self._tables())
            raise _Lost
        self._base = {k: v for k, v in self._base.items() if k not in COLLECTIONS} | tables
        self._overrides = empty_overrides()
        self.version = version
        self.gateway.update_config(config)
        self._log.info("config_changed", change=change, version=version)

    async def reload(self) -> list[str]:
        """Re-read the file's other tables; the shared collections and version stay."""
        version = self.version
        try:
            return await super().reload()
        finally:
            self.version = version

    async def _read_base(self, source: Path) -> dict[str, Any]:
        """The file's tables, with the shared collections: a reload keeps them."""
        base = await super()._read_base(source)
        base.update(shared_tables(self._base))
        return base

"""A thin Redis client for the shared counters: bounded calls, one error boundary.

Scripts (every counter, lease, config and unit operation) go through a pool
of lean connections (:mod:`.resp`: RESP on Trio streams, replies parsed by
hiredis), one call per connection at a time, on the caller's own task.
Pub/sub goes through coredis, which runs on anyio and so on Trio itself (no
thread pool, no asyncio bridge). What this adds:

* every call is bounded by ``[cluster] timeout`` (a cancel scope here, at the
  call site); coredis' own retries are off, because a script that ran but
  whose answer was lost must not be counted twice;
* every failure (a refused or broken connection, a timeout, an error reply)
  becomes :class:`~wsgate.errors.ClusterUnavailable` here and nowhere else;
* an outage is logged once when it starts (``cluster_redis_unavailable``) and
  once when it ends (``cluster_redis_recovered``), and each failed call
  counts in :attr:`RedisClient.errors` (``wsgate_cluster_redis_errors_total``);
* while Redis is known to be down, one call per :data:`PROBE_INTERVAL` tries
  it and the others fail at once, so a handshake with several counting
  policies is still answered within one ``timeout``;
* a call that fails or is cancelled closes its connection (its reply may still
  come); the next call opens a new one, so reconnecting needs nothing more, and
  the first call that gets through ends the outage;
* a script is sent by its SHA, and by its source once when Redis does not
  know it (``NOSCRIPT``: first use, or Redis restarted).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import structlog
import trio

from ..errors import ClusterUnavailable
from .resp import RedisReplyError, RespConnection
from .settings import ClusterConfig

__all__ = ["PROBE_INTERVAL", "RedisClient", "missing_extra"]

#: Seconds between calls let through to a Redis known to be down.
PROBE_INTERVAL = 0.5
#: Idle script connections kept open (more are opened while calls overlap).
POOL_SIZE = 16


def missing_extra() -> str | None:
    """Why the Redis client cannot be imported (the ``cluster`` extra), or None."""
    try:
        import coredis  # noqa: F401
        import hiredis  # noqa: F401
    except ImportError as exc:
        return f"[cluster] needs the Redis client: pip install 'wsgate[cluster]' ({exc})"
    return None


class RedisClient:
    """One connection pool to the ``[cluster]`` Redis; start it with ``nursery.start(c.run)``."""

    def __init__(self, config: ClusterConfig, *, log: Any = None) -> None:
        self.config = config
        #: Calls that failed (timeouts, connection errors, error replies).
        self.errors = 0
        self._log = log if log is not None else structlog.get_logger("wsgate.cluster")
        self._client: Any = None
        self._shas: dict[str, str] = {}
        self._idle: list[RespConnection] = []
        self._down_since: float | None = None  # trio time the current outage began
        self._failed_calls = 0  # during the current outage
        self._last_probe = float("-inf")

    @property
    def available(self) -> bool:
        """False from a failed call until one succeeds."""
        return self._down_since is None

    async def run(
        self, *, task_status: trio.TaskStatus[RedisClient] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the connection pool open until cancelled (connections are made on demand)."""
        import coredis
        from coredis.retry import NoRetryPolicy

        client = coredis.Redis.from_url(
            self.config.redis_url,
            decode_responses=True,
            retry_policy=NoRetryPolicy(),
            connect_timeout=self.config.timeout,
            client_name="wsgate",
        )
        async with client:
            self._client = client
            try:
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self._client = None
                idle, self._idle = self._idle, []
                for conn in idle:
                    await conn.aclose()

    async def script(self, source: str, keys: Sequence[str], args: Sequence[object]) -> Any:
        """Run the Lua script ``source`` (by its SHA, loaded on first use or after a restart).

        Raises ClusterUnavailable when Redis does not answer within ``timeout``.
        """
        client = self._client
        if client is None:
            raise ClusterUnavailable("the Redis client is not running")
        now = trio.current_time()
        if self._down_since is not None:
            if now - self._last_probe < PROBE_INTERVAL:
                raise ClusterUnavailable("Redis is unavailable")
            self._last_probe = now
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        try:
            with trio.fail_after(self.config.timeout):
                result = await self._call(source, sha, keys, args)
        except trio.TooSlowError:
            self._failed(f"no answer within {self.config.timeout:g} s")
            raise ClusterUnavailable("Redis did not answer in time") from None
        except Exception as exc:
            # The one boundary: error replies, OSError, Trio and TLS stream errors.
            self._failed(f"{type(exc).__name__}: {exc}")
            raise ClusterUnavailable(f"Redis failed: {type(exc).__name__}") from exc
        if self._down_since is not None:
            self._log.info(
                "cluster_redis_recovered",
                redis=self.config.display_url,
                outage_seconds=round(trio.current_time() - self._down_since, 3),
                failed_calls=self._failed_calls,
            )
            self._down_since = None
        return result

    async def _call(
        self, source: str, sha: str, keys: Sequence[str], args: Sequence[object]
    ) -> Any:
        """EVALSHA (EVAL once if Redis does not know the script) on a pooled connection."""
        conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = await RespConnection.open(self.config.redis_url)
            try:
                result = await conn.call("EVALSHA", sha, len(keys), *keys, *args)
            except RedisReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                result = await conn.call("EVAL", source, len(keys), *keys, *args)
        except BaseException:
            if conn is not None:
                await conn.aclose()  # a reply may still be on its way: never reuse it
            raise
        if self._client is not None and len(self._idle) < POOL_SIZE:
            self._idle.append(conn)
        else:  # a full pool, or the client stopped while this call ran: nobody would close it
            await conn.aclose()
        return result

    def pubsub(self, channels: Sequence[str]) -> Any:
        """A coredis PubSub subscribed to ``channels`` (``async with`` it, iterate messages).

        It holds a connection of its own and does not retry: the caller
        (:mod:`.member`) reconnects, and catches up by polling meanwhile.
        Raises ClusterUnavailable if the client is not running.
        """
        from coredis.retry import NoRetryPolicy

        if self._client is None:
            raise ClusterUnavailable("the Redis client is not running")
        return self._client.pubsub(
            channels=list(channels),
            ignore_subscribe_messages=True,
            retry_policy=NoRetryPolicy(),
            subscription_timeout=self.config.timeout,
        )

    def _failed(self, error: str) -> None:
        self.errors += 1
        self._failed_calls += 1
        if self._down_since is None:
            self._down_since = self._last_probe = trio.current_time()
            self._failed_calls = 1
            self._log.warning(
                "cluster_redis_unavailable", redis=self.config.display_url, error=error
            )

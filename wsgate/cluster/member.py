"""A unit's membership of its cluster: shared config, registration, remote commands.

With ``[cluster]``, :func:`serve_member` runs next to the gateway (the CLI
starts it before the admin listener and the gateway; ``serve_admin`` starts
one itself if none runs). It holds a Redis client of its own and:

* reads the shared configuration (:mod:`.configdoc`) before the gateway
  accepts, seeding it from the file if Redis holds none;
* listens on pub/sub for new versions and for commands to this unit (close a
  pair), reconnecting by itself; polls the version every
  :data:`~.configdoc.POLL_INTERVAL` seconds to catch up on what it missed;
* publishes this unit and its open pairs (:mod:`.units`): changes to the set
  of pairs within :data:`PAIR_SYNC` seconds, everything (with the pairs'
  counters) every ``lease_ttl / 3`` seconds, which also renews the TTL.

Redis gone: nothing here blocks the data plane. The gateway serves its last
configuration; the tasks retry quietly (the client logs the outage once).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..admin.manager import register_manager
from ..admin.serialize import connection_json
from ..errors import ClusterUnavailable
from ..logs import utc_now
from .configdoc import POLL_INTERVAL, ClusterManager, SharedConfig
from .redis import RedisClient
from .units import UnitRegistry

if TYPE_CHECKING:
    from ..gateway import Gateway

__all__ = ["PAIR_SYNC", "Member", "member_for", "serve_member"]

#: Seconds between checks of this unit's set of open pairs (published when it changed).
PAIR_SYNC = 0.25

#: Seconds before a broken pub/sub subscription is opened again.
RESUBSCRIBE = 0.5

_members: weakref.WeakKeyDictionary[Gateway, Member] = weakref.WeakKeyDictionary()


def member_for(gateway: Gateway) -> Member | None:
    """The running :class:`Member` of ``gateway``, if any."""
    return _members.get(gateway)


class Member:
    """One unit of a ``[cluster]``; run it with ``nursery.start(member.run)``."""

    def __init__(self, gateway: Gateway, *, admin_address: str | None = None) -> None:
        cluster = gateway.config.cluster
        if cluster is None:
            raise ValueError("a cluster member needs a [cluster] table")
        self.gateway = gateway
        self.client = RedisClient(cluster)
        #: This unit's id: unique per process start.
        self.unit_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started = utc_now()
        self.admin_address = admin_address
        self.shared = SharedConfig(self.client)
        self.manager = ClusterManager(gateway, self.shared)
        self.registry = UnitRegistry(self.client, self.unit_id)
        #: Live units in the cluster at the last full publish (None: not known yet).
        self.live_units: int | None = None
        self._published: set[str] = set()
        self._published_state: tuple[int, tuple[tuple[str, int], ...]] | None = None
        self._log = structlog.get_logger("wsgate.cluster").bind(unit_id=self.unit_id)

    # -- running -------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Member] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the shared config, then follow it and publish this unit, until cancelled."""
        # The client outlives the tasks using it: a subscription torn down together
        # with its connection would leave the socket open (coredis cannot unsubscribe).
        client_scope = trio.CancelScope(shield=True)
        async with trio.open_nursery() as outer:
            await outer.start(self._run_client, client_scope)
            try:
                async with trio.open_nursery() as nursery:
                    await self.manager.start()
                    register_manager(self.gateway, self.manager)
                    _members[self.gateway] = self
                    nursery.start_soon(self._subscriber)
                    nursery.start_soon(self._poller)
                    nursery.start_soon(self._keeper)
                    self._log.info(
                        "cluster_member_started",
                        redis=self.client.config.display_url,
                        config_version=self.manager.version,
                    )
                    task_status.started(self)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(self.client.config.timeout):
                    try:
                        await self.registry.leave()
                    except ClusterUnavailable:
                        pass  # its entries expire within lease_ttl
                client_scope.cancel()

    async def _run_client(
        self, scope: trio.CancelScope, *, task_status: trio.TaskStatus[Any]
    ) -> None:
        with scope:
            await self.client.run(task_status=task_status)

    async def _subscriber(self) -> None:
        """Apply announced versions, run commands sent to this unit; resubscribe on errors."""
        channels = [self.shared.channel, self.registry.commands]
        while True:
            try:
                async with self.client.pubsub(channels) as pubsub:
                    # A version announced while (re)subscribing would be missed.
                    await self._sync()
                    async for message in pubsub:
                        await self._message(message)
            except* Exception as group:
                # Redis gone, or coredis failing to unsubscribe from a connection
                # closed under it at shutdown (the Cancelled parts still propagate).
                self._log.debug("cluster_subscription_lost", error=repr(group.exceptions[0]))
            await trio.sleep(RESUBSCRIBE)

    async def _message(self, message: Any) -> None:
        channel, data = message.get("channel"), message.get("data")
        if channel == self.shared.channel:
            try:
                await self._sync(int(data))
            except ValueError:
                pass
        elif channel == self.registry.commands:
            try:
                command = json.loads(data)
            except (TypeError, ValueError):
                return
            if isinstance(command, dict) and command.get("op") == "terminate":
                correlation_id, reason = command.get("id"), command.get("reason")
                if isinstance(correlation_id, str) and isinstance(reason, str):
                    closed = self.gateway.terminate(correlation_id, reason)
                    self._log.info(
                        "cluster_terminate",
                        correlation_id=correlation_id,
                        closed=closed,
                        by_unit=command.get("from"),
                    )

    async def _sync(self, known: int | None = None) -> None:
        try:
            await self.manager.sync(known)
        except ClusterUnavailable:
            pass  # the poller tries again

    async def _poller(self) -> None:
        while True:
            await trio.sleep(POLL_INTERVAL)
            try:
                version = await self.shared.version()
            except ClusterUnavailable:
                continue
            if version == 0 or version != self.manager.version:
                # 0: Redis holds no document (restarted empty, or never seeded because
                # this unit started while it was down): sync() seeds it.
                await self._sync(version or None)

    async def _keeper(self) -> None:
        """Publish this unit: a changed set of pairs soon, everything every lease_ttl / 3."""
        interval = self.client.config.lease_ttl / 3
        next_full = trio.current_time()
        while True:
            now = trio.current_time()
            try:
                if now >= next_full:
                    await self._publish(replace=True)
                    next_full = now + interval
                    self.live_units = len(await self.registry.units())
                elif (
                    self._published != set(self.gateway.pairs)
                    or self._published_state != self._state()
                ):
                    await self._publish(replace=False)
            except ClusterUnavailable:
                next_full = min(next_full, now + 1.0)
            await trio.sleep(PAIR_SYNC)

    async def _publish(self, *, replace: bool) -> None:
        pairs = dict(self.gateway.pairs)
        now, trio_now = time.time(), trio.current_time()
        current = set(pairs)
        added = current if replace else current - self._published
        removed = [] if replace else sorted(self._published - current)
        state = self._state()
        await self.registry.publish(
            self.info(len(pairs)),
            {cid: self.pair_json(pairs[cid], now, trio_now) for cid in added},
            removed,
            replace=replace,
        )
        self._published = current
        self._published_state = state

    def _state(self) -> tuple[int, tuple[tuple[str, int], ...]]:
        return self.manager.version, tuple(self.gateway.addresses)

    # -- what the admin API asks ---------------------------------------------------
    def info(self, open_pairs: int | None = None) -> dict[str, Any]:
        """This unit as ``GET /units`` lists it."""
        return {
            "id": self.unit_id,
            "addresses": [f"{host}:{port}" for host, port in self.gateway.addresses],
            "admin_address": self.admin_address,
            "pid": os.getpid(),
            "started": self.started,
            "config_version": self.manager.version,
            "open_pairs": len(self.gateway.pairs) if open_pairs is None else open_pairs,
        }

    def pair_json(self, pair: Any, now: float, trio_now: float) -> dict[str, Any]:
        """One of this unit's pairs as ``GET /connections`` lists it (with ``unit_id``)."""
        return {**connection_json(pair, now, trio_now), "unit_id": self.unit_id}

    async def units(self) -> list[dict[str, Any]]:
        """Every live unit (this one as it is now). Raises ClusterUnavailable."""
        listed = [info for info, _ in await self.registry.units() if info["id"] != self.unit_id]
        return sorted([self.info(), *listed], key=lambda u: (u["started"], u["id"]))

    def local_pairs(self) -> list[dict[str, Any]]:
        """This unit's open pairs, as they are now."""
        now, trio_now = time.time(), trio.current_time()
        return [self.pair_json(p, now, trio_now) for p in list(self.gateway.pairs.values())]

    async def remote_pairs(self) -> list[dict[str, Any]]:
        """The other live units' pairs, as last published. Raises ClusterUnavailable."""
        return [
            pair
            for info, held in await self.registry.units(with_pairs=True)
            if info["id"] != self.unit_id
            for pair in held
        ]

    async def find(self, correlation_id: str) -> dict[str, Any] | None:
        """Another unit's pair ``correlation_id``, or None. Raises ClusterUnavailable."""
        owner, pair, _ = await self.registry.find(correlation_id)
        return pair if owner != self.unit_id else None

    async def terminate_remote(self, correlation_id: str, reason: str) -> str | None:
        """Ask the unit holding ``correlation_id`` to close it with 1008; its id, or None.

        Raises ClusterUnavailable, also when the owning unit is listed but not
        subscribed to its commands (reconnecting to Redis): retry shortly.
        """
        command = {"op": "terminate", "id": correlation_id, "reason": reason, "from": self.unit_id}
        owner, _, receivers = await self.registry.find(correlation_id, command)
        if owner is None or owner == self.unit_id:
            return None
        if receivers == 0:
            raise ClusterUnavailable(f"unit {owner} holds the pair but is not listening")
        return owner


async def serve_member(
    gateway: Gateway,
    admin_address: str | None = None,
    *,
    task_status: trio.TaskStatus[Member] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``gateway``'s cluster membership until cancelled (see the module docstring)."""
    member = Member(gateway, admin_address=admin_address)
    await member.run(task_status=task_status)

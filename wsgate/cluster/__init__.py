"""Limits shared by every unit (``--workers`` process, machine) through one Redis server.

Without a ``[cluster]`` table nothing here runs: counters live in memory, in
one process (see :class:`~wsgate.cluster.store.MemoryStore`). With one, the
counting policies count through :class:`~wsgate.cluster.store.RedisStore`.

Importing this package imports only :mod:`.settings` (which
:mod:`wsgate.config` needs to read the table); the Redis client
(:mod:`.redis`, needing the ``cluster`` extra: coredis) is imported when a
gateway with a ``[cluster]`` table starts. docs/cluster.md describes it all.
"""

from __future__ import annotations

from .settings import ClusterConfig

__all__ = ["ClusterConfig"]

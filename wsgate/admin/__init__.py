"""The admin listener: management API, Prometheus metrics, health and readiness.

Run it next to a gateway (docs/management-api.md)::

    metrics = GatewayMetrics()
    gateway = Gateway(config, observers=[metrics])
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_admin, gateway, AdminConfig(...), metrics)
        await nursery.start(gateway.run)

Importing this package is cheap: the HTTP stack (hypercorn, Starlette) is only
imported when :func:`serve_admin` or :func:`build_app` is first used, so
:mod:`wsgate.config` can read the ``[admin]`` table without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .settings import AdminConfig

if TYPE_CHECKING:
    from .app import build_app
    from .manager import Manager, manager_for
    from .server import reload_on_sighup, serve_admin

__all__ = [
    "AdminConfig",
    "Manager",
    "build_app",
    "manager_for",
    "reload_on_sighup",
    "serve_admin",
]

_LAZY = {
    "build_app": "app",
    "Manager": "manager",
    "manager_for": "manager",
    "reload_on_sighup": "server",
    "serve_admin": "server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

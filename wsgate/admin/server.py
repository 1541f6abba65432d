"""Run the admin listener (hypercorn's Trio worker) and the SIGHUP reloader."""

from __future__ import annotations

import logging
import signal
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import hypercorn.config
import hypercorn.trio
import structlog
import trio

from .app import build_app
from .manager import Invalid, Manager, manager_for
from .settings import AdminConfig

if TYPE_CHECKING:
    from wsgate.gateway import Gateway
    from wsgate.metrics import GatewayMetrics

__all__ = ["reload_on_sighup", "serve_admin"]

#: hypercorn logs here (warnings and errors only unless the application configures it).
HTTP_LOGGER = "wsgate.admin.http"


async def serve_admin(
    gateway: Gateway,
    admin: AdminConfig,
    metrics: GatewayMetrics | None = None,
    *,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API for ``gateway`` on ``admin.listen`` until cancelled.

    With ``reuse_port`` (``--workers N``, [cluster]) the port is bound with
    SO_REUSEPORT, so every worker serves it and the kernel spreads requests.

    Start it with ``await nursery.start(serve_admin, gateway, admin, metrics)``: it
    reports the bound ``(host, port)`` (so port 0 works). Before binding it
    applies ``admin.state_file`` to the gateway's configuration (ConfigError if
    that file does not fit the config). ``metrics``, if given, is served at
    ``/metrics`` and attached to ``gateway``.
    """
    log = structlog.get_logger("wsgate.admin")
    if gateway.config.cluster is None:
        # Outside any nursery: a state file that does not fit is a plain ConfigError.
        manager = manager_for(gateway, admin.state_file)
        await _serve(gateway, admin, metrics, manager, reuse_port, task_status)
        return
    from wsgate.cluster.member import member_for, serve_member

    if admin.state_file is not None:
        log.warning(
            "state_file_unused",
            state_file=str(admin.state_file),
            detail="with [cluster], management changes are kept in Redis",
        )
    async with trio.open_nursery() as nursery:
        if member_for(gateway) is None:  # embedded: the CLI starts it before us
            await nursery.start(serve_member, gateway, str(admin.listen))
        await _serve(gateway, admin, metrics, manager_for(gateway), reuse_port, task_status)


async def _serve(
    gateway: Gateway,
    admin: AdminConfig,
    metrics: GatewayMetrics | None,
    manager: Manager,
    reuse_port: bool,
    task_status: trio.TaskStatus[tuple[str, int]],
) -> None:
    log = structlog.get_logger("wsgate.admin")
    if metrics is not None and metrics.gateway is None:
        metrics.attach(gateway)
    app = build_app(gateway, manager, token=admin.token, metrics=metrics)
    config = hypercorn.config.Config()
    config.bind = [_shared_bind(admin) if reuse_port else str(admin.listen)]
    config.accesslog = None
    config.errorlog = logging.getLogger(HTTP_LOGGER)
    config.include_server_header = False
    config.graceful_timeout = 1.0
    if admin.tls is not None:
        config.certfile = str(admin.tls.certificate)
        config.keyfile = str(admin.tls.private_key)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(hypercorn.trio.serve, app, config)
        host, port = _address(binds[0])
        if gateway.config.cluster is not None:
            from wsgate.cluster.member import member_for

            member = member_for(gateway)
            if member is not None:
                member.admin_address = f"{host}:{port}"
        log.info(
            "admin_started",
            url=binds[0],
            management_api=admin.token is not None,
            state_file=None if admin.state_file is None else str(admin.state_file),
        )
        task_status.started((host, port))


def _shared_bind(admin: AdminConfig) -> str:
    """``fd://N`` of a socket bound to ``admin.listen`` with SO_REUSEPORT (hypercorn owns it)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        admin.listen.host, admin.listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return f"fd://{sock.detach()}"


def _address(bind: str) -> tuple[str, int]:
    """``("127.0.0.1", 8081)`` from hypercorn's ``"http://127.0.0.1:8081"``."""
    parts = urlsplit(bind)
    if parts.hostname is None or parts.port is None:
        raise RuntimeError(f"unexpected bind address from hypercorn: {bind!r}")
    return parts.hostname, parts.port


async def reload_on_sighup(
    gateway: Gateway,
    admin: AdminConfig | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Re-read the config file on every SIGHUP, like ``POST /reload``, until cancelled.

    Shares the admin API's changes (``admin.state_file``), so they are laid over
    the file again. An invalid file leaves the running configuration as it is;
    the problems are logged (``config_reload_failed``).
    """
    log = structlog.get_logger("wsgate.admin")
    clustered = gateway.config.cluster is not None  # its changes live in Redis, not the file
    manager = manager_for(gateway, None if admin is None or clustered else admin.state_file)
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            log.info("signal_received", signal="SIGHUP")
            try:
                await manager.reload()
            except Invalid:
                pass  # logged by reload(), with every problem

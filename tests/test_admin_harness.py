"""Shared setup of the admin tests (no tests here): a gateway, its admin listener, a client."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

import wsgate
from wsgate.admin import AdminConfig, serve_admin
from wsgate.config import Listen
from wsgate.metrics import GatewayMetrics

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@attrs.define
class Admin:
    """A running gateway with its admin listener."""

    gateway: wsgate.Gateway
    metrics: GatewayMetrics
    url: str  # http://127.0.0.1:PORT

    def client(self, token: str | None = TOKEN) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10)

    @property
    def port(self) -> int:
        """The gateway's (WebSocket) port."""
        return self.gateway.addresses[0][1]


async def start_admin(
    nursery: trio.Nursery,
    config: wsgate.Config,
    *,
    token: str | None = TOKEN,
    state_file: Path | None = None,
) -> Admin:
    """Start a gateway serving ``config`` and its admin listener on 127.0.0.1:0."""
    metrics = GatewayMetrics()
    gateway = wsgate.Gateway(config, observers=[metrics])
    settings = AdminConfig(
        listen=Listen(host="127.0.0.1", port=0), token=token, state_file=state_file
    )
    host, port = await nursery.start(serve_admin, gateway, settings, metrics)
    await nursery.start(gateway.run)
    return Admin(gateway, metrics, f"http://{host}:{port}")


def write_config(path: Path, backend_url: str, *apis: str, extra: str = "") -> Path:
    """A config file with one [[apis]] table per name (path = name) on ``backend_url``."""
    tables = "".join(
        f'\n[[apis]]\nname = "{name}"\npath = "{name}"\nservice_url = "{backend_url}"\n'
        for name in apis
    )
    path.write_text(
        textwrap.dedent(
            """\
            [gateway]
            listen = "127.0.0.1:0"
            """
        )
        + tables
        + extra
    )
    return path


def api_body(backend_url: str, path: str, **fields: Any) -> dict[str, Any]:
    return {"path": path, "service_url": backend_url, **fields}

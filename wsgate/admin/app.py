"""The admin HTTP API: a Starlette application over a gateway and its :class:`Manager`.

``/health``, ``/ready``, ``/metrics``, ``/openapi.json`` and the web console's
page (``/console/``, docs/console.md) are open; every other endpoint needs
``Authorization: Bearer <token>`` (compared in constant time), else 401; without
a configured token they answer 403. Errors are JSON:
``{"errors": [{"field": ..., "message": ...}]}``. docs/management-api.md shows
every endpoint with curl.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from wsgate.closing import TERMINATE_CODE
from wsgate.logs import utc_iso

from .console_routes import web_routes
from .manager import KEYS, Invalid, ManagementError, Manager, NotFound, problem
from .openapi import openapi_document
from .settings import TOKEN_ENV

if TYPE_CHECKING:
    from wsgate.gateway import Gateway
    from wsgate.metrics import GatewayMetrics
    from wsgate.relay import Pair

__all__ = ["DEFAULT_TERMINATE_REASON", "MAX_BODY", "build_app"]

#: Largest request body accepted (bytes).
MAX_BODY = 1024 * 1024

#: Close reason sent with 1008 when DELETE /connections/{id} gives none.
DEFAULT_TERMINATE_REASON = "terminated by operator"

NO_TOKEN = (
    "the management API is disabled because no admin token is configured: set `token` in"
    f" the [admin] table of the config file or the {TOKEN_ENV} environment variable"
    " (at least 16 characters), then restart"
)

Endpoint = Callable[[Request], Awaitable[Response]]


class _TooLarge(ManagementError):
    status = 413


def _errors(status: int, problems: list[dict[str, Any]], **headers: str) -> JSONResponse:
    return JSONResponse({"errors": problems}, status_code=status, headers=headers or None)


def connection_json(pair: Pair, now: float, trio_now: float) -> dict[str, Any]:
    """One open pair as ``GET /connections`` lists it."""
    return {
        "id": pair.correlation_id,
        "api": pair.api,
        "caller_ip": pair.caller_ip,
        "connected_since": utc_iso(pair.connected_at),
        "last_activity": utc_iso(now - max(0.0, trio_now - pair.last_activity)),
        "messages_from_client": pair.messages_from_client,
        "messages_from_backend": pair.messages_from_backend,
        "bytes_from_client": pair.bytes_from_client,
        "bytes_from_backend": pair.bytes_from_backend,
    }


async def _json_body(request: Request, *, required: bool = True) -> Any:
    too_large = _TooLarge([problem(None, f"the request body is over {MAX_BODY} bytes")])
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise too_large
    data = bytearray()
    async with contextlib.aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            data += chunk
            if len(data) > MAX_BODY:
                raise too_large
    if not data.strip():
        if required:
            raise Invalid([problem(None, "the request body must be a JSON object")])
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Invalid([problem(None, f"the request body is not valid JSON: {exc}")]) from None


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise Invalid([problem(name, f"expected true or false, got {value!r}")])


class _Admin:
    """The endpoints, bound to one gateway."""

    def __init__(
        self,
        gateway: Gateway,
        manager: Manager,
        token: str | None,
        metrics: GatewayMetrics | None,
    ) -> None:
        self.gateway = gateway
        self.manager = manager
        self.token = token.encode() if token else None
        self.metrics = metrics

    # -- auth ----------------------------------------------------------------------
    def protected(self, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` behind the bearer token, with ManagementError turned into JSON."""

        async def guarded(request: Request) -> Response:
            if self.token is None:
                return _errors(403, [problem(None, NO_TOKEN)])
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                return _errors(
                    401,
                    [problem(None, "missing bearer token: send 'Authorization: Bearer <token>'")],
                    **{"WWW-Authenticate": 'Bearer realm="wsgate-admin"'},
                )
            if not hmac.compare_digest(given.strip().encode(), self.token):
                return _errors(
                    401,
                    [problem(None, "invalid token")],
                    **{"WWW-Authenticate": 'Bearer realm="wsgate-admin", error="invalid_token"'},
                )
            try:
                return await endpoint(request)
            except _TooLarge as exc:  # the rest of the body is not read: end the connection
                return _errors(exc.status, exc.problems, Connection="close")
            except ManagementError as exc:
                return _errors(exc.status, exc.problems)

        return guarded

    # -- open endpoints ------------------------------------------------------------
    async def health(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, _request: Request) -> Response:
        stats = self.gateway.stats()
        if stats.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.gateway.addresses:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse(
            {"status": "ready", "active_pairs": stats.active_pairs, "capacity": stats.capacity}
        )

    async def metrics_text(self, _request: Request) -> Response:
        if self.metrics is None:
            return _errors(
                404, [problem(None, "metrics are not enabled for this gateway (embedding API)")]
            )
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, _request: Request) -> Response:
        return JSONResponse(openapi_document())

    # -- APIs, products, subscriptions ---------------------------------------------
    def collection(self, name: str) -> tuple[Endpoint, Endpoint]:
        """The endpoints of ``/{name}`` and ``/{name}/{key}``."""
        manager = self.manager

        async def items(request: Request) -> Response:
            if request.method == "POST":
                key, table = await manager.create(name, await _json_body(request))
                return JSONResponse(table, status_code=201, headers={"Location": f"/{name}/{key}"})
            return JSONResponse({name: manager.list_items(name)})

        async def item(request: Request) -> Response:
            key = request.path_params["key"]
            if request.method == "GET":
                return JSONResponse(manager.get(name, key))
            if request.method == "PUT":
                created, table = await manager.put(name, key, await _json_body(request))
                if created:
                    return JSONResponse(
                        table, status_code=201, headers={"Location": f"/{name}/{key}"}
                    )
                return JSONResponse(table)
            if request.method == "PATCH":
                return JSONResponse(await manager.patch(name, key, await _json_body(request)))
            # DELETE
            terminate = name == "apis" and _flag(request, "terminate")
            await manager.delete(name, key)
            result: dict[str, Any] = {"deleted": key}
            if name == "apis":
                result["terminated"] = self.gateway.terminate_api(key) if terminate else 0
            return JSONResponse(result)

        return self.protected(items), self.protected(item)

    # -- connections ---------------------------------------------------------------
    async def connections(self, request: Request) -> Response:
        api = request.query_params.get("api")
        now, trio_now = time.time(), trio.current_time()
        pairs = [
            connection_json(pair, now, trio_now)
            for pair in list(self.gateway.pairs.values())
            if api is None or pair.api == api
        ]
        pairs.sort(key=lambda c: (c["connected_since"], c["id"]))
        return JSONResponse({"connections": pairs})

    async def connection(self, request: Request) -> Response:
        correlation_id = request.path_params["id"]
        pair = self.gateway.pairs.get(correlation_id)
        if request.method == "GET":
            if pair is None:
                raise NotFound([problem(None, f"no open connection {correlation_id!r}")])
            return JSONResponse(connection_json(pair, time.time(), trio.current_time()))
        body = await _json_body(request, required=False)
        reason = DEFAULT_TERMINATE_REASON
        if body is not None:
            if not isinstance(body, dict) or not isinstance(body.get("reason", ""), str):
                raise Invalid([problem("reason", "expected an object with a string 'reason'")])
            reason = body.get("reason") or reason
        if not self.gateway.terminate(correlation_id, reason):
            raise NotFound([problem(None, f"no open connection {correlation_id!r}")])
        return JSONResponse(
            {"terminated": correlation_id, "code": TERMINATE_CODE, "reason": reason}
        )

    # -- reload --------------------------------------------------------------------
    async def reload(self, _request: Request) -> Response:
        warnings = await self.manager.reload()
        config = self.gateway.config
        return JSONResponse(
            {
                "status": "reloaded",
                "apis": [api.name for api in config.apis],
                "warnings": warnings,
            }
        )


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _errors(exc.status_code, [problem(None, exc.detail)], **(exc.headers or {}))


def build_app(
    gateway: Gateway,
    manager: Manager,
    *,
    token: str | None,
    metrics: GatewayMetrics | None = None,
) -> Starlette:
    """The admin ASGI application for ``gateway`` (see the module docstring)."""
    admin = _Admin(gateway, manager, token, metrics)
    routes = [
        Route("/health", admin.health, methods=["GET"]),
        Route("/ready", admin.ready, methods=["GET"]),
        Route("/metrics", admin.metrics_text, methods=["GET"]),
        Route("/openapi.json", admin.openapi, methods=["GET"]),
        Route("/connections", admin.protected(admin.connections), methods=["GET"]),
        Route(
            "/connections/{id}",
            admin.protected(admin.connection),
            methods=["GET", "DELETE"],
        ),
        Route("/reload", admin.protected(admin.reload), methods=["POST"]),
    ]
    for name in KEYS:
        items, item = admin.collection(name)
        routes.append(Route(f"/{name}", items, methods=["GET", "POST"]))
        routes.append(Route(f"/{name}/{{key}}", item, methods=["GET", "PUT", "PATCH", "DELETE"]))
    # The web console: its page is open, its two endpoints take the bearer token.
    console = web_routes(gateway, admin.protected)
    return Starlette(routes=[*routes, *console], exception_handlers={HTTPException: _http_error})

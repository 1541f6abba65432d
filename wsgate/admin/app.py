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
from wsgate.errors import ClusterUnavailable

from .console_routes import web_routes
from .manager import (
    KEYS,
    Invalid,
    ManagementError,
    Manager,
    NotFound,
    StaleVersion,
    Unavailable,
    problem,
)
from .openapi import openapi_document
from .serialize import connection_json
from .settings import TOKEN_ENV

if TYPE_CHECKING:
    from wsgate.gateway import Gateway
    from wsgate.metrics import GatewayMetrics

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


def _if_match(request: Request) -> int | None:
    """The version an ``If-Match`` header names (``"7"``, ``W/"7"`` or ``7``); None without one."""
    value = request.headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise Invalid(
            [problem("If-Match", f'expected a configuration version such as "7", got {value!r}')]
        )
    return int(text)


def _member(gateway: Gateway) -> Any:
    """The gateway's cluster member ([cluster]), or None."""
    if gateway.config.cluster is None:
        return None
    from wsgate.cluster.member import member_for

    return member_for(gateway)


def _redis_down(exc: Exception, what: str) -> Unavailable:
    return Unavailable(
        [problem(None, f"{what}: the cluster's Redis is unavailable ({exc}); retry later")]
    )


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
            except StaleVersion as exc:
                return JSONResponse(
                    {"errors": exc.problems, "version": exc.version},
                    status_code=exc.status,
                    headers={"ETag": f'"{exc.version}"'},
                )
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

        def tagged(response: Response) -> Response:
            response.headers["ETag"] = f'"{manager.version}"'
            return response

        async def items(request: Request) -> Response:
            if request.method == "POST":
                expect = _if_match(request)
                body = await _json_body(request)
                key, table = await manager.create(name, body, expect=expect)
                return tagged(
                    JSONResponse(table, status_code=201, headers={"Location": f"/{name}/{key}"})
                )
            return tagged(JSONResponse({name: manager.list_items(name)}))

        async def item(request: Request) -> Response:
            key = request.path_params["key"]
            if request.method == "GET":
                return tagged(JSONResponse(manager.get(name, key)))
            expect = _if_match(request)
            if request.method == "PUT":
                body = await _json_body(request)
                created, table = await manager.put(name, key, body, expect=expect)
                if created:
                    return tagged(
                        JSONResponse(table, status_code=201, headers={"Location": f"/{name}/{key}"})
                    )
                return tagged(JSONResponse(table))
            if request.method == "PATCH":
                body = await _json_body(request)
                return tagged(JSONResponse(await manager.patch(name, key, body, expect=expect)))
            # DELETE
            terminate = name == "apis" and _flag(request, "terminate")
            await manager.delete(name, key, expect=expect)
            result: dict[str, Any] = {"deleted": key}
            if name == "apis":
                result["terminated"] = self.gateway.terminate_api(key) if terminate else 0
            return tagged(JSONResponse(result))

        return self.protected(items), self.protected(item)

    # -- connections ---------------------------------------------------------------
    async def connections(self, request: Request) -> Response:
        api = request.query_params.get("api")
        member = _member(self.gateway)
        result: dict[str, Any] = {}
        if member is None:
            now, trio_now = time.time(), trio.current_time()
            pairs = [connection_json(pair, now, trio_now) for pair in self.gateway.pairs.values()]
        else:
            pairs = member.local_pairs()
            try:
                pairs += await member.remote_pairs()
            except ClusterUnavailable as exc:
                # Say which part is missing rather than fail or hang.
                result["incomplete"] = (
                    f"only this unit's pairs are listed: the cluster's Redis is unavailable ({exc})"
                )
        pairs = [pair for pair in pairs if api is None or pair["api"] == api]
        pairs.sort(key=lambda c: (c["connected_since"], c["id"]))
        return JSONResponse({"connections": pairs, **result})

    async def connection(self, request: Request) -> Response:
        correlation_id = request.path_params["id"]
        pair = self.gateway.pairs.get(correlation_id)
        member = _member(self.gateway)
        if request.method == "GET":
            if pair is not None:
                found = connection_json(pair, time.time(), trio.current_time())
                if member is not None:
                    found["unit_id"] = member.unit_id
                return JSONResponse(found)
            if member is not None:
                try:
                    remote = await member.find(correlation_id)
                except ClusterUnavailable as exc:
                    raise _redis_down(exc, "cannot look for the pair on the other units") from None
                if remote is not None:
                    return JSONResponse(remote)
            raise NotFound([problem(None, f"no open connection {correlation_id!r}")])
        body = await _json_body(request, required=False)
        reason = DEFAULT_TERMINATE_REASON
        if body is not None:
            if not isinstance(body, dict) or not isinstance(body.get("reason", ""), str):
                raise Invalid([problem("reason", "expected an object with a string 'reason'")])
            reason = body.get("reason") or reason
        result: dict[str, Any] = {
            "terminated": correlation_id,
            "code": TERMINATE_CODE,
            "reason": reason,
        }
        if self.gateway.terminate(correlation_id, reason):
            if member is not None:
                result["unit_id"] = member.unit_id
            return JSONResponse(result)
        if member is not None:
            try:
                owner = await member.terminate_remote(correlation_id, reason)
            except ClusterUnavailable as exc:
                raise _redis_down(exc, "cannot reach the other units") from None
            if owner is not None:
                return JSONResponse({**result, "unit_id": owner})
        raise NotFound([problem(None, f"no open connection {correlation_id!r}")])

    async def units(self, _request: Request) -> Response:
        member = _member(self.gateway)
        if member is None:
            raise NotFound(
                [problem(None, "this gateway has no [cluster] table: it is the only unit")]
            )
        try:
            units = await member.units()
        except ClusterUnavailable as exc:
            raise _redis_down(exc, "cannot list the units") from None
        return JSONResponse({"units": units, "unit_id": member.unit_id})

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
        Route("/units", admin.protected(admin.units), methods=["GET"]),
        Route("/reload", admin.protected(admin.reload), methods=["POST"]),
    ]
    for name in KEYS:
        items, item = admin.collection(name)
        routes.append(Route(f"/{name}", items, methods=["GET", "POST"]))
        routes.append(Route(f"/{name}/{{key}}", item, methods=["GET", "PUT", "PATCH", "DELETE"]))
    # The web console: its page is open, its two endpoints take the bearer token.
    console = web_routes(gateway, admin.protected)
    return Starlette(routes=[*routes, *console], exception_handlers={HTTPException: _http_error})

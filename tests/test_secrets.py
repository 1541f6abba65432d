"""Secrets never leak (issue 6): not in logs, not in metrics, not in error bodies.

One gateway config carries every kind of secret the gateway handles: a
subscription key (from the environment), a JWT signing secret, a backend
Basic-auth password and an admin token. Clients then send secrets every way
they can: the subscription key in its header and in the query, a JWT in
``Authorization``, a ``Cookie``, secret query parameters, through successful
handshakes, refused ones (401, 404, 408, 426, 431, 502, a backend's 403),
malformed requests whose offending line holds a secret, and pairs that end
with protocol errors.

The same scenarios run twice: against an in-process gateway with every
structlog record captured, and against a ``wsgate serve`` child process whose
whole stdout and stderr are kept, with its /metrics and management API read
too. No secret may appear in any of it, nor in any response the gateway wrote.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
import trio
from structlog.testing import capture_logs

import wsgate
from benchmarks.soak import (
    BINARY,
    TEXT,
    Backend,
    Conn,
    GatewayProcess,
    build_frame,
    connect,
    payload_for,
    upgrade_request,
)
from wsgate.config import load_config

from . import helpers
from .helpers import BackendRequest, RawBackend, read_all

SUB_KEY = "subkey-9f8e7d6c5b4a39281706"
WRONG_KEY = "subkey-wrong-0a1b2c3d4e5f6071"
JWT_SECRET = "jwtsecret-" + "q" * 40
OTHER_JWT_SECRET = "otherjwtsecret-" + "w" * 40
COOKIE = "cookie-7a6b5c4d3e2f1a0b9c8d"
QUERY_TOKEN = "qtoken-0123456789abcdef0123"
QUERY_SIG = "qsig-fedcba9876543210fedc"
BASIC_PASSWORD = "basicpass-55aa66bb77cc88dd"
ADMIN_TOKEN = "admintoken-0123456789abcdefghij"
helpers.SUITE_SECRETS.update(
    {
        SUB_KEY,
        WRONG_KEY,
        JWT_SECRET,
        OTHER_JWT_SECRET,
        COOKIE,
        QUERY_TOKEN,
        QUERY_SIG,
        BASIC_PASSWORD,
        ADMIN_TOKEN,
    }
)
KEY_ENV = "WSGATE_TEST_SUBSCRIPTION_KEY"


def _jwt(secret: str, **claims: Any) -> str:
    return pyjwt.encode({"aud": "chat", "sub": "bob", **claims}, secret, "HS256")


GOOD_JWT = _jwt(JWT_SECRET, exp=int(time.time()) + 3600)
EXPIRED_JWT = _jwt(JWT_SECRET, exp=int(time.time()) - 3600)
FORGED_JWT = _jwt(OTHER_JWT_SECRET, exp=int(time.time()) + 3600)

SECRETS = {
    "subscription key": SUB_KEY,
    "wrong subscription key": WRONG_KEY,
    "JWT secret": JWT_SECRET,
    "other JWT secret": OTHER_JWT_SECRET,
    "cookie": COOKIE,
    "query token": QUERY_TOKEN,
    "query signature": QUERY_SIG,
    "basic password": BASIC_PASSWORD,
    "basic credentials": base64.b64encode(f"gateway:{BASIC_PASSWORD}".encode()).decode(),
    "admin token": ADMIN_TOKEN,
}
for _name, _token in (("JWT", GOOD_JWT), ("expired JWT", EXPIRED_JWT), ("forged JWT", FORGED_JWT)):
    SECRETS[_name] = _token
    SECRETS[f"{_name} signature"] = _token.rsplit(".", 1)[1]


def leaks(text: str) -> list[str]:
    """The names of the secrets found in ``text``."""
    return [name for name, value in SECRETS.items() if value in text]


def config_text(backend_url: str, refusing_url: str, dead_url: str, admin: bool) -> str:
    return f"""
[gateway]
listen = "127.0.0.1:0"
handshake_timeout = 0.5
close_timeout = 1

{f'[admin]{chr(10)}listen = "127.0.0.1:0"{chr(10)}token = "{ADMIN_TOKEN}"' if admin else ""}

[[products]]
id = "gold"

[[subscriptions]]
id = "alice"
scope = "all"
primary_key = {{ env = "{KEY_ENV}" }}

[[apis]]
name = "keyed"
path = "keyed"
service_url = "{backend_url}"
products = ["gold"]

[[apis]]
name = "jwt"
path = "jwt"
service_url = "{backend_url}"
policies = [
    {{ policy = "validate-jwt", secret = "{JWT_SECRET}", audiences = ["chat"] }},
]

[[apis]]
name = "open"
path = "open"
service_url = "{backend_url}"
policies = [
    {{ policy = "authentication-basic", username = "gateway", password = "{BASIC_PASSWORD}" }},
]

[[apis]]
name = "refusing"
path = "refusing"
service_url = "{refusing_url}"

[[apis]]
name = "down"
path = "down"
service_url = "{dead_url}"
"""


# Headers and query parameters every request carries, on top of its own.
COMMON = [("Cookie", f"session={COOKIE}"), ("X-Trace", "not-a-secret")]
SECRET_QUERY = f"room=1&access_token={QUERY_TOKEN}&sig={QUERY_SIG}"


async def scenarios(port: int, responses: list[bytes]) -> dict[str, int]:
    """Every path through the gateway, with secrets on board; returns the statuses seen."""
    statuses: dict[str, int] = {}

    async def handshake(
        name: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        *,
        then: Callable[[Conn], Any] | None = None,
    ) -> None:
        shake = await connect(port, target, [*COMMON, *(headers or [])])
        statuses[name] = shake.status
        responses.append(shake.head + b"\r\n\r\n" + shake.body)
        if shake.conn is not None:
            conn = shake.conn
            try:
                if then is not None:
                    await then(conn)
                else:
                    await conn.close(1000)
                event = await conn.next_event()
                while event.kind not in ("close", "eof"):
                    event = await conn.next_event()
                responses.append(event.payload)
            finally:
                conn.abort()

    async def raw(name: str, data: bytes, *, linger: float = 0) -> None:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(data)
            if linger:
                await trio.sleep(linger)
            answer = bytearray()
            with trio.fail_after(5):
                try:
                    while chunk := await stream.receive_some(65536):
                        answer += chunk
                except trio.BrokenResourceError:
                    pass
        statuses[name] = int(answer.split(b" ", 2)[1]) if answer else 0
        responses.append(bytes(answer))

    async def echo_then_protocol_error(conn: Conn) -> None:
        payload = payload_for("x", 0, 100)
        await conn.send(conn.message_frames(BINARY, payload))
        assert (await conn.next_event()).payload == payload
        await conn.send(build_frame(TEXT, b"unmasked", masked=False))

    key = [("Ocp-Apim-Subscription-Key", SUB_KEY)]
    await handshake("key in header", f"/keyed/a?{SECRET_QUERY}", key)
    await handshake("key in query", f"/keyed/a?subscription-key={SUB_KEY}&{SECRET_QUERY}")
    await handshake(
        "wrong key", f"/keyed?{SECRET_QUERY}", [("Ocp-Apim-Subscription-Key", WRONG_KEY)]
    )
    await handshake("wrong key in query", f"/keyed?subscription-key={WRONG_KEY}")
    await handshake("no key", f"/keyed?{SECRET_QUERY}", [("Authorization", f"Bearer {GOOD_JWT}")])
    await handshake("jwt", f"/jwt?{SECRET_QUERY}", [("Authorization", f"Bearer {GOOD_JWT}")])
    await handshake("expired jwt", "/jwt", [("Authorization", f"Bearer {EXPIRED_JWT}")])
    await handshake("forged jwt", "/jwt", [("Authorization", f"Bearer {FORGED_JWT}")])
    await handshake("not a jwt", "/jwt", [("Authorization", f"Bearer x{QUERY_TOKEN}")])
    await handshake(
        "protocol error",
        f"/open?{SECRET_QUERY}",
        [*key, ("Authorization", f"Bearer {GOOD_JWT}")],
        then=echo_then_protocol_error,
    )
    await handshake("backend refuses", f"/refusing?{SECRET_QUERY}", key)
    await handshake("backend down", f"/down?{SECRET_QUERY}", key)
    await handshake("no such API", f"/nope?{SECRET_QUERY}", key)
    # Malformed requests whose offending line is the one holding a secret.
    head = upgrade_request("/open").removesuffix(b"\r\n")
    await raw("space before colon", head + f"Authorization : Bearer {GOOD_JWT}\r\n\r\n".encode())
    await raw("NUL in a cookie", head + f"Cookie: session={COOKIE}\x00\r\n\r\n".encode())
    await raw(
        "bad request line",
        f"GET /open?access_token={QUERY_TOKEN} junk HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    )
    await raw("bad header name", head + f"X-{SUB_KEY} x: 1\r\n\r\n".encode())
    await raw(
        "plain GET",
        f"GET /open?{SECRET_QUERY} HTTP/1.1\r\nHost: x\r\nCookie: {COOKIE}\r\n\r\n".encode(),
    )
    await raw("oversize", head + f"Cookie: {COOKIE}\r\nX-Pad: {'p' * 20000}\r\n\r\n".encode())
    await raw("timeout", head + f"Authorization: Bearer {GOOD_JWT}\r\n".encode())  # never ends
    return statuses


EXPECTED = {
    "key in header": 101,
    "key in query": 101,
    "wrong key": 401,
    "wrong key in query": 401,
    "no key": 401,
    "jwt": 101,
    "expired jwt": 401,
    "forged jwt": 401,
    "not a jwt": 401,
    "protocol error": 101,
    "backend refuses": 403,
    "backend down": 502,
    "no such API": 404,
    "space before colon": 400,
    "NUL in a cookie": 400,
    "bad request line": 400,
    "bad header name": 400,
    "plain GET": 426,
    "oversize": 431,
    "timeout": 408,
}


async def _refuse(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
    body = b'{"error": "not today"}'
    await stream.send_all(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await read_all(stream)


async def _backends(nursery: trio.Nursery) -> tuple[str, str, str]:
    backend: Backend = await nursery.start(Backend().serve)
    refusing: RawBackend = await nursery.start(RawBackend(_refuse).serve)
    dead = trio.socket.socket()
    await dead.bind(("127.0.0.1", 0))
    dead_url = f"ws://127.0.0.1:{dead.getsockname()[1]}/"
    dead.close()
    return backend.url, refusing.url, dead_url


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SUB_KEY)


@pytest.mark.usefixtures("key_env")
async def test_no_secret_in_captured_logs_or_responses(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    urls = await _backends(nursery)
    path = tmp_path / "gateway.toml"
    path.write_text(config_text(*urls, admin=False))
    responses: list[bytes] = []
    with capture_logs() as logs:
        gw: wsgate.Gateway = await nursery.start(wsgate.Gateway(load_config(path)).run)
        statuses = await scenarios(gw.addresses[0][1], responses)
        with trio.fail_after(5):
            while gw.stats().active_pairs or gw.stats().handshakes_in_progress:  # noqa: ASYNC110
                await trio.sleep(0.02)
    assert statuses == EXPECTED
    assert len([r for r in logs if r["event"] == "handshake"]) == len(EXPECTED)
    for record in logs:
        assert not leaks(repr(record)), (leaks(repr(record)), record)
    for response in responses:
        text = response.decode("latin-1")
        assert not leaks(text), (leaks(text), text[:300])


@pytest.mark.usefixtures("key_env")
@pytest.mark.deadline(60)
async def test_no_secret_in_a_gateway_process_output_metrics_or_admin_api(
    nursery: trio.Nursery,
) -> None:
    urls = await _backends(nursery)
    gw = GatewayProcess(config_text(*urls, admin=True))
    await gw.start(nursery)
    responses: list[bytes] = []
    admin_pages: list[str] = []
    try:
        statuses = await scenarios(gw.port, responses)
        assert statuses == EXPECTED
        # The admin listener, with a pair open so that it has something to show.
        shake = await connect(
            gw.port, "/keyed/b", [*COMMON, ("Ocp-Apim-Subscription-Key", SUB_KEY)]
        )
        assert shake.conn is not None
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.admin_port}") as http:
                admin_pages.append((await http.get("/metrics")).text)
                auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                for page in ("/connections", "/subscriptions", "/apis", "/products"):
                    response = await http.get(page, headers=auth)
                    assert response.status_code == 200, (page, response.text)
                    admin_pages.append(response.text)
                wrong = await http.get(
                    "/subscriptions", headers={"Authorization": f"Bearer {SUB_KEY}"}
                )
                assert wrong.status_code == 401
                admin_pages.append(wrong.text)
        finally:
            shake.conn.abort()
        assert "alice" in admin_pages[2]  # the subscription is listed, its key masked
        gw.signal(2)  # SIGINT: drain and exit, flushing every line
        with trio.fail_after(10):
            assert await gw.wait() == 0
    finally:
        await gw.aclose()
    assert gw.records["handshake"] == len(EXPECTED) + 1
    output = "\n".join(gw.lines) + gw.stderr.decode(errors="replace")
    found = {name for line in gw.lines for name in leaks(line)}
    assert not found, [line for line in gw.lines if leaks(line)][:3]
    assert not leaks(output)
    for page in admin_pages:
        assert not leaks(page), (leaks(page), page[:300])
    for response in responses:
        assert not leaks(response.decode("latin-1"))
    # The output really is the gateway's log: secrets would have been there to find.
    assert sum(json.loads(line).get("event") == "disconnect" for line in gw.lines) >= 4

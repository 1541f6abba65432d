"""The gateway-log records (handshake, disconnect) match docs/logs.md, and keep secrets out."""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import trio
from structlog.testing import capture_logs
from trio_websocket import open_websocket_url

from wsgate import Gateway, parse_config

from . import helpers
from .helpers import (
    BackendRequest,
    RawBackend,
    RawClient,
    accept_response,
    read_all,
    start_gateway,
    wait_until,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "logs.md"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def documented_keys(record: str) -> set[str]:
    """The keys in the first table of docs/logs.md's section on ``record`` (always present)."""
    section = DOC.read_text().split(f"## The `{record}` record", 1)[1].split("\n## ", 1)[0]
    table = section[section.index("\n| key |") :].split("\n\n", 1)[0]
    keys = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE))
    assert keys, f"no key table under '## The `{record}` record' in {DOC}"
    return keys


def assert_documented(record: dict[str, Any], name: str) -> None:
    """Every key in the doc's table is in the record; every key of the record is in the doc."""
    keys = set(record) - {"log_level"}  # added by capture_logs; "level" in the CLI's output
    missing = documented_keys(name) - keys
    assert not missing, f"{name} record lacks keys documented in {DOC.name}: {missing}"
    mentioned = set(re.findall(r"`([a-z_]+)`", DOC.read_text()))
    undocumented = keys - mentioned
    assert not undocumented, f"{name} record keys missing from {DOC.name}: {undocumented}"


def only(logs: list[dict[str, Any]], event: str) -> dict[str, Any]:
    records = [entry for entry in logs if entry["event"] == event]
    assert len(records) == 1, records
    return records[0]


async def wait_for(logs: list[dict[str, Any]], event: str) -> None:
    with trio.fail_after(5):
        await wait_until(lambda: any(entry["event"] == event for entry in logs))


def assert_timestamp(value: object) -> None:
    assert isinstance(value, str) and ISO_UTC.fullmatch(value), value
    parsed = datetime.datetime.fromisoformat(value)
    assert parsed.utcoffset() == datetime.timedelta(0)
    now = datetime.datetime.now(datetime.UTC)
    assert now - datetime.timedelta(seconds=30) < parsed <= now


def masked_frame_size(payload: int) -> int:
    """Bytes on the wire of a client frame (masked) with a payload under 126 bytes."""
    return 2 + 4 + payload


def unmasked_frame_size(payload: int) -> int:
    return 2 + payload


async def test_one_pair_logs_one_handshake_and_one_disconnect(
    nursery: trio.Nursery, echo_url: str
) -> None:
    with capture_logs() as logs:
        gw = await start_gateway(nursery, echo_url)
        async with open_websocket_url(f"{gw.url}/echo/room/7?lang=en") as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"\x00\x01\x02")
            assert await ws.get_message() == b"\x00\x01\x02"
            await ws.aclose(4000, "bye")
        await wait_for(logs, "disconnect")

    handshake = only(logs, "handshake")
    assert_documented(handshake, "handshake")
    assert_timestamp(handshake["timestamp"])
    assert handshake["correlation_id"]
    assert handshake["api_id"] == "echo"
    assert handshake["operation_id"] == "onHandshake"
    assert handshake["method"] == "GET"
    assert handshake["url"] == "/echo/room/7?lang=en"
    assert handshake["caller_ip_address"] == "127.0.0.1"
    assert handshake["response_code"] == 101
    assert handshake["backend_response_code"] == 101
    assert handshake["backend_url"].startswith(echo_url)
    assert handshake["backend_url"].endswith("?lang=en")
    assert handshake["subprotocol"] is None
    assert handshake["is_request_success"] is True
    assert handshake["last_error_reason"] is None
    assert handshake["last_error_message"] is None
    assert handshake["last_error_source"] is None
    for key in ("total_time", "backend_time"):
        assert isinstance(handshake[key], float) and handshake[key] >= 0, key
    assert handshake["backend_time"] <= handshake["total_time"]

    disconnect = only(logs, "disconnect")
    assert_documented(disconnect, "disconnect")
    assert_timestamp(disconnect["timestamp"])
    assert disconnect["timestamp"] >= handshake["timestamp"]
    assert disconnect["correlation_id"] == handshake["correlation_id"]
    assert disconnect["api_id"] == "echo"
    assert disconnect["closed_by"] == "client"
    assert disconnect["close_code"] == 4000
    assert disconnect["close_reason"] == "bye"
    assert disconnect["end"] == "client_closed"
    assert disconnect["messages_from_client"] == 2
    assert disconnect["messages_from_backend"] == 2
    # Every frame counts, close frames included: "hello", 3 bytes, close(4000, "bye").
    close_payload = 2 + len("bye")
    assert disconnect["bytes_from_client"] == sum(
        masked_frame_size(n) for n in (5, 3, close_payload)
    )
    # The echo server answers the close with the same code and reason.
    assert disconnect["bytes_from_backend"] == sum(
        unmasked_frame_size(n) for n in (5, 3, close_payload)
    )
    assert isinstance(disconnect["duration"], float) and disconnect["duration"] >= 0


async def test_refused_handshake_logs_the_error_and_no_disconnect(
    nursery: trio.Nursery, echo_url: str
) -> None:
    with capture_logs() as logs:
        gw = await start_gateway(nursery, echo_url)
        client = await RawClient.connect(gw.addresses[0][1], "/nowhere")
        await client.aclose()
        assert client.response is not None and client.response.status == 404
        await wait_for(logs, "handshake")

    handshake = only(logs, "handshake")
    assert_documented(handshake, "handshake")
    assert handshake["response_code"] == 404
    assert handshake["is_request_success"] is False
    assert handshake["last_error_reason"] == "ApiNotFound"
    assert handshake["last_error_message"] == "no API at this path"
    assert handshake["api_id"] is None
    assert handshake["backend_response_code"] is None
    assert handshake["backend_url"] is None
    assert handshake["backend_time"] is None
    assert handshake["url"] == "/nowhere"
    assert not [entry for entry in logs if entry["event"] == "disconnect"]


async def test_unreachable_backend_logs_502_with_its_source(nursery: trio.Nursery) -> None:
    # A port nothing listens on: bound but not listening, and held for the whole
    # test (a closed one could be taken meanwhile; it failed once in a suite run).
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with capture_logs() as logs:
            gw = await start_gateway(nursery, f"ws://127.0.0.1:{port}/echo")
            client = await RawClient.connect(gw.addresses[0][1], "/echo")
            await client.aclose()
            assert client.response is not None and client.response.status == 502
            await wait_for(logs, "handshake")

    handshake = only(logs, "handshake")
    assert handshake["response_code"] == 502
    assert handshake["backend_response_code"] is None
    assert handshake["is_request_success"] is False
    assert handshake["last_error_reason"] == "BackendConnectionFailure"
    assert handshake["backend_url"] == f"ws://127.0.0.1:{port}/echo"
    assert isinstance(handshake["backend_time"], float)


SECRET_QUERY = "subscription-key=s3cr3t&access_token=t0k3n&room=1"
REDACTED_QUERY = "subscription-key=REDACTED&access_token=REDACTED&room=1"
VALID_KEY = "s3cr3t-s3cr3t-s3cr3t"  # a subscription key must be 16 characters or more
helpers.SUITE_SECRETS.update({VALID_KEY})


async def _visit(port: int, target: str, status: int, *, echo: bool = False) -> None:
    """Open ``target``, expect ``status``; if 101, (echo once and) close cleanly."""
    client = await RawClient.connect(port, target)
    try:
        assert client.response is not None and client.response.status == status
        if status == 101:
            if echo:
                await client.send_text("hello")
                await client.receive_frames(1)
            await client.close(1000)
            await client.receive_close()
    finally:
        await client.aclose()


async def test_secrets_in_the_query_never_reach_a_record(
    nursery: trio.Nursery, echo_url: str
) -> None:
    config = parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0"},
            "apis": [{"name": "echo", "path": "echo", "service_url": echo_url}],
            "subscriptions": [{"id": "sub-1", "scope": "echo", "primary_key": VALID_KEY}],
        }
    )
    with capture_logs() as logs:
        gw = await nursery.start(Gateway(config).run)
        port = gw.addresses[0][1]
        for target, status in [
            (f"/echo?{SECRET_QUERY}", 401),  # not a valid key
            (f"/echo?{SECRET_QUERY.replace('s3cr3t', VALID_KEY)}", 101),
            (f"/nowhere?{SECRET_QUERY}", 404),
        ]:
            await _visit(port, target, status, echo=True)
        with trio.fail_after(5):
            await wait_until(lambda: sum(entry["event"] == "handshake" for entry in logs) == 3)
            await wait_until(lambda: any(entry["event"] == "disconnect" for entry in logs))

    for entry in logs:
        text = repr(entry)
        assert "s3cr3t" not in text and "t0k3n" not in text, entry
    invalid, valid, unknown = (entry for entry in logs if entry["event"] == "handshake")
    assert invalid["url"] == valid["url"] == f"/echo?{REDACTED_QUERY}"
    assert unknown["url"] == f"/nowhere?{REDACTED_QUERY}"
    assert invalid["last_error_reason"] == "SubscriptionKeyInvalid"
    assert valid["subscription_id"] == "sub-1"
    # The backend got the query without the subscription key; the rest is redacted.
    assert valid["backend_url"] == f"{echo_url}?access_token=REDACTED&room=1"


async def test_query_secrets_named_by_policies_and_config_are_redacted(
    nursery: trio.Nursery, echo_url: str
) -> None:
    """validate-jwt's token parameter and [gateway] redact_query_parameters, any API."""
    secret = "j" * 40
    token = pyjwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, secret, "HS256")
    session = "sess-0123456789abcdef"
    helpers.SUITE_SECRETS.update({secret, token, session})
    jwt_policy = {"policy": "validate-jwt", "query_parameter_name": "jwt_q", "secret": secret}
    config = parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0", "redact_query_parameters": ["Session"]},
            "apis": [
                {"name": "chat", "path": "chat", "service_url": echo_url, "policies": [jwt_policy]},
                {"name": "echo", "path": "echo", "service_url": echo_url},
            ],
        }
    )
    query = f"jwt_q={token}&session={session}&room=1"
    with capture_logs() as logs:
        gw = await nursery.start(Gateway(config).run)
        for target, status in [(f"/chat?{query}", 101), (f"/echo?{query}", 101)]:
            await _visit(gw.addresses[0][1], target, status)
        with trio.fail_after(5):
            await wait_until(lambda: sum(entry["event"] == "disconnect" for entry in logs) == 2)

    for entry in logs:
        assert token not in repr(entry) and session not in repr(entry), entry
    handshakes = [entry for entry in logs if entry["event"] == "handshake"]
    assert [entry["url"] for entry in handshakes] == [
        "/chat?jwt_q=REDACTED&session=REDACTED&room=1",
        # The echo API has no validate-jwt, but the parameter is redacted there too.
        "/echo?jwt_q=REDACTED&session=REDACTED&room=1",
    ]
    assert handshakes[0]["backend_url"] == f"{echo_url}?jwt_q=REDACTED&session=REDACTED&room=1"


async def test_backend_url_is_the_url_the_backend_got(nursery: trio.Nursery) -> None:
    async def script(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
        await stream.send_all(accept_response(request))
        await read_all(stream)

    backend = await nursery.start(RawBackend(script).serve)
    with capture_logs() as logs:
        gw = await start_gateway(nursery, f"{backend.url}/base?v=2")
        client = await RawClient.connect(gw.addresses[0][1], "/echo/room/7?lang=en")
        await client.aclose()
        await wait_for(logs, "disconnect")
    assert backend.requests[0].target == "/base/room/7?v=2&lang=en"
    assert only(logs, "handshake")["backend_url"] == f"{backend.url}/base/room/7?v=2&lang=en"

"""Policies, products and subscriptions through a running gateway, over real sockets."""

from __future__ import annotations

import time
from typing import Any

import jwt as pyjwt
import pytest
import trio
from structlog.testing import capture_logs

import wsgate
from wsgate.config import parse_config

from . import helpers
from .helpers import (
    BackendRequest,
    Opcode,
    RawBackend,
    RawClient,
    accept_response,
    read_all,
    server_frames,
)

KEY = "k" * 16 + "-alice-primary"
SECRET = "s" * 40
helpers.SUITE_SECRETS.update({KEY, SECRET})


async def _recording_backend(nursery: trio.Nursery) -> RawBackend:
    async def script(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
        await stream.send_all(accept_response(request))
        await read_all(stream)

    backend: RawBackend = await nursery.start(RawBackend(script).serve)
    return backend


async def _gateway(nursery: trio.Nursery, config: dict[str, Any]) -> wsgate.Gateway:
    config["gateway"] = {"listen": "127.0.0.1:0", **config.get("gateway", {})}
    gw: wsgate.Gateway = await nursery.start(wsgate.Gateway(parse_config(config)).run)
    return gw


async def _status(gw: wsgate.Gateway, target: str = "/chat", headers: Any = None) -> int:
    client = await RawClient.connect(gw.addresses[0][1], target, headers)
    await client.aclose()
    assert client.response is not None
    return client.response.status


def _product_config(backend_url: str, **api: Any) -> dict[str, Any]:
    return {
        "products": [
            {
                "id": "gold",
                "policies": [{"policy": "set-header", "name": "X-Tier", "value": "gold"}],
            }
        ],
        "subscriptions": [{"id": "alice", "scope": "gold", "primary_key": KEY}],
        "apis": [
            {
                "name": "chat",
                "path": "chat",
                "service_url": backend_url,
                "products": ["gold"],
                **api,
            }
        ],
    }


async def test_subscription_key_in_header_or_query_and_never_forwarded(
    nursery: trio.Nursery,
) -> None:
    backend = await _recording_backend(nursery)
    gw = await _gateway(nursery, _product_config(backend.url))
    with capture_logs() as logs:
        assert await _status(gw) == 401
        assert (
            await _status(gw, headers=[("Ocp-Apim-Subscription-Key", "wrong-key-wrong-key")]) == 401
        )
        assert await _status(gw, headers=[("Ocp-Apim-Subscription-Key", KEY)]) == 101
        assert await _status(gw, f"/chat?room=1&subscription-key={KEY}") == 101
    header_call, query_call = backend.requests
    assert header_call.header("ocp-apim-subscription-key") is None
    assert query_call.target == "/?room=1"
    assert header_call.header("x-tier") == "gold"  # the product's policy ran
    handshakes = [r for r in logs if r["event"] == "handshake"]
    assert [r["response_code"] for r in handshakes] == [401, 401, 101, 101]
    assert handshakes[0]["last_error_reason"] == "SubscriptionKeyMissing"
    assert handshakes[2]["subscription_id"] == "alice" and handshakes[2]["product_id"] == "gold"
    assert KEY not in repr(logs)


async def test_suspended_subscription_gets_403(nursery: trio.Nursery) -> None:
    backend = await _recording_backend(nursery)
    config = _product_config(backend.url)
    config["subscriptions"][0]["state"] = "suspended"
    gw = await _gateway(nursery, config)
    assert await _status(gw, headers=[("Ocp-Apim-Subscription-Key", KEY)]) == 403
    assert backend.requests == []


async def test_scopes_run_global_then_product_then_api(nursery: trio.Nursery) -> None:
    backend = await _recording_backend(nursery)
    config = _product_config(
        backend.url,
        policies=[
            {"policy": "set-header", "name": "X-Order", "value": "api", "exists_action": "append"}
        ],
    )
    config["gateway"] = {
        "policies": [{"policy": "set-header", "name": "X-Order", "value": "global"}]
    }
    config["products"][0]["policies"].append(
        {"policy": "set-header", "name": "X-Order", "value": "product", "exists_action": "append"}
    )
    gw = await _gateway(nursery, config)
    assert await _status(gw, headers=[("Ocp-Apim-Subscription-Key", KEY)]) == 101
    (request,) = backend.requests
    assert request.all("x-order") in (["global, product, api"], ["global", "product", "api"])


async def test_validate_jwt_from_query_and_close_on_expiry(nursery: trio.Nursery) -> None:
    backend = await _recording_backend(nursery)
    policy = {
        "policy": "validate-jwt",
        "query_parameter_name": "access_token",
        "secret": SECRET,
        "audiences": ["chat"],
        "close_on_expiry": True,
    }
    gw = await _gateway(
        nursery,
        {
            "apis": [
                {"name": "chat", "path": "chat", "service_url": backend.url, "policies": [policy]}
            ]
        },
    )
    good = pyjwt.encode({"aud": "chat", "sub": "bob", "exp": int(time.time()) + 2}, SECRET, "HS256")
    wrong_aud = pyjwt.encode({"aud": "other", "exp": int(time.time()) + 60}, SECRET, "HS256")
    with capture_logs() as logs:
        assert await _status(gw, "/chat") == 401
        assert await _status(gw, f"/chat?access_token={wrong_aud}") == 401
        client = await RawClient.connect(gw.addresses[0][1], f"/chat?access_token={good}")
        assert client.response is not None and client.response.status == 101
        with trio.fail_after(5):
            assert (await client.receive_close())[0] == 1008
        await client.aclose()
    assert good not in repr(logs) and wrong_aud not in repr(logs)


async def test_rate_limit_answers_429_with_retry_after(nursery: trio.Nursery) -> None:
    backend = await _recording_backend(nursery)
    policy = {"policy": "rate-limit-by-key", "calls": 2, "renewal_period": 60, "counter_key": "ip"}
    gw = await _gateway(
        nursery,
        {
            "apis": [
                {"name": "chat", "path": "chat", "service_url": backend.url, "policies": [policy]}
            ]
        },
    )
    assert [await _status(gw) for _ in range(2)] == [101, 101]
    client = await RawClient.connect(gw.addresses[0][1], "/chat")
    await client.aclose()
    assert client.response is not None and client.response.status == 429
    assert int(client.response.header("retry-after") or 0) > 0


async def test_limit_concurrency_holds_a_slot_for_the_pair_life(
    nursery: trio.Nursery, echo_url: str
) -> None:
    policy = {"policy": "limit-concurrency", "max_count": 1}
    gw = await _gateway(
        nursery,
        {"apis": [{"name": "chat", "path": "chat", "service_url": echo_url, "policies": [policy]}]},
    )
    first = await RawClient.connect(gw.addresses[0][1], "/chat")
    assert first.response is not None and first.response.status == 101
    assert await _status(gw) == 429
    await first.close()
    await first.receive_close()
    await first.aclose()
    with trio.fail_after(5):
        while (status := await _status(gw)) != 101:
            assert status == 429
            await trio.sleep(0.02)


async def test_ip_filter_and_return_response(nursery: trio.Nursery) -> None:
    backend = await _recording_backend(nursery)
    gw = await _gateway(
        nursery,
        {
            "apis": [
                {
                    "name": "chat",
                    "path": "chat",
                    "service_url": backend.url,
                    "policies": [
                        {"policy": "ip-filter", "action": "forbid", "addresses": ["127.0.0.0/8"]}
                    ],
                },
                {
                    "name": "down",
                    "path": "down",
                    "service_url": backend.url,
                    "policies": [
                        {
                            "policy": "return-response",
                            "status": 503,
                            "headers": {"Retry-After": "60"},
                            "body": "later",
                        }
                    ],
                },
            ]
        },
    )
    assert await _status(gw, "/chat") == 403
    client = await RawClient.connect(gw.addresses[0][1], "/down")
    await client.aclose()
    assert client.response is not None
    assert (client.response.status, client.response.body) == (503, b"later")
    assert client.response.header("retry-after") == "60"
    assert backend.requests == []


async def test_message_rate_limit_close_mode(nursery: trio.Nursery, echo_url: str) -> None:
    policy = {
        "policy": "message-rate-limit",
        "messages_per_second": 1,
        "burst": 2,
        "on_exceed": "close",
    }
    gw = await _gateway(
        nursery,
        {"apis": [{"name": "chat", "path": "chat", "service_url": echo_url, "policies": [policy]}]},
    )
    client = await RawClient.connect(gw.addresses[0][1], "/chat")
    for i in range(5):
        await client.send_text(f"m{i}")
    assert (await client.receive_close())[0] == 1008
    await client.aclose()


class _Recorder:
    """A backend that keeps every byte the gateway relays to it, then answers a close."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.ended = False

    async def script(
        self, request: BackendRequest, stream: trio.SocketStream, early: bytes
    ) -> None:
        await stream.send_all(accept_response(request))
        self.received += early
        proto = server_frames()
        try:
            while data := await stream.receive_some(65536):
                self.received += data
                proto.receive_bytes(data)
                if any(f.opcode is Opcode.CLOSE for f in proto.received_frames()):
                    await stream.send_all(proto.close(1008))
        except trio.BrokenResourceError:
            pass
        self.ended = True

    def frames(self) -> list[tuple[Opcode, Any]]:
        proto = server_frames()
        proto.receive_bytes(bytes(self.received))
        return [(f.opcode, f.payload) for f in proto.received_frames()]


async def _limited_chat(nursery: trio.Nursery, recorder: _Recorder, **limit: Any) -> RawClient:
    backend: RawBackend = await nursery.start(RawBackend(recorder.script).serve)
    policy = {"policy": "message-rate-limit", "on_exceed": "close", **limit}
    api = {"name": "chat", "path": "chat", "service_url": backend.url, "policies": [policy]}
    gw = await _gateway(nursery, {"apis": [api]})
    return await RawClient.connect(gw.addresses[0][1], "/chat")


async def test_message_rate_limit_close_holds_back_the_read_that_overdraws(
    nursery: trio.Nursery,
) -> None:
    recorder = _Recorder()
    client = await _limited_chat(nursery, recorder, messages_per_second=1, burst=2)
    for i in range(2):
        await client.send_text(f"m{i}")
        await helpers.wait_until(lambda i=i: len(recorder.frames()) == i + 1)
    # The third message overdraws the bucket; a close frame rides in the same read.
    with capture_logs() as logs:
        await client.send(client.proto.send_data("m2", True) + client.proto.close(1000))
        # The client's close was never relayed: the gateway ended the pair before,
        # and tells the client why rather than answering its close in kind.
        assert await client.receive_close() == (1008, "message rate limit exceeded")
        await client.aclose()
        await helpers.wait_until(lambda: recorder.ended)
        await helpers.wait_until(lambda: any(e["event"] == "disconnect" for e in logs))
    [disconnect] = [e for e in logs if e["event"] == "disconnect"]
    # The log says what the client was told.
    assert (disconnect["close_code"], disconnect["close_reason"]) == (
        1008,
        "message rate limit exceeded",
    )
    # Neither m2 nor the client's close reached the backend: the gateway's 1008 did.
    assert recorder.frames() == [
        (Opcode.TEXT, "m0"),
        (Opcode.TEXT, "m1"),
        (Opcode.CLOSE, (1008, "message rate limit exceeded")),
    ]


async def test_message_rate_limit_close_mid_frame_cuts_the_backend_without_a_frame(
    nursery: trio.Nursery,
) -> None:
    recorder = _Recorder()
    client = await _limited_chat(nursery, recorder, bytes_per_second=100, burst_bytes=150)
    frame = client.proto.send_data(b"x" * 200, True)
    await client.send(frame[:110])  # within the burst: relayed
    await helpers.wait_until(lambda: len(recorder.received) == 110)
    await client.send(frame[110:])  # the rest of the frame overdraws: held back
    assert (await client.receive_close())[0] == 1008
    await client.aclose()
    await helpers.wait_until(lambda: recorder.ended)
    # The backend holds half a frame: a close frame after it would be read as payload.
    assert bytes(recorder.received) == frame[:110]


def test_unsupported_policy_at_api_scope_is_refused() -> None:
    with pytest.raises(wsgate.ConfigError, match="cors"):
        parse_config(
            {
                "apis": [
                    {
                        "name": "c",
                        "path": "c",
                        "service_url": "ws://127.0.0.1:1/",
                        "policies": [{"policy": "cors"}],
                    }
                ]
            }
        )

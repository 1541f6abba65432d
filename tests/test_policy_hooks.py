"""The onHandshake hook as the gateway runs it, with small policies written here."""

from __future__ import annotations

import time

import attrs
import pytest
import trio
from structlog.testing import capture_logs

import wsgate
from wsgate.errors import HandshakeRejected
from wsgate.policy import HandshakeContext, PairStats, PolicyResponse

from .helpers import RawClient, make_config, wait_until


@attrs.define
class Scripted:
    """A policy whose behaviour each test sets."""

    policy_name: str = "scripted"
    reject: HandshakeRejected | None = None
    close_after: float | None = None
    limiter: object = None
    closed: list[PairStats] = attrs.Factory(list)

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        ctx.on_close(self.closed.append)
        ctx.log_fields["tenant"] = "acme"
        ctx.headers.append(("x-from-policy", "yes"))
        if self.close_after is not None:
            ctx.close_at(time.time() + self.close_after, "token expired")
        if self.limiter is not None:
            ctx.limit_messages(self.limiter)  # type: ignore[arg-type]
        if self.reject is not None:
            raise self.reject


pytestmark = pytest.mark.usefixtures("relay_engine")


class CloseAfter:
    """A message limiter that allows ``n`` messages, then closes the pair."""

    def __init__(self, n: int) -> None:
        self.left = n

    def charge(self, messages: int, nbytes: int, now: float) -> float | None:
        self.left -= messages
        return None if self.left < 0 else 0.0


async def _gateway(nursery: trio.Nursery, echo_url: str, policy: Scripted) -> wsgate.Gateway:
    config = make_config([{"name": "echo", "path": "echo", "service_url": echo_url}])
    gw: wsgate.Gateway = await nursery.start(
        wsgate.Gateway(config, policies={"echo": [policy]}).run
    )
    return gw


async def test_rejection_names_the_policy_and_still_runs_cleanups(
    nursery: trio.Nursery, echo_url: str
) -> None:
    policy = Scripted(reject=HandshakeRejected(401, "no entry", reason="Nope"))
    gw = await _gateway(nursery, echo_url, policy)
    with capture_logs() as logs:
        client = await RawClient.connect(gw.addresses[0][1])
        await client.aclose()
    assert client.response is not None and client.response.status == 401
    assert b'"message": "no entry"' in client.response.body
    (record,) = [r for r in logs if r["event"] == "handshake"]
    assert record["last_error_source"] == "scripted"
    assert record["last_error_reason"] == "Nope"
    assert record["tenant"] == "acme"
    assert policy.closed == [PairStats()]


async def test_policy_response_answers_without_a_backend(nursery: trio.Nursery) -> None:
    policy = Scripted(reject=PolicyResponse(200, headers=[("X-Hi", "1")], body=b"hello"))
    gw = await _gateway(nursery, "ws://127.0.0.1:9/never-contacted", policy)
    client = await RawClient.connect(gw.addresses[0][1])
    await client.aclose()
    assert client.response is not None
    assert (client.response.status, client.response.body) == (200, b"hello")
    assert client.response.header("x-hi") == "1"


async def test_close_at_ends_the_pair_with_1008_and_cleanups_get_stats(
    nursery: trio.Nursery, echo_url: str
) -> None:
    # Real time (the deadline is wall-clock): long enough that the echo below
    # always beats it, even on a busy machine (0.3 s once did not in CI).
    policy = Scripted(close_after=1.5)
    gw = await _gateway(nursery, echo_url, policy)
    client = await RawClient.connect(gw.addresses[0][1])
    await client.send_text("hi")
    (echo,) = await client.receive_frames(1)
    assert echo.payload == "hi"
    assert await client.receive_close() == (1008, "token expired")
    await client.close(1008)
    await client.aclose()
    with trio.fail_after(5):
        await wait_until(lambda: bool(policy.closed))
    assert policy.closed[0].messages_from_client == 1
    assert policy.closed[0].messages_from_backend == 1


async def test_message_limiter_closes_with_1008(nursery: trio.Nursery, echo_url: str) -> None:
    policy = Scripted(limiter=CloseAfter(2))
    gw = await _gateway(nursery, echo_url, policy)
    client = await RawClient.connect(gw.addresses[0][1])
    for text in ("one", "two", "three"):
        await client.send_text(text)
    code, reason = await client.receive_close()
    assert (code, reason) == (1008, "message rate limit exceeded")
    await client.aclose()

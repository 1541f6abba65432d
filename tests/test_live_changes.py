"""Changing a running gateway: new config for the next handshake, terminating pairs."""

from __future__ import annotations

import attrs
import pytest
import trio
from trio_websocket import open_websocket_url

import wsgate

from .helpers import RawClient, make_config, start_gateway

pytestmark = pytest.mark.usefixtures("relay_engine")


async def test_update_config_applies_to_next_handshake_only(
    nursery: trio.Nursery, echo_url: str
) -> None:
    gw = await start_gateway(nursery, echo_url)
    async with open_websocket_url(f"{gw.url}/echo") as old_pair:
        refused = await RawClient.connect(gw.addresses[0][1], "/chat")
        await refused.aclose()
        assert refused.response is not None and refused.response.status == 404
        apis = [
            {"name": "chat", "path": "chat", "service_url": echo_url},
        ]
        new = make_config(apis)
        gw.update_config(attrs.evolve(new, gateway=gw.config.gateway))
        async with open_websocket_url(f"{gw.url}/chat") as new_pair:
            await new_pair.send_message("new route")
            assert await new_pair.get_message() == "new route"
        # The pair opened under the old config keeps flowing though /echo is gone.
        await old_pair.send_message("still flowing")
        assert await old_pair.get_message() == "still flowing"
        gone = await RawClient.connect(gw.addresses[0][1], "/echo")
        await gone.aclose()
        assert gone.response is not None and gone.response.status == 404


async def test_update_config_refuses_to_move_the_listener(
    nursery: trio.Nursery, echo_url: str
) -> None:
    gw = await start_gateway(nursery, echo_url)
    with pytest.raises(ValueError, match="listen"):
        gw.update_config(make_config([], listen="127.0.0.1:1"))


async def test_terminate_one_pair_with_1008(nursery: trio.Nursery, echo_url: str) -> None:
    gw = await start_gateway(nursery, echo_url)
    victim = await RawClient.connect(gw.addresses[0][1])
    (victim_id,) = gw.pairs
    async with open_websocket_url(f"{gw.url}/echo") as bystander:
        assert gw.terminate(victim_id, "you are done")
        assert not gw.terminate("no-such-id")
        assert await victim.receive_close() == (1008, "you are done")
        await victim.aclose()
        await bystander.send_message("unaffected")
        assert await bystander.get_message() == "unaffected"


async def test_terminate_api_closes_its_pairs_with_1001(
    nursery: trio.Nursery, echo_url: str
) -> None:
    gw = await start_gateway(nursery, echo_url)
    clients = [await RawClient.connect(gw.addresses[0][1]) for _ in range(2)]
    assert gw.terminate_api("echo") == 2
    for client in clients:
        assert await client.receive_close() == (1001, "API removed")
        await client.aclose()


async def test_policy_state_follows_policy_objects_across_updates(
    nursery: trio.Nursery, echo_url: str
) -> None:
    def config_with_limit() -> wsgate.Config:
        policy = {
            "policy": "rate-limit-by-key",
            "calls": 1,
            "renewal_period": 60,
            "counter_key": "ip",
        }
        return make_config(
            [{"name": "echo", "path": "echo", "service_url": echo_url, "policies": [policy]}]
        )

    async def status() -> int:
        client = await RawClient.connect(gw.addresses[0][1])
        await client.aclose()
        assert client.response is not None
        return client.response.status

    first = config_with_limit()
    gw: wsgate.Gateway = await nursery.start(wsgate.Gateway(first).run)
    assert [await status(), await status()] == [101, 429]
    gw.update_config(first)  # the same policy objects keep their counters
    assert await status() == 429
    second = attrs.evolve(config_with_limit(), gateway=first.gateway)
    gw.update_config(second)  # a new policy starts afresh; the old state is dropped
    assert await status() == 101
    assert len(gw._policy_state) == 1

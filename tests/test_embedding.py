"""The embedding API: docs/examples/embedded.py runs as shown; run and drain act as documented."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import structlog
import trio
from structlog.testing import capture_logs

import wsgate

from .helpers import RawClient, echo_and_close, make_config, wait_until

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "embedded.py"
DOC = Path(__file__).resolve().parent.parent / "docs" / "embedding.md"


async def test_example_program_runs_and_echoes(tmp_path: Path) -> None:
    with trio.fail_after(15):
        # From another directory: the example must not depend on the working directory.
        done = await trio.run_process(
            [sys.executable, str(EXAMPLE)],
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    assert "echo: hello through wsgate" in out
    assert "active_pairs=1" in out  # stats() while the client was connected
    assert "draining=True" in out  # stats() after drain()
    assert '"event": "handshake"' in err  # the program configured structlog itself


def test_doc_shows_the_example_program_verbatim() -> None:
    assert EXAMPLE.read_text() in DOC.read_text()


async def test_start_returns_the_gateway_and_drain_sends_1001(
    nursery: trio.Nursery, echo_url: str
) -> None:
    config = make_config([{"name": "echo", "path": "echo", "service_url": echo_url}])
    gateway = wsgate.Gateway(config)
    returned = trio.Event()

    async def run(*, task_status: trio.TaskStatus[wsgate.Gateway]) -> None:
        await gateway.run(task_status=task_status)
        returned.set()

    started = await nursery.start(run)
    assert started is gateway
    assert gateway.addresses and all(port > 0 for _, port in gateway.addresses)
    host, port = gateway.addresses[0]
    assert gateway.url == f"ws://{host}:{port}"

    # A raw client: trio-websocket's client leaks its socket when the server closes first.
    client = await RawClient.connect(port, "/echo")
    try:
        assert client.response is not None and client.response.status == 101
        await client.send_text("before drain")
        [echo] = await client.receive_frames(1)
        assert echo.payload == "before drain"
        assert gateway.stats().active_pairs == 1

        async with trio.open_nursery() as draining:
            draining.start_soon(gateway.drain)
            assert await client.receive_close() == (1001, "gateway shutting down")
            await client.close(1001)  # answer it, as any client would
        with trio.fail_after(1):
            await returned.wait()  # drain() made run() return
        assert gateway.stats() == wsgate.GatewayStats(
            active_pairs=0, capacity=200, handshakes_in_progress=0, draining=True
        )
    finally:
        await client.aclose()

    # Nothing listens any more.
    with pytest.raises(OSError):
        await trio.open_tcp_stream(host, port)


async def test_drain_without_pairs_returns_at_once(nursery: trio.Nursery, echo_url: str) -> None:
    config = make_config(
        [{"name": "echo", "path": "echo", "service_url": echo_url}], drain_timeout=30
    )
    gateway = await nursery.start(wsgate.Gateway(config).run)
    with trio.fail_after(1):  # far below drain_timeout
        await gateway.drain()
    assert gateway.stats().draining


@pytest.mark.parametrize("engine", ["tasks", "reactor"])
async def test_cancelling_the_host_with_open_pairs_logs_no_error(
    echo_url: str, engine: str
) -> None:
    # The host app's nursery is cancelled while pairs relay: the gateway unwinds
    # quietly. (With the reactor, its pump used to close its epoll before the
    # pairs' owners unregistered, and every pair logged "connection_failed".)
    config = make_config(
        [{"name": "echo", "path": "echo", "service_url": echo_url}], relay_engine=engine
    )
    with capture_logs() as logs:
        async with trio.open_nursery() as host:
            gateway = await host.start(wsgate.Gateway(config).run)
            port = gateway.addresses[0][1]
            clients = [await RawClient.connect(port, "/echo") for _ in range(3)]
            for client in clients:
                await client.send_text("ping")
                [echo] = await client.receive_frames(1)
                assert echo.payload == "ping"
            assert gateway.stats().active_pairs == 3
            host.cancel_scope.cancel()
    for client in clients:
        await client.aclose()
    events = [entry["event"] for entry in logs]
    assert events.count("disconnect") == 3  # each pair still logged its end
    assert [entry for entry in logs if entry["log_level"] in ("error", "critical")] == []


class _BrokenObserver:
    """An embedding application's observer with a bug in both hooks."""

    def __init__(self) -> None:
        self.calls = 0

    def handshake(self, record: object) -> None:
        self.calls += 1
        raise RuntimeError("observer bug")

    def disconnect(self, pair: object, record: object) -> None:
        self.calls += 1
        raise KeyError("observer bug")


async def test_an_observer_that_raises_costs_no_connection(
    nursery: trio.Nursery, echo_url: str
) -> None:
    config = make_config([{"name": "echo", "path": "echo", "service_url": echo_url}])
    observer = _BrokenObserver()
    gateway = await nursery.start(wsgate.Gateway(config, observers=[observer]).run)
    port = gateway.addresses[0][1]
    with capture_logs() as logs:
        for i in range(2):  # the second client shows the gateway still serves
            await echo_and_close(port, f"hello {i}")
        with trio.fail_after(5):
            await wait_until(lambda: gateway.stats().active_pairs == 0)
    failed = [entry for entry in logs if entry["event"] == "observer_failed"]
    assert [entry["observer"] for entry in failed] == ["_BrokenObserver"] * 4
    assert observer.calls == 4
    disconnects = [entry for entry in logs if entry["event"] == "disconnect"]
    assert [entry["close_code"] for entry in disconnects] == [1000, 1000]


async def test_a_host_log_processor_that_raises_costs_no_other_connection(
    nursery: trio.Nursery, echo_url: str
) -> None:
    # The host application configures structlog; a bug in its processors must
    # not take the gateway down with the connection that logged.
    seen: list[str] = []

    def picky(_logger: object, _name: str, event: dict[str, object]) -> dict[str, object]:
        if event["event"] == "disconnect":
            raise ValueError("host processor bug")
        seen.append(str(event["event"]))
        raise structlog.DropEvent

    structlog.configure(processors=[picky])
    config = make_config([{"name": "echo", "path": "echo", "service_url": echo_url}])
    gateway = await nursery.start(wsgate.Gateway(config).run)
    port = gateway.addresses[0][1]
    for i in range(2):  # the second client shows the gateway still serves
        await echo_and_close(port, f"hello {i}")
    with trio.fail_after(5):
        await wait_until(lambda: seen.count("connection_task_failed") == 2)
    assert gateway.stats().active_pairs == 0

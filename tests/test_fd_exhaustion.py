"""Running out of file descriptors refuses new clients with 503; nothing crashes."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import trio

from .helpers import RawClient

FD_LIMIT = 48  # enough for the interpreter, a listener and a handful of pairs


def _cap_fds() -> None:
    # Soft and hard: the gateway raises its soft limit to the hard one at start.
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


async def test_out_of_descriptors_gives_503_and_recovers(
    nursery: trio.Nursery, echo_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(
        '[gateway]\nlisten = "127.0.0.1:0"\n\n'
        f'[[apis]]\nname = "echo"\npath = "echo"\nservice_url = "{echo_url}"\n'
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "wsgate", "serve", "--config", str(config)],
        stdout=-1,
        preexec_fn=_cap_fds,
    )
    clients: list[RawClient] = []
    try:
        assert process.stdout is not None
        buffered = b""
        port = 0
        while not port:
            buffered += await process.stdout.receive_some(4096)
            for line in buffered.splitlines():
                if b'"gateway_started"' in line:
                    port = int(json.loads(line)["addresses"][0].rsplit(":", 1)[1])
        statuses = []
        while not statuses or statuses[-1] == 101:
            client = await RawClient.connect(port)
            clients.append(client)
            assert client.response is not None
            statuses.append(client.response.status)
            assert len(statuses) < FD_LIMIT, "never ran out of descriptors"
        assert statuses[-1] == 503
        assert statuses.count(101) >= 5
        for client in clients[:4]:
            await client.aclose()
        with trio.fail_after(5):
            while True:
                again = await RawClient.connect(port)
                clients.append(again)
                assert again.response is not None
                if again.response.status == 101:
                    break
                await trio.sleep(0.05)
        assert process.returncode is None, "the gateway died"
    finally:
        for client in clients:
            await client.aclose()
        process.kill()
        await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()

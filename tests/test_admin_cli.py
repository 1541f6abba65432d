"""`wsgate serve` with an [admin] table: the admin listener, metrics, state file and SIGHUP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .test_admin_harness import TOKEN, write_config

SERVE = "import sys; from wsgate.cli import main; sys.exit(main(sys.argv[1:]))"


class Lines:
    """JSON log lines of a process's stdout, read as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def until(self, event: str) -> dict[str, Any]:
        while True:
            line, sep, rest = self.buffer.partition(b"\n")
            if sep:
                self.buffer = rest
                record: dict[str, Any] = json.loads(line)
                if record.get("event") == event:
                    return record
                continue
            chunk = await self.stream.receive_some()
            assert chunk, f"stdout ended before {event!r}"
            self.buffer += chunk


def admin_table(state: Path, listen: str = "127.0.0.1:0") -> str:
    return f'\n[admin]\nlisten = "{listen}"\ntoken = "{TOKEN}"\nstate_file = "{state.name}"\n'


@pytest.mark.deadline(30)
async def test_serve_starts_the_admin_listener(echo_url: str, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    path = write_config(tmp_path / "gw.toml", echo_url, "echo", extra=admin_table(state))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", SERVE, "serve", "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        lines = Lines(process.stdout)
        url = (await lines.until("admin_started"))["url"]
        await lines.until("gateway_started")
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as http:
            assert (await http.get("/ready")).status_code == 200
            assert "wsgate_capacity_ratio 0.0" in (await http.get("/metrics")).text
            created = await http.put("/apis/chat", json={"path": "chat", "service_url": echo_url})
            assert created.status_code == 201
            assert json.loads(state.read_text())["apis"]["chat"]["path"] == "chat"
            write_config(path, echo_url, "echo", "more", extra=admin_table(state))
            process.send_signal(signal.SIGHUP)
            reloaded = await lines.until("config_reloaded")
            assert reloaded["apis"] == ["echo", "more", "chat"]
            names = [api["name"] for api in (await http.get("/apis")).json()["apis"]]
            assert names == ["echo", "more", "chat"]
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()
        assert process.stderr is not None
        await process.stderr.aclose()


async def test_serve_reports_an_admin_port_in_use(echo_url: str, tmp_path: Path) -> None:
    taken = trio.socket.socket()
    await taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    state = tmp_path / "state.json"
    path = write_config(
        tmp_path / "gw.toml", echo_url, "echo", extra=admin_table(state, f"127.0.0.1:{port}")
    )
    with taken:
        done = await trio.run_process(
            [sys.executable, "-c", SERVE, "serve", "-c", str(path)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 1
    assert f"cannot start the admin listener on 127.0.0.1:{port}" in done.stderr.decode()


async def test_serve_refuses_a_state_file_that_does_not_fit(echo_url: str, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text('{"format": 1, "apis": {"chat": {"path": "echo", "service_url": "ws://h"}}}')
    path = write_config(tmp_path / "gw.toml", echo_url, "echo", extra=admin_table(state))
    done = await trio.run_process(
        [sys.executable, "-c", SERVE, "serve", "-c", str(path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 1
    stderr = done.stderr.decode()
    assert "cannot start the admin listener" in stderr
    assert "apis.chat.path: duplicate path 'echo'" in stderr

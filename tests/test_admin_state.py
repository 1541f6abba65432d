"""Persistence of management changes: restarts, kill -9 during writes, unusable state files."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

import wsgate
from wsgate.admin import AdminConfig, serve_admin
from wsgate.admin.state import read_state, remove_stale_temporaries, write_atomic
from wsgate.config import Listen
from wsgate.errors import ConfigError

from .helpers import RawClient
from .test_admin_harness import api_body, start_admin, write_config

KEY = "persisted-key-0123456789"


async def status_of(port: int, target: str) -> int:
    client = await RawClient.connect(port, target)
    await client.aclose()
    assert client.response is not None
    return client.response.status


async def test_changes_survive_a_restart(echo_url: str, tmp_path: Path) -> None:
    config_file = write_config(tmp_path / "gw.toml", echo_url, "echo", "other")
    state = tmp_path / "state.json"
    async with trio.open_nursery() as first:
        admin = await start_admin(first, wsgate.load_config(config_file), state_file=state)
        async with admin.client() as http:
            assert (await http.put("/apis/chat", json=api_body(echo_url, "chat"))).is_success
            assert (await http.delete("/apis/other")).is_success
            assert (await http.patch("/apis/echo", json={"idle_timeout": 7})).is_success
            assert (await http.put("/products/gold", json={})).is_success
            sub = {"scope": "gold", "primary_key": KEY}
            assert (await http.put("/subscriptions/s1", json=sub)).is_success
        first.cancel_scope.cancel()

    saved = json.loads(state.read_text())
    assert saved["format"] == 1
    assert saved["apis"]["other"] is None
    assert saved["apis"]["chat"] == {"name": "chat", **api_body(echo_url, "chat")}
    assert saved["apis"]["echo"]["idle_timeout"] == 7
    assert stat.S_IMODE(state.stat().st_mode) == 0o600  # it holds subscription keys
    assert [n for n in os.listdir(tmp_path) if n.startswith(".state")] == []  # no temporaries

    async with trio.open_nursery() as second:
        # A new process: the config file is the initial set, the state file overrides it.
        admin = await start_admin(second, wsgate.load_config(config_file), state_file=state)
        config = admin.gateway.config
        assert [api.name for api in config.apis] == ["echo", "chat"]
        assert config.apis[0].idle_timeout == 7
        assert config.subscriptions[0].primary_key == KEY
        assert await status_of(admin.port, "/chat") == 101
        assert await status_of(admin.port, "/other") == 404
        async with admin.client() as http:
            names = [api["name"] for api in (await http.get("/apis")).json()["apis"]]
            assert names == ["echo", "chat"]
        second.cancel_scope.cancel()


async def test_a_state_file_that_does_not_fit_stops_startup(echo_url: str, tmp_path: Path) -> None:
    config_file = write_config(tmp_path / "gw.toml", echo_url, "echo")
    state = tmp_path / "state.json"
    state.write_text(
        json.dumps(
            {"format": 1, "apis": {"chat": {**api_body(echo_url, "chat"), "products": ["gone"]}}}
        )
    )
    gateway = wsgate.Gateway(wsgate.load_config(config_file))
    settings = AdminConfig(listen=Listen(host="127.0.0.1", port=0), token=None, state_file=state)
    async with trio.open_nursery() as nursery:
        with pytest.raises(ConfigError) as caught:
            await nursery.start(serve_admin, gateway, settings)
    problems = caught.value.problems
    assert problems[0] == f"{state}: apis.chat.products[0]: unknown product 'gone'"
    assert "move the state file away" in problems[-1]
    state.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_state(state)
    state.write_text('{"format": 2, "apis": []}')
    with pytest.raises(ConfigError) as layout:
        read_state(state)
    assert len(layout.value.problems) == 2


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    write_atomic(state, b"{}")
    (tmp_path / ".state.json.abc123.tmp").write_bytes(b"half a wri")
    (tmp_path / "unrelated.tmp").write_bytes(b"")
    remove_stale_temporaries(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "unrelated.tmp"]


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from wsgate.admin.state import dump_state, read_state, write_atomic

    path = Path(sys.argv[1])
    seq = read_state(path)["apis"].get("a", {"seq": 0})["seq"]
    pad = "x" * 256 * 1024  # big enough for kills to land mid-write
    while True:
        seq += 1
        overrides = {"apis": {"a": {"seq": seq, "pad": pad}}, "products": {}, "subscriptions": {}}
        write_atomic(path, dump_state(overrides))
        print(seq, flush=True)  # acknowledged: the write returned
    """
)


@pytest.mark.deadline(60)
async def test_kill_9_during_writes_never_corrupts_the_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    rng = random.Random(4)
    acknowledged = 0
    for _ in range(8):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", WRITER, str(state)],
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        output = b""
        while b"\n" not in output:  # it is writing
            chunk = await process.stdout.receive_some()
            assert chunk, "writer died"
            output += chunk
        await trio.sleep(rng.uniform(0, 0.05))
        os.kill(process.pid, signal.SIGKILL)
        while chunk := await process.stdout.receive_some():
            output += chunk
        await process.wait()
        await process.stdout.aclose()
        lines = output.decode().split()
        acknowledged = int(lines[-1])
        # Either the last acknowledged state or the one being written when killed.
        seq = read_state(state)["apis"]["a"]["seq"]  # parses: never a torn file
        assert acknowledged <= seq <= acknowledged + 1
        remove_stale_temporaries(state)
    assert acknowledged > 8


async def test_a_failed_write_changes_nothing(
    nursery: trio.Nursery, echo_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    config = wsgate.parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0"},
            "apis": [{"name": "echo", "path": "echo", "service_url": echo_url}],
        }
    )
    admin = await start_admin(nursery, config, state_file=directory / "state.json")
    directory.rmdir()  # the next write cannot create its temporary file
    async with admin.client() as http:
        response = await http.put("/apis/chat", json=api_body(echo_url, "chat"))
        assert response.status_code == 500
        assert "cannot write the state file" in response.json()["errors"][0]["message"]
        assert [api.name for api in admin.gateway.config.apis] == ["echo"]
        assert (await http.get("/apis/chat")).status_code == 404

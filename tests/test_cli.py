"""The ``wsgate`` command: real processes, real sockets on 127.0.0.1, JSON logs on stdout."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from wsgate.cli import main

from .helpers import RawClient, echo_and_close

WSGATE = Path(sys.executable).with_name("wsgate")  # the console script of this venv
ROOT = Path(__file__).resolve().parent.parent

GOOD_CONFIG = """\
[gateway]
listen = "127.0.0.1:8080"
drain_timeout = 5

[[apis]]
name = "echo"
path = "echo"
service_url = "{service_url}"
"""

BAD_CONFIG = """\
[gateway]
listen = "nowhere"
max_connections = 0
handshake_timout = 5

[[apis]]
name = "Bad Name"
path = "echo"
service_url = "http://example.com"
"""

#: (key, part of the reason) of every problem in BAD_CONFIG.
BAD_CONFIG_PROBLEMS = [
    ("gateway.listen", "expected 'host:port'"),
    ("gateway.max_connections", "must be >= 1, got 0"),
    ("gateway.handshake_timout", "unknown key (did you mean 'handshake_timeout'?)"),
    ("apis[0].name", "invalid name 'Bad Name'"),
    ("apis[0].service_url", "scheme must be ws or wss, got 'http'"),
]


def free_port() -> int:
    """A port nothing listens on right now (for a backend the test cannot start on port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def run_wsgate(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(10):
        return await trio.run_process(
            [str(WSGATE), *args], capture_stdout=True, capture_stderr=True, check=False
        )


class Running:
    """A running ``wsgate`` process whose stdout is read line by line as JSON records."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        assert process.stdout is not None
        self._stdout = process.stdout
        self._pending = b""
        self.records: list[dict[str, Any]] = []

    async def _read_line(self) -> bytes | None:
        while b"\n" not in self._pending:
            chunk = await self._stdout.receive_some(65536)
            if not chunk:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    async def next_record(self) -> dict[str, Any] | None:
        """The next stdout line, which must be a JSON object; None at end of output."""
        line = await self._read_line()
        if line is None:
            return None
        record = json.loads(line)  # every stdout line is JSON
        assert isinstance(record, dict), line
        self.records.append(record)
        return record

    async def wait_for(self, event: str, timeout: float = 5) -> dict[str, Any]:
        """Read records until one with ``event``; return it."""
        with trio.fail_after(timeout):
            while (record := await self.next_record()) is not None:
                if record["event"] == event:
                    return record
        raise AssertionError(f"wsgate exited before logging {event!r}: {self.records}")

    async def read_to_end(self) -> None:
        with trio.fail_after(5):
            while await self.next_record() is not None:
                pass

    def events(self, event: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record["event"] == event]

    async def exit_code(self, timeout: float = 5) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        data = bytearray()
        with trio.fail_after(5):
            while chunk := await self.process.stderr.receive_some(65536):
                data += chunk
        return data.decode()


@asynccontextmanager
async def wsgate(*args: str) -> AsyncIterator[Running]:
    """Start ``wsgate *args``; on the way out kill it if it still runs, and reap it."""
    process = await trio.lowlevel.open_process(
        [str(WSGATE), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield Running(process)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# -- help --------------------------------------------------------------------------------


async def test_help_lists_the_subcommands() -> None:
    done = await run_wsgate("--help")
    assert done.returncode == 0
    out = done.stdout.decode()
    for word in ("serve", "check", "echo-server", "demo", "--version"):
        assert word in out


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("serve", ["--config", "--listen", "--pretty", "--log-level", "SIGTERM"]),
        ("check", ["file", "--config"]),
        ("echo-server", ["--listen", "127.0.0.1:9000"]),
        ("demo", ["--config", "--pretty", "--log-level", "demo.toml"]),
    ],
)
def test_subcommand_help_mentions_its_options(
    command: str, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: wsgate {command}")
    for option in options:
        assert option in out


# -- check -------------------------------------------------------------------------------


async def test_check_accepts_good_files(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD_CONFIG.format(service_url="ws://127.0.0.1:9000/echo"))
    # An unsupported policy at global scope is kept but skipped: valid, with a warning.
    skipping = tmp_path / "skipping.toml"
    skipping.write_text('[gateway]\npolicies = [{ policy = "cors" }]\n')
    demo = ROOT / "wsgate" / "demo.toml"
    results: dict[Path, subprocess.CompletedProcess[bytes]] = {}

    async def check(path: Path) -> None:
        results[path] = await run_wsgate("check", str(path))

    async with trio.open_nursery() as nursery:  # three processes at once: ~1 s, not 3
        for path in (good, skipping, demo):
            nursery.start_soon(check, path)

    for path, apis in ((good, "1 API"), (skipping, "0 APIs"), (demo, "1 API")):
        done = results[path]
        assert done.returncode == 0, done.stderr
        listen = "127.0.0.1:8080"
        assert done.stdout.decode() == f"{path}: OK ({apis}, listening on {listen})\n"
    assert results[good].stderr == results[demo].stderr == b""
    assert results[skipping].stderr.decode() == (
        f"{skipping}: warning: policy 'cors' (global scope) is not supported by the "
        "onHandshake operation; it is skipped at run time\n"
    )


async def test_check_takes_the_file_as_serve_does_too(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD_CONFIG.format(service_url="ws://127.0.0.1:9000/echo"))
    done = await run_wsgate("check", "--config", str(good))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"{good}: OK (1 API, listening on 127.0.0.1:8080)\n"


@pytest.mark.parametrize("argv", [["check"], ["check", "a.toml", "--config", "b.toml"]])
def test_check_wants_the_file_exactly_once(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "give the config file once, as FILE or --config FILE" in capsys.readouterr().err


async def test_check_names_file_key_and_reason_of_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(BAD_CONFIG)
    done = await run_wsgate("check", str(config))
    assert done.returncode == 1
    assert done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == len(BAD_CONFIG_PROBLEMS), lines
    for line, (key, reason) in zip(lines, BAD_CONFIG_PROBLEMS, strict=True):
        assert line.startswith(f"{config}: {key}: "), line
        assert reason in line


# -- serve -------------------------------------------------------------------------------


async def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(BAD_CONFIG)
    done = await run_wsgate("serve", "--config", str(config))
    assert done.returncode == 1
    assert done.stdout == b""  # it never started
    errors = done.stderr.decode()
    for key, reason in BAD_CONFIG_PROBLEMS:
        assert f"{config}: {key}: " in errors and reason in errors


async def test_serve_reports_a_busy_port_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "good.toml"
    config.write_text(GOOD_CONFIG.format(service_url="ws://127.0.0.1:9000/echo"))
    with trio.socket.socket() as busy:
        await busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = await run_wsgate("serve", "--config", str(config), "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.decode() == (
        f"wsgate: cannot start the gateway on 127.0.0.1:{port}: Address already in use\n"
    )


async def test_serve_relays_logs_json_and_drains_on_sigterm(tmp_path: Path, echo_url: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(GOOD_CONFIG.format(service_url=echo_url))
    async with wsgate("serve", "--config", str(config), "--listen", "127.0.0.1:0") as gw:
        started = await gw.wait_for("gateway_started")
        [address] = started["addresses"]
        port = port_of(address)
        assert port != 0 and started["apis"] == ["echo"]

        async with open_websocket_url(f"ws://127.0.0.1:{port}/echo/room/1") as ws:
            await ws.send_message("through the gateway process")
            assert await ws.get_message() == "through the gateway process"
        await gw.wait_for("disconnect")

        # A pair still open when SIGTERM arrives is closed with 1001.
        client = await RawClient.connect(port, "/echo")
        try:
            assert client.response is not None and client.response.status == 101
            await gw.wait_for("handshake")
            gw.process.send_signal(signal.SIGTERM)
            with trio.fail_after(5):
                assert await client.receive_close() == (1001, "gateway shutting down")
            await client.close(1001)
        finally:
            await client.aclose()
        assert await gw.exit_code() == 0
        await gw.read_to_end()

    handshakes = gw.events("handshake")
    assert [h["response_code"] for h in handshakes] == [101, 101]
    assert [h["url"] for h in handshakes] == ["/echo/room/1", "/echo"]
    assert all(h["is_request_success"] is True for h in handshakes)
    first, second = gw.events("disconnect")
    assert first["closed_by"] == "client" and first["messages_from_client"] == 1
    assert (second["end"], second["close_code"], second["closed_by"]) == ("drain", 1001, "gateway")
    [received] = gw.events("signal_received")
    assert received["signal"] == "SIGTERM"
    assert gw.events("drain_started")[0]["open_pairs"] == 1
    assert gw.records[-1]["event"] == "drain_finished"
    assert all(record["level"] in ("info", "warning") for record in gw.records)


async def connect_when_listening(port: int) -> RawClient:
    """A handshake with the gateway on ``port``, retried until it listens (no log says so)."""
    with trio.fail_after(10):
        while True:
            try:
                return await RawClient.connect(port, "/echo")
            except OSError:
                await trio.sleep(0.05)


async def test_log_level_warning_drops_connection_records_and_keeps_problems(
    tmp_path: Path, echo_url: str
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(GOOD_CONFIG.format(service_url=echo_url))
    port = free_port()
    async with wsgate(
        "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}", "--log-level", "warning"
    ) as gw:
        client = await connect_when_listening(port)
        try:
            assert client.response is not None and client.response.status == 101
            await client.send_binary(b"quiet")
            assert [frame.payload for frame in await client.receive_frames(1)] == [b"quiet"]
            await client.close(1000)
            assert (await client.receive_close())[0] == 1000
        finally:
            await client.aclose()
        # A problem is still logged: a config file that no longer parses, re-read on SIGHUP.
        config.write_text("[gateway\n")
        gw.process.send_signal(signal.SIGHUP)
        failed = await gw.wait_for("config_reload_failed")
        assert failed["level"] == "warning"
        gw.process.send_signal(signal.SIGTERM)
        assert await gw.exit_code() == 0
        await gw.read_to_end()
    # Neither the pair's handshake and disconnect nor the start and drain notices.
    assert [record["event"] for record in gw.records] == ["config_reload_failed"]


# -- echo-server and demo ----------------------------------------------------------------


async def test_echo_server_echoes_and_stops_on_sigterm() -> None:
    async with wsgate("echo-server", "--listen", "127.0.0.1:0") as echo:
        started = await echo.wait_for("echo_server_started")
        assert started["url"] == f"ws://127.0.0.1:{started['port']}"
        async with open_websocket_url(f"{started['url']}/any/path") as ws:
            await ws.send_message(b"\x00binary\xff")
            assert await ws.get_message() == b"\x00binary\xff"
        echo.process.send_signal(signal.SIGTERM)
        assert await echo.exit_code() == 0


async def test_demo_starts_backend_and_gateway_and_echoes(tmp_path: Path) -> None:
    config = tmp_path / "demo.toml"
    backend_port = free_port()
    config.write_text(
        GOOD_CONFIG.replace("127.0.0.1:8080", "127.0.0.1:0").format(
            service_url=f"ws://127.0.0.1:{backend_port}/echo"
        )
    )
    async with wsgate("demo", "--config", str(config)) as demo:
        backend = await demo.wait_for("echo_server_started")
        assert backend["port"] == backend_port
        [address] = (await demo.wait_for("gateway_started"))["addresses"]
        url = f"ws://127.0.0.1:{port_of(address)}/echo"
        async with open_websocket_url(url) as ws:
            await ws.send_message("demo")
            assert await ws.get_message() == "demo"
        handshake = await demo.wait_for("handshake")
        assert handshake["response_code"] == 101
        assert handshake["backend_url"] == f"ws://127.0.0.1:{backend_port}/echo"
        demo.process.send_signal(signal.SIGTERM)
        assert await demo.exit_code() == 0
        assert f"python -m websockets {url}" in await demo.stderr()


def test_the_wheel_carries_the_demo_config_and_the_console_page(tmp_path: Path) -> None:
    """`wsgate demo` and the web console must work from an installed wheel, not only a checkout."""
    # Built from a copy: setuptools would otherwise reuse a stale build/ directory.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "wsgate", source / "wsgate", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("wsgate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "wsgate/demo.toml" in names
    assert "wsgate/py.typed" in names
    assert any(name.startswith("wsgate/console_web/") for name in names)


async def test_serve_keeps_relaying_when_stdout_loses_its_reader(
    tmp_path: Path, echo_url: str
) -> None:
    # `wsgate serve | head -1`, or a log shipper that died: every log write
    # fails with EPIPE. The records are dropped (stderr says so once), the
    # connections that logged them are unharmed, and SIGTERM still exits 0.
    config = tmp_path / "gateway.toml"
    config.write_text(GOOD_CONFIG.format(service_url=echo_url))
    async with wsgate("serve", "--config", str(config), "--listen", "127.0.0.1:0") as gw:
        [address] = (await gw.wait_for("gateway_started"))["addresses"]
        assert gw.process.stdout is not None
        await gw.process.stdout.aclose()  # nobody reads the log any more
        for i in range(3):
            await echo_and_close(port_of(address), f"still relayed {i}")
        gw.process.send_signal(signal.SIGTERM)
        assert await gw.exit_code() == 0
        stderr = await gw.stderr()
    assert stderr.count("wsgate: dropping log records: stdout:") == 1, stderr
    assert "Traceback" not in stderr


async def test_serve_freezes_what_start_up_made_out_of_the_collectors_sight(
    tmp_path: Path, echo_url: str
) -> None:
    # A full garbage collection walks every tracked object: with start-up's
    # modules, config and clients frozen it walks only what connections make
    # (one at a time, p99 of a handshake went from 6.7 to 3.5-3.8 ms; cluster.md).
    config = tmp_path / "gateway.toml"
    config.write_text(GOOD_CONFIG.format(service_url=echo_url))
    args = ("serve", "--config", str(config), "--listen", "127.0.0.1:0", "--log-level", "debug")
    async with wsgate(*args) as gw:
        frozen = await gw.wait_for("startup_objects_frozen")  # logged after gateway_started
        assert frozen["objects"] > 10_000  # the modules alone are tens of thousands
        [started] = gw.events("gateway_started")
        [address] = started["addresses"]
        await echo_and_close(port_of(address), "after the freeze")
        gw.process.send_signal(signal.SIGTERM)
        assert await gw.exit_code() == 0

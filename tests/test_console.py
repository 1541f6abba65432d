"""``wsgate console``: real processes against a real gateway and backend on 127.0.0.1.

The scripted mode runs as plain subprocesses; the interactive mode runs in a
pseudo-terminal driven by pexpect, as a user would type into it. The
processes of a test run concurrently, to keep the suite fast.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import pexpect  # type: ignore[import-untyped]
import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

import wsgate
from wsgate import cli
from wsgate.config import parse_config
from wsgate.console import SUBSCRIPTION_KEY_HEADER, build_parser, parse_payload
from wsgate.console import main as console_main

from .helpers import wait_until

KEY = "gold-key-0123456789-abcdef"
STAMP = r"\d\d:\d\d:\d\d\.\d{3}"


def console_command() -> list[str]:
    """``wsgate console`` once cli.py has the command, else ``python -m wsgate.console``."""
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and "console" in action.choices:
            return [str(Path(sys.executable).with_name("wsgate")), "console"]
    return [sys.executable, "-m", "wsgate.console"]


CONSOLE = console_command()


async def backend(request: WebSocketRequest) -> None:
    """Echo, except that "close-me" makes it close with 4001."""
    offered = request.proposed_subprotocols
    ws = await request.accept(subprotocol=offered[0] if offered else None)
    try:
        while True:
            message = await ws.get_message()
            if message == "close-me":
                await ws.aclose(4001, "bye from backend")
                return
            await ws.send_message(message)
    except ConnectionClosed:
        pass


@attrs.define
class Recorder:
    handshakes: list[Mapping[str, Any]] = attrs.Factory(list)
    disconnects: list[Mapping[str, Any]] = attrs.Factory(list)

    def handshake(self, record: Mapping[str, Any]) -> None:
        self.handshakes.append(dict(record))

    def disconnect(self, pair: Any, record: Mapping[str, Any]) -> None:
        self.disconnects.append(dict(record))


@attrs.define
class Setup:
    url: str  # ws://127.0.0.1:PORT
    gateway: wsgate.Gateway
    recorder: Recorder
    backend_url: str


async def start(nursery: trio.Nursery) -> Setup:
    """The backend, and a gateway with an open API, a check-header one and a keyed one."""
    server = await nursery.start(serve_websocket, backend, "127.0.0.1", 0, None)
    backend_url = f"ws://127.0.0.1:{server.port}/ws"
    config = parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0"},
            "apis": [
                {"name": "echo", "path": "echo", "service_url": backend_url},
                {
                    "name": "tenant",
                    "path": "tenant",
                    "service_url": backend_url,
                    "policies": [
                        {"policy": "check-header", "name": "X-Tenant", "values": ["acme"]}
                    ],
                },
                {"name": "keyed", "path": "gold", "service_url": backend_url, "products": ["gold"]},
            ],
            "products": [{"id": "gold"}],
            "subscriptions": [{"id": "s1", "scope": "gold", "primary_key": KEY}],
        }
    )
    recorder = Recorder()
    gateway = await nursery.start(wsgate.Gateway(config, observers=[recorder]).run)
    return Setup(gateway.url, gateway, recorder, backend_url)


async def start_tls(nursery: trio.Nursery, backend_url: str, directory: Path) -> tuple[str, Path]:
    """A wss:// gateway with a certificate from a test CA: its URL and the CA's PEM file."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key, ca_file = directory / "chain.pem", directory / "key.pem", directory / "ca.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    config = parse_config(
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "tls": {"certificate": str(chain), "private_key": str(key)},
            },
            "apis": [{"name": "echo", "path": "echo", "service_url": backend_url}],
        }
    )
    gateway = await nursery.start(wsgate.Gateway(config).run)
    return gateway.url, ca_file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- scripted mode ------------------------------------------------------------------------


async def test_scripted_mode(nursery: trio.Nursery, tmp_path: Path) -> None:
    setup = await start(nursery)
    url = setup.url
    tls_url, ca_file = await start_tls(nursery, setup.backend_url, tmp_path)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"\x00\xff")
    runs: dict[str, list[str]] = {
        "json": [f"{url}/echo", "-q", "greeting=hi there", "--subprotocol", "chat",
                 "--send", "hello", "--send-binary", "hex:0a0b", "--send-binary", f"@{payload}",
                 "--expect", "3", "--json"],
        "refused": [f"{url}/tenant", "--send", "hi", "--expect", "1"],
        "header": [f"{url}/tenant", "-H", "X-Tenant: acme", "--send", "hello",
                   "--send-binary", "base64:AAEC", "--expect", "2"],
        "key": [f"{url}/gold", "--subscription-key", KEY, "--send", "hi", "--expect", "1"],
        "closed-early": [f"{url}/echo", "--send", "one", "--send", "close-me", "--expect", "3"],
        "timeout": [f"{url}/echo", "--send", "one", "--expect", "2", "--timeout", "2"],
        "wss": [f"{tls_url}/echo", "--ca-file", str(ca_file), "--send", "tls", "--expect", "1"],
        "wss-untrusted": [f"{tls_url}/echo", "--send", "tls"],
    }  # fmt: skip
    done: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(name: str, args: list[str]) -> None:
        with trio.fail_after(20):
            done[name] = await trio.run_process(
                [*CONSOLE, *args], capture_stdout=True, capture_stderr=True, check=False
            )

    async with trio.open_nursery() as runs_nursery:
        for name, args in runs.items():
            runs_nursery.start_soon(run, name, args)

    def result(name: str) -> tuple[int, list[str], str]:
        proc = done[name]
        return proc.returncode, proc.stdout.decode().splitlines(), proc.stderr.decode()

    # --json: one JSON line per message received, exit 0.
    code, out, err = result("json")
    assert code == 0, err
    records = [json.loads(line) for line in out]
    assert [(r["direction"], r["type"]) for r in records] == [("received", "text")] + [
        ("received", "binary")
    ] * 2
    assert records[0]["data"] == "hello"
    assert (records[1]["hex"], records[1]["length"]) == ("0a0b", 2)
    assert records[2]["hex"] == "00ff"
    assert all(r["timestamp"].endswith("Z") for r in records)
    assert "* connected: HTTP 101 Switching Protocols, subprotocol: chat" in err
    assert f"* connecting to {url}/echo?greeting=hi%20there" in err

    # A policy refuses the handshake: its HTTP status and body, exit 1.
    code, out, err = result("refused")
    assert code == 1 and out == []
    assert "wsgate console: the handshake was refused: HTTP 401 Unauthorized\n" in err
    assert '"message": "Missing or invalid header X-Tenant"' in err
    # With the header it needs: human-readable lines, timestamp, direction, type.
    code, out, err = result("header")
    assert code == 0, err
    assert len(out) == 2, out
    assert re.fullmatch(f"{STAMP} < text   hello", out[0]), out
    assert re.fullmatch(f"{STAMP} < binary 3 bytes: 000102", out[1]), out
    assert "* connected: HTTP 101 Switching Protocols, subprotocol: (none)" in err

    code, out, err = result("key")
    assert code == 0, err

    # The other side closes before the messages expected: exit 3, with its code and reason.
    code, out, err = result("closed-early")
    assert code == 3
    assert out[0].endswith("< text   one")
    assert (
        "the connection was closed by the other side after 1 of 3 expected messages: "
        '4001 (PRIVATE_RESERVED) "bye from backend"'
    ) in err

    code, out, err = result("timeout")
    assert code == 4
    assert "timed out after 2 s waiting for messages: received 1 of 2" in err

    # wss://: the CA given with --ca-file is trusted; without it, a clear message.
    code, out, err = result("wss")
    assert code == 0, err
    assert out[0].endswith("< text   tls")
    code, out, err = result("wss-untrusted")
    assert code == 1
    assert "wsgate console: TLS: the server's certificate is not trusted (" in err
    assert "use --ca-file PEM to trust its CA, or --insecure to skip the check" in err

    # What the gateway saw: the query, the subprotocol, the subscription.
    accepted = [r for r in setup.recorder.handshakes if r["response_code"] == 101]
    chat = next(r for r in accepted if r["subprotocol"] == "chat")
    assert parse_qs(urlsplit(chat["url"]).query) == {"greeting": ["hi there"]}
    assert [r["subscription_id"] for r in accepted if r["api_id"] == "keyed"] == ["s1"]
    refused = sorted((r["api_id"], r["response_code"]) for r in setup.recorder.handshakes)
    assert [r for r in refused if r[1] != 101] == [("tenant", 401)]
    # Every client the console opened and ended itself was closed with 1000.
    with trio.fail_after(5):
        await wait_until(lambda: len(setup.recorder.disconnects) == 5)
    codes = sorted(r["close_code"] for r in setup.recorder.disconnects)
    assert codes == [1000, 1000, 1000, 1000, 4001], setup.recorder.disconnects


def test_cannot_connect(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listens, or not a WebSocket URL: a message, exit 1 or 2 (in this process)."""
    port = free_port()
    assert console_main([f"ws://127.0.0.1:{port}/echo", "--send", "hi"]) == 1
    err = capsys.readouterr().err
    assert f"wsgate console: cannot connect to 127.0.0.1:{port}: Connection refused" in err
    assert console_main([f"http://127.0.0.1:{port}/echo"]) == 2
    assert "expected a ws:// or wss:// URL, got 'http://" in capsys.readouterr().err
    assert console_main([f"ws://127.0.0.1:{port}/echo", "--insecure"]) == 2
    assert "apply to wss:// URLs only" in capsys.readouterr().err


# --- interactive mode ---------------------------------------------------------------------


def spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(CONSOLE[0], [*CONSOLE[1:], *args], encoding="utf-8", timeout=10)
    return child


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    status: int = child.exitstatus
    return status


def typing_session(url: str) -> int:
    """Connect, send text and binary, ping, close with a code and reason."""
    child = spawn(f"{url}/echo", "--subprotocol", "chat", "-q", "k=v")
    child.expect_exact(f"* connecting to {url}/echo?k=v")
    child.expect_exact("* connected: HTTP 101 Switching Protocols, subprotocol: chat")
    child.expect_exact("Ctrl-D disconnects")
    child.sendline("hello there")
    child.expect(f"{STAMP} > text   hello there")
    child.expect(f"{STAMP} < text   hello there")
    child.sendline("/binary hex:de ad be ef")
    child.expect(f"{STAMP} < binary 4 bytes: deadbeef")
    child.sendline("//slash")
    child.expect(f"{STAMP} < text   /slash")
    child.sendline("/binary nonsense")
    child.expect_exact("* /binary: expected hex:DIGITS, base64:DATA or @FILE")
    child.sendline("/ping abc")
    child.expect(f"{STAMP} > ping   3 bytes: 616263")
    child.expect(rf"{STAMP} < pong   \(\d+\.\d ms\)")
    child.sendline("/help")
    child.expect_exact("/close [CODE] [REASON]")
    child.sendline("/close 4000 all done")
    child.expect(f'{STAMP} > close  4000 "all done"')
    child.expect_exact("* disconnected")
    return finish(child)


def ctrl_d_session(url: str) -> int:
    child = spawn(f"{url}/gold", "--subscription-key", KEY)
    child.expect_exact("Ctrl-D disconnects")
    child.sendline("keyed")
    child.expect(f"{STAMP} < text   keyed")
    child.sendeof()
    child.expect_exact("* end of input: closing")
    child.expect(f"{STAMP} > close  1000")
    child.expect_exact("* disconnected")
    return finish(child)


def server_close_session(url: str) -> int:
    """The backend closes: the console shows its code and reason and exits 3."""
    child = spawn(f"{url}/echo")
    child.expect_exact("Ctrl-D disconnects")
    child.sendline("close-me")
    child.expect(f'{STAMP} < close  4001 \\(PRIVATE_RESERVED\\) "bye from backend"')
    child.expect_exact("* the connection was closed by the other side")
    return finish(child)


async def test_interactive_mode_in_a_pty(nursery: trio.Nursery) -> None:
    setup = await start(nursery)
    sessions: dict[str, Callable[[str], int]] = {
        "typing": typing_session,
        "ctrl-d": ctrl_d_session,
        "server-close": server_close_session,
    }
    status: dict[str, int] = {}

    async def run(name: str, session: Callable[[str], int]) -> None:
        status[name] = await trio.to_thread.run_sync(session, setup.url)

    async with trio.open_nursery() as sessions_nursery:
        for name, session in sessions.items():
            sessions_nursery.start_soon(run, name, session)
    assert status == {"typing": 0, "ctrl-d": 0, "server-close": 3}

    with trio.fail_after(5):
        await wait_until(lambda: len(setup.recorder.disconnects) == 3)
    ends = {
        r["api_id"] + ":" + str(r["close_code"]): r["closed_by"] for r in setup.recorder.disconnects
    }
    assert ends == {"echo:4000": "client", "keyed:1000": "client", "echo:4001": "backend"}, ends
    accepted = [r for r in setup.recorder.handshakes if r["response_code"] == 101]
    assert sorted((r["api_id"], r["subprotocol"] or "") for r in accepted) == [
        ("echo", ""),
        ("echo", "chat"),
        ("keyed", ""),
    ]


# --- units --------------------------------------------------------------------------------


def test_payload_specs(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"\x01\x02")
    assert parse_payload("hex:0a 0B") == b"\n\x0b"
    assert parse_payload("base64:AAEC") == b"\x00\x01\x02"
    assert parse_payload(f"@{tmp_path / 'f.bin'}") == b"\x01\x02"
    for bad, message in [
        ("hex:0a0", "not hex digits"),
        ("base64:!!", "not valid base64"),
        ("@/nonexistent/file", "cannot read /nonexistent/file"),
        ("0a0b", "expected hex:DIGITS, base64:DATA or @FILE"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_payload(bad)


def test_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["ws://h/x", "-H", "A: 1", "-H", "B:2", "-q", "k=v", "--send", "t", "--send-binary",
         "hex:00", "--subscription-key", "s"]
    )  # fmt: skip
    assert args.headers == [("A", "1"), ("B", "2")]
    assert args.queries == [("k", "v")]
    assert args.sends == ["t", b"\x00"]
    assert args.subscription_key == "s"
    for bad in (
        ["ws://h/x", "-H", "no colon"],
        ["ws://h/x", "-q", "novalue"],
        ["ws://h/x", "--insecure", "--ca-file", "x"],
        ["ws://h/x", "--expect", "-1"],
    ):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(bad)
        assert exited.value.code == 2
    out = capsys.readouterr()
    assert "expected 'Name: value'" in out.err
    assert SUBSCRIPTION_KEY_HEADER == "Ocp-Apim-Subscription-Key"

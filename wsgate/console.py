"""``wsgate console URL``: try a WebSocket API from the terminal (docs/console.md).

Two modes, on trio-websocket:

* **interactive** (the default): prints the handshake result, sends each line
  typed as a text message, understands a few ``/commands`` (binary payloads,
  ping, close), and prints every message received with a timestamp. Ctrl-D
  closes the connection with 1000.
* **scripted** (``--send``/``--send-binary``/``--expect``/``--json``): sends the
  payloads in order, waits for ``--expect N`` messages, prints them (JSON lines
  with ``--json``) and exits 0, or exits non-zero with a message on stderr.

The web console's server side (its page and the two endpoints it calls on
the admin listener) is :mod:`wsgate.admin.console_routes`.

Exit status: 0 success; 1 the connection could not be opened (the handshake was
refused, the host is unreachable, TLS failed) or a payload is invalid; 2 bad
command line; 3 the other side closed the connection (before ``--expect``
messages arrived, or during an interactive session); 4 ``--timeout`` ran out
waiting for messages; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime
import json
import os
import re
import ssl
import sys
import time
from collections.abc import AsyncGenerator, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

import attrs
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from .logs import utc_now

__all__ = [
    "EXIT_CLOSED",
    "EXIT_CONNECT",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "SUBSCRIPTION_KEY_HEADER",
    "add_parser",
    "build_parser",
    "main",
    "parse_payload",
    "run",
]

EXIT_OK = 0
EXIT_CONNECT = 1
EXIT_USAGE = 2
EXIT_CLOSED = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130

#: The header ``--subscription-key`` sets (the gateway's default key header).
SUBSCRIPTION_KEY_HEADER = "Ocp-Apim-Subscription-Key"

#: Largest message accepted (the gateway's default limit).
MAX_MESSAGE = 16 * 1024 * 1024

#: Bytes of a binary message shown as hex in the human-readable output.
HEX_SHOWN = 64

#: Characters of a refused handshake's body printed.
BODY_SHOWN = 2000

#: Seconds the console waits for the other side's close frame when it closes.
CLOSE_TIMEOUT = 5.0

#: An HTTP token (RFC 9110), e.g. a header name or a subprotocol.
HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

HELP = """\
Commands (anything else is sent as a text message):
  /binary hex:48656c6c6f    send a binary message given in hex
  /binary base64:SGVsbG8=   ... in base64
  /binary @FILE             ... read from a file
  /text TEXT, //TEXT        send TEXT as is (text starting with "/")
  /ping [DATA]              send a ping (DATA as UTF-8) and show the pong
  /close [CODE] [REASON]    close the connection (default 1000) and exit
  /help                     this help
Ctrl-D closes the connection with 1000 and exits."""


class ConsoleError(Exception):
    """Something to report on stderr before exiting with ``status``."""

    def __init__(self, message: str, status: int = EXIT_CONNECT) -> None:
        super().__init__(message)
        self.status = status


# --- command line ------------------------------------------------------------------------


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not HTTP_TOKEN.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    if any(ch in value for ch in "\r\n\0"):
        raise argparse.ArgumentTypeError(f"header value of {name} contains a line break")
    return name, value


def _query(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected 'key=value', got {text!r}")
    return key, value


def _payload(text: str) -> bytes:
    try:
        return parse_payload(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of messages >= 0, got {text!r}")
    return int(text)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url", metavar="URL", help="ws:// or wss:// URL, e.g. ws://127.0.0.1:8080/echo"
    )
    parser.add_argument(
        "-H",
        "--header",
        dest="headers",
        action="append",
        type=_header,
        default=[],
        metavar='"NAME: VALUE"',
        help="send this header with the handshake (repeatable)",
    )
    parser.add_argument(
        "-q",
        "--query",
        dest="queries",
        action="append",
        type=_query,
        default=[],
        metavar="KEY=VALUE",
        help="add this query parameter to the URL, percent-encoded (repeatable)",
    )
    parser.add_argument(
        "--subprotocol",
        dest="subprotocols",
        action="append",
        default=[],
        metavar="NAME",
        help="offer this subprotocol, in order of preference (repeatable)",
    )
    parser.add_argument(
        "--subscription-key",
        metavar="KEY",
        help=f"send this subscription key in the {SUBSCRIPTION_KEY_HEADER} header "
        "(for an API using another header or the query, use -H or -q)",
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help="wss://: trust the CA certificates in this file instead of the system's",
    )
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="wss://: do not verify the server's certificate (testing only)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="give up opening the connection after this long (default %(default)s)",
    )
    script = parser.add_argument_group(
        "scripted mode",
        "Any of these runs without a prompt: send the payloads in order, wait for "
        "--expect messages, print them, close with 1000 and exit.",
    )
    script.add_argument(
        "--send",
        dest="sends",
        action="append",
        default=[],
        metavar="TEXT",
        help="send TEXT as a text message (repeatable)",
    )
    script.add_argument(
        "--send-binary",
        dest="sends",
        action="append",
        type=_payload,
        metavar="hex:..|base64:..|@FILE",
        help="send a binary message (repeatable; keeps its place among the --send)",
    )
    script.add_argument(
        "--expect",
        type=_count,
        metavar="N",
        help="wait for N messages after sending (default 0)",
    )
    script.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="fail if the expected messages have not all arrived by then (default %(default)s)",
    )
    script.add_argument(
        "--json",
        action="store_true",
        help="print each message received as a JSON line",
    )


DESCRIPTION = (
    "Open a WebSocket connection and try the API: interactively (type lines to send "
    "them, /help for commands, Ctrl-D to disconnect) or scripted (--send, --expect, "
    "--json). Exit status: 0 ok, 1 the connection could not be opened (e.g. the "
    "handshake was refused: its HTTP status and body are printed), 3 the other side "
    "closed the connection early, 4 timed out waiting for messages."
)


def add_parser(subparsers: Any) -> None:
    """Add the ``console`` command to ``wsgate``'s subparsers (``run`` handles it)."""
    parser = subparsers.add_parser(
        "console",
        help="a WebSocket client to try an API from the terminal",
        description=DESCRIPTION,
    )
    _add_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m wsgate.console`` (the same options as ``wsgate console``)."""
    parser = argparse.ArgumentParser(prog="python -m wsgate.console", description=DESCRIPTION)
    _add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wsgate.console``."""
    return run(build_parser().parse_args(argv))


# --- payloads, URLs, TLS -----------------------------------------------------------------


def parse_payload(spec: str) -> bytes:
    """Bytes from ``hex:...`` (spaces allowed), ``base64:...`` or ``@FILE``; ValueError."""
    kind, sep, data = spec.partition(":")
    if spec.startswith("@"):
        path = Path(spec[1:]).expanduser()
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if sep and kind == "hex":
        try:
            return bytes.fromhex(data)
        except ValueError:
            raise ValueError(f"not hex digits (two per byte): {data!r}") from None
    if sep and kind == "base64":
        try:
            return base64.b64decode(data.strip(), validate=True)
        except binascii.Error:
            raise ValueError(f"not valid base64: {data!r}") from None
    raise ValueError(f"expected hex:DIGITS, base64:DATA or @FILE, got {spec!r}")


def _url(args: argparse.Namespace) -> str:
    url: str = args.url
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("ws", "wss") or not parts.netloc:
        raise ConsoleError(f"expected a ws:// or wss:// URL, got {url!r}", EXIT_USAGE)
    if parts.scheme.lower() == "ws" and (args.insecure or args.ca_file):
        raise ConsoleError("--insecure and --ca-file apply to wss:// URLs only", EXIT_USAGE)
    if args.queries:
        extra = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in args.queries)
        base, _, fragment = url.partition("#")
        url = base + ("&" if parts.query else "" if base.endswith("?") else "?") + extra
        if fragment:
            url += "#" + fragment
    return url


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if urlsplit(args.url).scheme.lower() != "wss":
        return None
    try:
        context = ssl.create_default_context(cafile=args.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConsoleError(f"cannot load --ca-file {args.ca_file}: {exc}") from None
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _headers(args: argparse.Namespace) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[str, str]] = list(args.headers)
    if args.subscription_key:
        headers.append((SUBSCRIPTION_KEY_HEADER, args.subscription_key))
    return [(name.encode(), value.encode()) for name, value in headers]


def _rejection(exc: ConnectionRejected) -> str:
    status = exc.status_code
    text = f"the handshake was refused: HTTP {status} {status_phrase(status)}".rstrip()
    body = (exc.body or b"").decode("utf-8", "replace").strip()
    if body:
        more = f"\n... ({len(body) - BODY_SHOWN} more characters)" if len(body) > BODY_SHOWN else ""
        text += f"\n{body[:BODY_SHOWN]}{more}"
    return text


def _connect_failure(netloc: str, exc: OSError) -> ConsoleError:
    # trio's "all attempts to connect failed" holds one error per address tried.
    tried = exc.__cause__
    errors = tried.exceptions if isinstance(tried, BaseExceptionGroup) else [exc]
    reasons = dict.fromkeys(describe_os_error(error) for error in errors)
    return ConsoleError(f"cannot connect to {netloc}: {'; '.join(reasons)}")


def _tls_failure(netloc: str, exc: BaseException) -> ConsoleError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConsoleError(
            f"TLS: the server's certificate is not trusted ({exc.verify_message}); "
            "use --ca-file PEM to trust its CA, or --insecure to skip the check"
        )
    return ConsoleError(f"TLS handshake with {netloc} failed: {exc or type(exc).__name__}")


def _only(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception in ``group`` (nested groups and Cancelled left out), else None."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


def describe_os_error(exc: BaseException) -> str:
    """A short human-readable cause of a failed connect ("Connection refused")."""
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # socket.gaierror: negative errno, its own message
    return str(exc) or type(exc).__name__


@attrs.frozen
class _Connect:
    url: str
    headers: list[tuple[bytes, bytes]]
    subprotocols: list[str]
    ssl_context: ssl.SSLContext | None
    timeout: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> _Connect:
        return cls(
            _url(args),
            _headers(args),
            list(args.subprotocols),
            _ssl_context(args),
            args.connect_timeout,
        )

    @property
    def netloc(self) -> str:
        return urlsplit(self.url).netloc.rpartition("@")[2]

    async def _stream(
        self, deadline: float
    ) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        """TCP, and TLS for wss://, handshaken here so that a TLS failure says so.

        (trio-websocket would only start TLS in its reader task, where a failure
        leaves the handshake waiting until the connect timeout.)
        """
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = parts.port or (443 if self.ssl_context is not None else 80)
        try:
            with trio.fail_at(deadline):
                tcp = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise ConsoleError(
                f"cannot connect to {self.netloc}: no answer within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise _connect_failure(self.netloc, exc) from None
        if self.ssl_context is None:
            return tcp
        stream = trio.SSLStream(tcp, self.ssl_context, server_hostname=host, https_compatible=True)
        try:
            with trio.fail_at(deadline):
                await stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            await trio.aclose_forcefully(tcp)
            if isinstance(exc, trio.TooSlowError):
                raise ConsoleError(
                    f"TLS handshake with {self.netloc}: no answer within {self.timeout:g} s"
                ) from None
            raise _tls_failure(self.netloc, exc.__cause__ or exc) from None
        return stream

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncGenerator[WebSocketConnection, None]:
        """The open WebSocket; closed with 1000 on the way out unless already closed.

        Raises ConsoleError when the connection cannot be opened (a refused
        handshake: its status and body).
        """
        deadline = trio.current_time() + self.timeout  # for TCP, TLS and the handshake
        stream = await self._stream(deadline)
        parts = urlsplit(self.url)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            async with stream, trio.open_nursery() as nursery:
                try:
                    with trio.fail_at(deadline):
                        ws = await wrap_client_stream(
                            nursery,
                            stream,
                            self.netloc,
                            resource,
                            subprotocols=self.subprotocols or None,
                            extra_headers=self.headers,
                            max_message_size=MAX_MESSAGE,
                        )
                except trio.TooSlowError:
                    raise ConsoleError(
                        f"no answer to the WebSocket handshake within {self.timeout:g} s"
                    ) from None
                try:
                    yield ws
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader task's errors (a refused handshake) and ours come out grouped.
            error = _only(group)
            if error is None:
                raise
            if isinstance(error, ConnectionRejected):
                raise ConsoleError(_rejection(error)) from None
            raise error from None


# --- output ------------------------------------------------------------------------------


def _clock() -> str:
    # Local wall-clock time for a person at the terminal; --json uses utc_now().
    return datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]


def _show_text(text: str) -> str:
    return text if text.isprintable() else json.dumps(text, ensure_ascii=False)[1:-1]


def _show_binary(data: bytes) -> str:
    shown = data[:HEX_SHOWN].hex()
    more = f" ... ({len(data) - HEX_SHOWN} more)" if len(data) > HEX_SHOWN else ""
    return f"{len(data)} bytes: {shown}{more}"


def describe_close(reason: CloseReason | None) -> str:
    """``1001 (GOING_AWAY) "server shutting down"``."""
    if reason is None:
        return "1006 (ABNORMAL_CLOSURE)"
    text = f"{reason.code} ({reason.name})"
    return f"{text} {json.dumps(reason.reason, ensure_ascii=False)}" if reason.reason else text


class _Printer:
    """Lines on stdout: ``HH:MM:SS.mmm < text hello``, or JSON lines."""

    def __init__(self, out: TextIO, *, json_lines: bool = False) -> None:
        self.out = out
        self.json_lines = json_lines

    def _line(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def message(self, direction: str, message: str | bytes) -> None:
        arrow = ">" if direction == "sent" else "<"
        if self.json_lines:
            record: dict[str, Any] = {"timestamp": utc_now(), "direction": direction}
            if isinstance(message, str):
                record.update(type="text", data=message)
            else:
                record.update(type="binary", length=len(message), hex=message.hex())
            self._line(json.dumps(record, ensure_ascii=False))
        elif isinstance(message, str):
            self._line(f"{_clock()} {arrow} text   {_show_text(message)}")
        else:
            self._line(f"{_clock()} {arrow} binary {_show_binary(message)}")

    def event(self, arrow: str, kind: str, detail: str) -> None:
        self._line(f"{_clock()} {arrow} {kind:<6} {detail}".rstrip())

    def status(self, text: str) -> None:
        self._line(f"* {text}")


def _note(text: str) -> None:
    print(f"* {text}", file=sys.stderr, flush=True)


def _handshake_result(ws: WebSocketConnection) -> str:
    return f"connected: HTTP 101 Switching Protocols, subprotocol: {ws.subprotocol or '(none)'}"


# --- the two modes -----------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run ``wsgate console`` with parsed ``args``; returns the exit status."""
    try:
        return trio.run(_main, args)
    except ConsoleError as exc:
        print(f"wsgate console: {exc}", file=sys.stderr, flush=True)
        return exc.status
    except KeyboardInterrupt:
        print("\nwsgate console: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _scripted(args: argparse.Namespace) -> bool:
    return bool(args.sends) or args.expect is not None or args.json


async def _main(args: argparse.Namespace) -> int:
    connect = _Connect.from_args(args)
    scripted = _scripted(args)
    say = _note if scripted else _Printer(sys.stdout).status
    say(f"connecting to {connect.url}")
    async with connect.connect() as ws:
        say(_handshake_result(ws))
        if scripted:
            return await _run_script(ws, args)
        return await _Interactive(ws, _Printer(sys.stdout)).run()


async def _run_script(ws: WebSocketConnection, args: argparse.Namespace) -> int:
    printer = _Printer(sys.stdout, json_lines=args.json)
    expect: int = args.expect or 0
    received = 0
    try:
        for payload in args.sends:
            await ws.send_message(payload)
            _note(f"sent {_describe(payload)}")
        with trio.move_on_after(args.timeout) as waiting:
            while received < expect:
                printer.message("received", await ws.get_message())
                received += 1
    except ConnectionClosed as exc:
        raise ConsoleError(
            f"the connection was closed by the other side after {received} of {expect} "
            f"expected messages: {describe_close(exc.reason)}",
            EXIT_CLOSED,
        ) from None
    if waiting.cancelled_caught:
        raise ConsoleError(
            f"timed out after {args.timeout:g} s waiting for messages: "
            f"received {received} of {expect}",
            EXIT_TIMEOUT,
        )
    await ws.aclose(1000)
    _note("closed with 1000 (NORMAL_CLOSURE)")
    return EXIT_OK


def _describe(payload: str | bytes) -> str:
    size = len(payload.encode() if isinstance(payload, str) else payload)
    kind = "text" if isinstance(payload, str) else "binary"
    return f"{kind} ({size} byte{'' if size == 1 else 's'})"


async def stdin_lines(fd: int = 0) -> AsyncGenerator[str, None]:
    """Lines typed on (or piped to) ``fd``, without their line ends, until end of file.

    ``os.read`` runs in a worker thread, so the Trio loop never blocks and any
    kind of stdin works (terminal, pipe, file). A read still pending when the
    caller stops is abandoned: its daemon thread ends with the process.
    """
    pending = b""
    while True:
        chunk = await trio.to_thread.run_sync(os.read, fd, 65536, abandon_on_cancel=True)
        if not chunk:
            if pending:
                yield pending.decode("utf-8", "replace")
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode("utf-8", "replace")


class _Interactive:
    def __init__(self, ws: WebSocketConnection, printer: _Printer) -> None:
        self.ws = ws
        self.printer = printer
        self.closing = False
        self.status = EXIT_OK

    async def run(self) -> int:
        self.printer.status(
            "type a message and press Enter to send it; /help lists the commands; "
            "Ctrl-D disconnects"
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, nursery.cancel_scope)
            async with contextlib.aclosing(stdin_lines()) as lines:
                async for line in lines:
                    try:
                        if not await self._command(line, nursery):
                            break
                    except ConnectionClosed:
                        # Closed by the other side: _receive reports it and ends the session.
                        await trio.sleep_forever()
                else:
                    self.printer.status("end of input: closing")
                    await self._close(1000, "")
            nursery.cancel_scope.cancel()
        return self.status

    async def _receive(self, done: trio.CancelScope) -> None:
        try:
            while True:
                self.printer.message("received", await self.ws.get_message())
        except ConnectionClosed as exc:
            if not self.closing:
                self.printer.event("<", "close", describe_close(exc.reason))
                self.printer.status("the connection was closed by the other side")
                self.status = EXIT_CLOSED
                done.cancel()

    async def _close(self, code: int, reason: str) -> None:
        self.closing = True
        self.printer.event(">", "close", f"{code} {json.dumps(reason) if reason else ''}")
        await self.ws.aclose(code, reason or None)
        self.printer.status("disconnected")

    async def _send(self, message: str | bytes) -> None:
        await self.ws.send_message(message)
        self.printer.message("sent", message)

    async def _command(self, line: str, nursery: trio.Nursery) -> bool:
        """Act on one input line; False once the connection is closed."""
        if not line.startswith("/") or line.startswith("//"):
            await self._send(line[1:] if line.startswith("//") else line)
            return True
        name, _, rest = line.partition(" ")
        if name == "/text":
            await self._send(rest)
        elif name == "/binary":
            try:
                await self._send(parse_payload(rest.strip()))
            except ValueError as exc:
                self.printer.status(f"/binary: {exc}")
        elif name == "/ping":
            nursery.start_soon(self._ping, rest.encode())
        elif name == "/close":
            code_text, _, reason = rest.strip().partition(" ")
            code = int(code_text) if code_text.isdigit() else 1000
            if (code_text and not code_text.isdigit()) or not _closable(code):
                self.printer.status(
                    "/close: the code must be 1000 or 3000-4999 (e.g. /close 1000 done)"
                )
                return True
            await self._close(code, reason)
            return False
        elif name in ("/help", "/?"):
            self.printer._line(HELP)
        else:
            self.printer.status(f"unknown command {name}: /help lists them, //TEXT sends /TEXT")
        return True

    async def _ping(self, payload: bytes) -> None:
        started = time.perf_counter()
        self.printer.event(">", "ping", _show_binary(payload) if payload else "")
        try:
            await self.ws.ping(payload or None)
        except ValueError:
            self.printer.status("/ping: a ping with this payload is already waiting for its pong")
            return
        except ConnectionClosed:
            return
        self.printer.event("<", "pong", f"({(time.perf_counter() - started) * 1000:.1f} ms)")


def _closable(code: int) -> bool:
    return code == 1000 or 3000 <= code <= 4999


def status_phrase(status: int) -> str:
    """The reason phrase of HTTP ``status`` ('' for a status HTTP does not name)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


if __name__ == "__main__":
    sys.exit(main())

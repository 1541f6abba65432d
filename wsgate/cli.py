"""The ``wsgate`` command line: serve, check, echo-server, demo.

This is the only place wsgate configures structlog (JSON lines on stdout); the
library itself just logs, so an embedding application stays in charge.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from . import __version__
from .config import Config, Listen, load_config
from .echo import serve_echo
from .errors import ConfigError
from .gateway import Gateway, raise_fd_limit
from .logs import utc_now

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "demo.toml"


def _timestamp(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    # Gateway-log records carry the time of the handshake itself; keep it.
    event.setdefault("timestamp", utc_now())
    return event


def configure_logging(*, json: bool = True, level: int = logging.INFO) -> None:
    """Send structlog records to stdout, as JSON lines by default."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def _listen(text: str) -> Listen:
    try:
        return Listen.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="wsgate",
        description="wsgate: a WebSocket API gateway. Routes WebSocket clients to backend "
        "WebSocket services, enforcing limits and logging every handshake and disconnect.",
    )
    parser.add_argument("--version", action="version", version=f"wsgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway from a config file. Logs go to stdout as JSON lines. "
        "SIGTERM or SIGINT drain gracefully: stop accepting, close every pair with 1001, "
        "wait up to drain_timeout, exit 0. A second signal cuts the wait short.",
    )
    serve.add_argument("--config", "-c", required=True, type=Path, help="TOML config file")
    serve.add_argument(
        "--listen", type=_listen, metavar="HOST:PORT", help="override [gateway] listen"
    )
    serve.add_argument(
        "--pretty", action="store_true", help="human-readable logs instead of JSON lines"
    )

    check = sub.add_parser(
        "check",
        help="validate a config file",
        description="Validate a config file: exit 0 if it is valid, else print every "
        "problem (file: key: reason) to stderr and exit 1.",
    )
    check.add_argument("file", type=Path, help="TOML config file")

    echo = sub.add_parser(
        "echo-server",
        help="run a WebSocket echo backend",
        description="Run a WebSocket echo server (any path) to try the gateway with.",
    )
    echo.add_argument(
        "--listen",
        type=_listen,
        default=Listen(host="127.0.0.1", port=9000),
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:9000)",
    )

    demo = sub.add_parser(
        "demo",
        help="run an echo backend and a gateway in front of it",
        description="Start an echo backend and a gateway routing /echo to it, in one "
        "process, from examples/demo.toml (this is what `make run` starts).",
    )
    demo.add_argument(
        "--config", type=Path, default=DEMO_CONFIG, help="demo config (default: %(default)s)"
    )
    demo.add_argument("--pretty", action="store_true", help="human-readable logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsgate`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return _check(args.file)
    if args.command == "echo-server":
        configure_logging()
        trio.run(_run_echo, args.listen)
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if getattr(args, "listen", None) is not None:
        config = attrs.evolve(config, gateway=attrs.evolve(config.gateway, listen=args.listen))
    configure_logging(json=not args.pretty)
    try:
        trio.run(_serve, config, args.command == "demo")
    except OSError as exc:
        print(f"wsgate: {exc}", file=sys.stderr)
        return 1
    return 0


def _check(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}: OK ({len(config.apis)} APIs, listening on {config.gateway.listen})")
    return 0


async def _run_echo(listen: Listen) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_echo, listen.host, listen.port)
        structlog.get_logger("wsgate.echo").info("echo_server_started", port=port)


async def _serve(config: Config, demo: bool) -> None:
    log = structlog.get_logger("wsgate")
    log.info("file_descriptor_limit", limit=raise_fd_limit())
    async with trio.open_nursery() as nursery:
        if demo:
            for api in config.apis:
                backend = api.backend
                await nursery.start(serve_echo, backend.host, backend.port)
                log.info("echo_server_started", url=backend.url)
        gateway = await nursery.start(Gateway(config).run)
        if demo:
            for api in config.apis:
                print(
                    f"\nwsgate demo is up. Connect a WebSocket client to {gateway.url}/{api.path}"
                    f"\n  e.g. python -m websockets {gateway.url}/{api.path}"
                    "\nPress Ctrl-C to stop.\n",
                    file=sys.stderr,
                )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal_received", signal=signal.Signals(signum).name)
                nursery.start_soon(_second_signal_cuts, signals, nursery.cancel_scope)
                await gateway.drain()
                nursery.cancel_scope.cancel()
                return


async def _second_signal_cuts(signals: Any, scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return

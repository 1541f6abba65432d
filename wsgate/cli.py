"""The ``wsgate`` command line: serve, check, echo-server, demo.

This is the only place wsgate configures structlog (JSON lines on stdout); the
library itself just logs, so an embedding application stays in charge.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import structlog
import trio

from . import __version__, console
from .admin import reload_on_sighup, serve_admin
from .cluster.names import counting_policies
from .cluster.redis import missing_extra
from .config import Config, Listen, load_config
from .echo import serve_echo
from .errors import ConfigError, WorkerBootFailure
from .gateway import Gateway, raise_fd_limit
from .logs import utc_now
from .machine_metrics import MachineMetrics, multiprocess_dir
from .metrics import GatewayMetrics
from .workers import report_ready, supervise, worker_share

DEMO_CONFIG = Path(__file__).resolve().parent / "demo.toml"  # package data: works from a wheel


def _timestamp(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    # Gateway-log records carry the time of the handshake itself; keep it.
    event.setdefault("timestamp", utc_now())
    return event


class _StdoutLogger(structlog.WriteLogger):
    """Writes each record in one write; drops a record stdout cannot take.

    When stdout's reader is gone (``wsgate serve | head``, a log shipper that
    died) every write fails with EPIPE. A record lost must not cost the
    connection that logged it, so the record is dropped and stderr says so once.
    After EPIPE stdout points at /dev/null: a pipe without a reader never gets
    one back, and the flush at exit then succeeds (else Python exits with 120).
    Other errors (a full disk) drop only the record that met them.
    """

    _reported = False

    def __init__(self, file: TextIO) -> None:
        super().__init__(file)
        self._stdout = file

    def msg(self, message: str) -> None:
        """Write ``message`` and a newline; on an OSError drop it (reported once)."""
        try:
            super().msg(message)
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                with contextlib.suppress(OSError, ValueError):  # not a real file: leave it
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    try:
                        os.dup2(devnull, self._stdout.fileno())
                    finally:
                        os.close(devnull)
            if not _StdoutLogger._reported:
                _StdoutLogger._reported = True
                with contextlib.suppress(OSError):
                    print(f"wsgate: dropping log records: stdout: {exc}", file=sys.stderr)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


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
        # One write per record, newline included: print() writes the newline
        # apart, and with PYTHONUNBUFFERED the records of workers sharing
        # stdout could interleave between the two.
        logger_factory=lambda *_: _StdoutLogger(sys.stdout),
        cache_logger_on_first_use=True,
    )


def _listen(text: str) -> Listen:
    try:
        return Listen.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError("must be a positive integer or 'auto'")
    return count


#: ``--log-level`` names, least to most severe.
LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="drop records below this level (default: info; 'warning' drops the per-"
        "connection handshake and disconnect records, keeping problems)",
    )


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
        "wait up to drain_timeout, exit 0. A second signal cuts the wait short. SIGHUP "
        "re-reads the config file (an invalid one is logged and ignored). With an [admin] "
        "table, the management API, /metrics, /health and /ready are served there.",
    )
    serve.add_argument("--config", "-c", required=True, type=Path, help="TOML config file")
    serve.add_argument(
        "--listen", type=_listen, metavar="HOST:PORT", help="override [gateway] listen"
    )
    serve.add_argument(
        "--pretty", action="store_true", help="human-readable logs instead of JSON lines"
    )
    _add_log_level(serve)
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="run N gateway processes sharing the port (SO_REUSEPORT); 'auto' = one per "
        "core. max_connections is divided among them; a worker that dies after serving is "
        "restarted, one that fails to start stops them all (exit status 1).",
    )
    # Set by the supervisor: "i/n", the pipe to report "serving" on, the admin address.
    serve.add_argument("--worker", help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--admin-listen", type=_listen, help=argparse.SUPPRESS)

    check = sub.add_parser(
        "check",
        help="validate a config file",
        description="Validate a config file: exit 0 if it is valid, else print every "
        "problem (file: key: reason) to stderr and exit 1.",
    )
    check.add_argument("file", type=Path, nargs="?", help="TOML config file")
    # The same flag as `serve`, so a command line can swap one verb for the other.
    check.add_argument("--config", type=Path, help="TOML config file (instead of FILE)")

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
        "process, from wsgate/demo.toml (this is what `make run` starts).",
    )
    demo.add_argument(
        "--config", type=Path, default=DEMO_CONFIG, help="demo config (default: %(default)s)"
    )
    demo.add_argument("--pretty", action="store_true", help="human-readable logs")
    _add_log_level(demo)
    console.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsgate`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "console":
        return console.run(args)
    if args.command == "check":
        if (args.file is None) == (args.config is None):
            parser.error("check: give the config file once, as FILE or --config FILE")
        return _check(args.file or args.config)
    if args.command == "echo-server":
        configure_logging()
        return _run(_run_echo, args.listen)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if getattr(args, "listen", None) is not None:
        config = attrs.evolve(config, gateway=attrs.evolve(config.gateway, listen=args.listen))
    demo = args.command == "demo"
    if demo:
        secure = [api.name for api in config.apis if api.backend.secure]
        if secure:
            print(
                f"wsgate: {args.config}: the demo only starts ws:// echo backends; "
                f"APIs with a wss:// service_url: {', '.join(secure)}",
                file=sys.stderr,
            )
            return 1
    if config.cluster is not None and (missing := missing_extra()) is not None:
        print(f"wsgate: {args.config}: {missing}", file=sys.stderr)
        return 1
    configure_logging(json=not args.pretty, level=LOG_LEVELS[args.log_level])
    workers = getattr(args, "workers", 1)
    if workers > 1:
        if config.admin is not None and config.cluster is None:
            print(
                f"wsgate: {args.config}: [admin] with --workers {workers} needs a [cluster] "
                "table (its changes, connections and metrics would reach one worker only; "
                "with [cluster] every worker shares them through Redis, docs/cluster.md), "
                "or run with --workers 1",
                file=sys.stderr,
            )
            return 1
        unshared = counting_policies(config) if config.cluster is None else []
        if unshared:
            listed = ", ".join(f"{name!r} ({path})" for name, path in unshared)
            print(
                f"wsgate: {args.config}: policy {listed} counts in memory, per process: "
                f"{workers} workers would each admit the full limit. Add a [cluster] table "
                "to share the counters through Redis (docs/cluster.md), or run with "
                "--workers 1",
                file=sys.stderr,
            )
            return 1
        log_args = [*(["--pretty"] if args.pretty else []), "--log-level", args.log_level]
        admin_listen = None if config.admin is None else config.admin.listen
        return _run(supervise, args.config, config.gateway.listen, workers, log_args, admin_listen)
    reuse_port = False
    if getattr(args, "worker", None):
        index, total = (int(part) for part in args.worker.split("/"))
        structlog.contextvars.bind_contextvars(worker=index)
        share = worker_share(config, index, total)
        config = attrs.evolve(config, gateway=attrs.evolve(config.gateway, max_connections=share))
        if args.admin_listen is not None and config.admin is not None:
            config = attrs.evolve(
                config, admin=attrs.evolve(config.admin, listen=args.admin_listen)
            )
        reuse_port = True
    return _run(_serve, config, demo, reuse_port, getattr(args, "ready_fd", None))


class StartupError(Exception):
    """Something the process needed at startup (a port, a certificate) is unavailable."""


def _run(fn: Any, *args: Any) -> int:
    """``trio.run(fn, *args)``: 0 once it returns, 1 (message on stderr) on a startup error.

    A startup error is a StartupError, or a WorkerBootFailure from the supervisor.

    Startup errors raised inside nurseries arrive wrapped in exception groups;
    anything else is a bug and propagates with its traceback.
    """
    failures: list[BaseException] = []
    try:
        trio.run(fn, *args)
    except* (StartupError, WorkerBootFailure) as group:
        failures.extend(group.exceptions)
    for failure in failures:
        print(f"wsgate: {failure}", file=sys.stderr)
    return 1 if failures else 0


async def _start(nursery: trio.Nursery, what: str, fn: Any, *args: Any) -> Any:
    """``nursery.start(fn, *args)``, turning an OSError (port in use...) into a StartupError."""
    try:
        return await nursery.start(fn, *args)
    except (OSError, ExceptionGroup) as exc:
        error = exc
        while isinstance(error, ExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]  # serve_echo's own nursery wraps it
        if not isinstance(error, OSError):
            raise
        raise StartupError(f"cannot start {what}: {error.strerror or error}") from exc


def _check(path: Path) -> int:
    # Warnings are printed below, in the same "FILE: ..." form as errors, not logged.
    configure_logging(level=logging.ERROR)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    for skipped in config.skipped_policies:
        print(
            f"{path}: warning: policy {skipped['policy']!r} ({skipped['scope']} scope) is not "
            "supported by the onHandshake operation; it is skipped at run time",
            file=sys.stderr,
        )
    count = len(config.apis)
    print(
        f"{path}: OK ({count} API{'' if count == 1 else 's'}, listening on {config.gateway.listen})"
    )
    return 0


async def _run_echo(listen: Listen) -> None:
    log = structlog.get_logger("wsgate.echo")
    # Before anything else, so a signal during startup is not fatal but queued.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            port = await _start(
                nursery, f"the echo server on {listen}", serve_echo, listen.host, listen.port
            )
            url = f"ws://{Listen(host=listen.host, port=port)}"
            log.info("echo_server_started", host=listen.host, port=port, url=url)
            async for signum in signals:
                log.info("signal_received", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                return


async def _serve(
    config: Config, demo: bool, reuse_port: bool = False, ready_fd: int | None = None
) -> None:
    log = structlog.get_logger("wsgate")
    # Before anything else, so a signal during startup is not fatal but queued.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        log.info("file_descriptor_limit", limit=raise_fd_limit())
        async with trio.open_nursery() as nursery:
            if demo:
                started: set[tuple[str, int]] = set()
                for api in config.apis:
                    backend = api.backend
                    if (backend.host, backend.port) in started:
                        continue  # several APIs may share one echo backend
                    started.add((backend.host, backend.port))
                    await _start(
                        nursery,
                        f"the demo echo backend on {backend.host_header}",
                        serve_echo,
                        backend.host,
                        backend.port,
                    )
                    log.info(
                        "echo_server_started", host=backend.host, port=backend.port, url=backend.url
                    )
            # Metrics cost nothing on the relay path; they are served by the admin listener.
            metrics: GatewayMetrics | None = None
            if config.admin is not None:
                metrics = GatewayMetrics()
                if reuse_port and multiprocess_dir() is not None:
                    # --workers N: /metrics answers for every worker of the machine.
                    machine = MachineMetrics()
                    nursery.start_soon(machine.run)
                    metrics = machine
            try:
                server = Gateway(
                    config,
                    observers=[metrics] if metrics is not None else (),
                    reuse_port=reuse_port,
                )
            except OSError as exc:  # ssl.SSLError: the certificate and key do not load
                raise StartupError(f"cannot load the gateway's TLS certificate: {exc}") from exc
            if config.cluster is not None:
                # Before the gateway accepts: it serves the shared configuration.
                from .cluster.member import serve_member

                await nursery.start(serve_member, server)
            if config.admin is not None:
                what = f"the admin listener on {config.admin.listen}"
                try:
                    # Applies the state file to the config before the gateway accepts.
                    await _start(
                        nursery,
                        what,
                        functools.partial(serve_admin, reuse_port=reuse_port),
                        server,
                        config.admin,
                        metrics,
                    )
                except ConfigError as exc:
                    raise StartupError(f"cannot start {what}:\n{exc}") from exc
            await nursery.start(reload_on_sighup, server, config.admin)
            gateway: Gateway = await _start(
                nursery, f"the gateway on {config.gateway.listen}", server.run
            )
            # What start-up made (modules, config, clients) lives as long as the
            # process: out of the collector's sight, a full collection walks only
            # what connections make, and pauses every handshake in flight less.
            gc.freeze()
            log.debug("startup_objects_frozen", objects=gc.get_freeze_count())
            if ready_fd is not None:
                report_ready(ready_fd)
            if demo:
                urls = "".join(
                    f"\n  python -m websockets {gateway.url}/{api.path}" for api in config.apis
                )
                print(
                    f"\nwsgate demo is up. Connect a WebSocket client, e.g.{urls}"
                    "\nPress Ctrl-C to stop.\n",
                    file=sys.stderr,
                )
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

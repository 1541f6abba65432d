"""``wsgate serve --workers N``: N gateway processes sharing one port.

The supervisor resolves the listen address once (so port 0 means one port for
all), starts N worker processes that each bind it with SO_REUSEPORT (the
kernel spreads connections among them), restarts a worker that dies, and on
SIGTERM/SIGINT forwards the signal so every worker drains, then exits 0.
Workers log to the same stdout; each record carries ``worker``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import structlog
import trio

from .config import Config, Listen

#: Seconds before restarting a worker that died, doubled (up to a minute) while it keeps dying.
RESTART_BACKOFF = 0.5


def worker_share(config: Config, index: int, total: int) -> int:
    """The max_connections of worker ``index`` of ``total``: the limit divided among them."""
    base, extra = divmod(config.gateway.max_connections, total)
    return max(1, base + (1 if index < extra else 0))


def reserve_port(listen: Listen) -> tuple[socket.socket, Listen]:
    """Bind (not listen) a SO_REUSEPORT socket to fix the port all workers will share.

    The socket is kept open while the workers run so the port stays ours; it
    never listens, so the kernel gives it no connections.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    host, port = sock.getsockname()[:2]
    return sock, Listen(host=host, port=port)


async def supervise(
    config_path: Path,
    listen: Listen,
    total: int,
    log_args: Sequence[str] = (),
    admin_listen: Listen | None = None,
) -> None:
    """Run ``total`` workers until SIGTERM/SIGINT, restarting any that die.

    ``log_args`` (``--pretty``, ``--log-level LEVEL``) are passed on to each worker.
    With ``admin_listen`` ([admin], allowed with [cluster]) every worker serves
    the admin listener on that one port too, and writes its metrics to a fresh
    prometheus-client multiprocess directory (:mod:`wsgate.machine_metrics`)
    so any worker's ``/metrics`` reports them all.
    """
    log = structlog.get_logger("wsgate.workers")
    placeholder, listen = reserve_port(listen)
    extra: list[str] = []
    env: dict[str, str] | None = None
    admin_placeholder: socket.socket | None = None
    metrics_dir: str | None = None
    if admin_listen is not None:
        try:
            admin_placeholder, admin_listen = reserve_port(admin_listen)
        except BaseException:
            placeholder.close()
            raise
        extra = ["--admin-listen", str(admin_listen)]
        metrics_dir = tempfile.mkdtemp(prefix="wsgate-metrics-")
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    processes: dict[int, trio.Process] = {}
    stopping = False

    async def worker(index: int) -> None:
        backoff = RESTART_BACKOFF
        while True:
            command = [
                sys.executable,
                "-m",
                "wsgate",
                "serve",
                "--config",
                str(config_path),
                "--listen",
                str(listen),
                "--worker",
                f"{index}/{total}",
                *extra,
                *log_args,
            ]
            # Its own session: a terminal's Ctrl-C reaches the supervisor only, which
            # forwards one SIGTERM (a second signal to a worker cuts its drain short).
            process = await trio.lowlevel.open_process(command, start_new_session=True, env=env)
            processes[index] = process
            log.info("worker_started", worker=index, pid=process.pid)
            started = trio.current_time()
            code = await process.wait()
            if metrics_dir is not None:
                _mark_dead(process.pid, metrics_dir)  # its live gauges leave the sums
            if stopping:
                return
            log.warning("worker_exited", worker=index, pid=process.pid, exit_code=code)
            backoff = RESTART_BACKOFF if trio.current_time() - started > 10 else backoff * 2
            await trio.sleep(min(backoff, 60))
            log.info("worker_restarting", worker=index)

    def forward() -> None:
        for process in processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)

    try:
        with placeholder, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as workers:
                    for index in range(total):
                        workers.start_soon(worker, index)
                    log.info(
                        "workers_started",
                        workers=total,
                        address=str(listen),
                        admin_address=None if admin_listen is None else str(admin_listen),
                    )
                    async for signum in signals:
                        log.info("signal_received", signal=signal.Signals(signum).name)
                        stopping = True
                        forward()
                        break
                    # Workers drain; a second signal is forwarded and cuts that short.
                    nursery.start_soon(_forward_more, signals, forward)
                nursery.cancel_scope.cancel()
    finally:
        if admin_placeholder is not None:
            admin_placeholder.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _mark_dead(pid: int, path: str) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


async def _forward_more(signals: AsyncIterator[int], forward: Callable[[], None]) -> None:
    async for _ in signals:
        forward()

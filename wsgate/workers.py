"""``wsgate serve --workers N``: N gateway processes sharing one port.

The supervisor resolves the listen address once (so port 0 means one port for
all) and starts N worker processes that each bind it with SO_REUSEPORT (the
kernel spreads connections among them). A worker says it is serving by writing
to a pipe the supervisor hands it (``--ready-fd``) once its listener is bound;
the supervisor logs ``workers_started`` when all of them have.

* A worker that exits before it is serving (an import error, a certificate that
  does not load, a port it may not bind) would fail the same way again: the
  supervisor stops the others, prints the worker's error and exits 1, as
  gunicorn does for a worker that fails to boot.
* A worker that dies after serving is restarted, with a backoff while it keeps dying.
* SIGTERM/SIGINT is forwarded so every worker drains; then the supervisor exits 0.

Workers log to the same stdout; each record carries ``worker``. Their stderr
passes through the supervisor, which keeps its last lines to quote.
"""

from __future__ import annotations

import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from .config import Config, Listen
from .errors import WorkerBootFailure

#: Seconds before restarting a worker that died, doubled (up to a minute) while it keeps dying.
RESTART_BACKOFF = 0.5
#: Bytes of a worker's stderr kept to quote when it fails to start.
_STDERR_TAIL = 4096


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


def worker_command() -> list[str]:
    """How a worker is started: this interpreter, without the current directory on sys.path.

    ``python -m wsgate`` would put the current directory first on sys.path, so a
    folder named ``wsgate`` there (the parent of a clone, say) would shadow the
    package and every worker would die importing it. ``-P`` (Python 3.11+)
    leaves the current directory out.
    """
    return [sys.executable, "-P", "-m", "wsgate"]


def worker_environment() -> dict[str, str] | None:
    """The workers' environment (None: the supervisor's own), so they import this wsgate.

    An installed package is found without help. One the supervisor found
    elsewhere (a source tree it was started from, which ``-P`` no longer puts
    on sys.path) is named in PYTHONPATH, so the workers run the same code.
    """
    root = Path(__file__).resolve().parent.parent
    installed = [*site.getsitepackages(), site.getusersitepackages()]
    if any(root == Path(path).resolve() for path in installed):
        return None
    inherited = os.environ.get("PYTHONPATH", "")
    paths = [str(root), *(path for path in inherited.split(os.pathsep) if path)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def report_ready(fd: int) -> None:
    """In a worker: tell the supervisor, through the pipe ``fd``, that the gateway serves."""
    try:
        os.write(fd, b"ready\n")
    except OSError:
        pass  # the supervisor is gone; its signal (or none) decides what happens next
    finally:
        os.close(fd)


async def supervise(
    config_path: Path,
    listen: Listen,
    total: int,
    log_args: Sequence[str] = (),
    admin_listen: Listen | None = None,
) -> None:
    """Run ``total`` workers until SIGTERM/SIGINT, restarting any that die after serving.

    ``log_args`` (``--pretty``, ``--log-level LEVEL``) are passed on to each worker.
    Raises :class:`~wsgate.errors.WorkerBootFailure` (once every worker has
    stopped) when a worker exits before it is serving.

    With ``admin_listen`` ([admin], allowed with [cluster]) every worker serves
    the admin listener on that one port too, and writes its metrics to a fresh
    prometheus-client multiprocess directory (:mod:`wsgate.machine_metrics`)
    so any worker's ``/metrics`` reports them all.
    """
    log = structlog.get_logger("wsgate.workers")
    placeholder, listen = reserve_port(listen)
    extra: list[str] = []
    admin_placeholder: socket.socket | None = None
    metrics_dir: str | None = None
    environment = worker_environment()
    if admin_listen is not None:
        try:
            admin_placeholder, admin_listen = reserve_port(admin_listen)
        except BaseException:
            placeholder.close()
            raise
        extra = ["--admin-listen", str(admin_listen)]
        metrics_dir = tempfile.mkdtemp(prefix="wsgate-metrics-")
        environment = {**(environment or os.environ), "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    processes: dict[int, trio.Process] = {}
    serving: set[int] = set()
    all_serving = trio.Event()
    failures: list[WorkerBootFailure] = []
    stopping = False

    def stop() -> None:
        nonlocal stopping
        stopping = True
        for process in processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)

    async def worker(index: int) -> None:
        backoff = RESTART_BACKOFF
        while not stopping:
            ready_read, ready_write = os.pipe()
            command = [
                *worker_command(),
                "serve",
                "--config",
                str(config_path),
                "--listen",
                str(listen),
                "--worker",
                f"{index}/{total}",
                "--ready-fd",
                str(ready_write),
                *extra,
                *log_args,
            ]
            try:
                # Its own session: a terminal's Ctrl-C reaches the supervisor only, which
                # forwards one SIGTERM (a second signal to a worker cuts its drain short).
                process = await trio.lowlevel.open_process(
                    command,
                    start_new_session=True,
                    pass_fds=(ready_write,),
                    stderr=subprocess.PIPE,
                    env=environment,
                )
            except BaseException:
                os.close(ready_read)
                raise
            finally:
                os.close(ready_write)  # the worker's copy is the only one: EOF when it exits
            processes[index] = process
            log.info("worker_started", worker=index, pid=process.pid)
            started = trio.current_time()
            stderr = bytearray()
            async with trio.open_nursery() as nursery:
                assert process.stderr is not None
                nursery.start_soon(_pass_on, process.stderr, stderr)
                served = await _wait_ready(ready_read)
                if served:
                    log.info("worker_ready", worker=index, pid=process.pid)
                    serving.add(index)
                    if len(serving) == total:
                        all_serving.set()
                code = await process.wait()
            if metrics_dir is not None:
                _mark_dead(process.pid, metrics_dir)  # its live gauges leave the sums
            if stopping:
                return
            if not served:
                error = _last_line(bytes(stderr)) or "no message"
                log.error(
                    "worker_boot_failed", worker=index, pid=process.pid, exit_code=code, error=error
                )
                failures.append(
                    WorkerBootFailure(
                        f"worker {index} failed to start ({_describe_exit(code)}): {error}"
                    )
                )
                stop()
                return
            log.warning("worker_exited", worker=index, pid=process.pid, exit_code=code)
            backoff = RESTART_BACKOFF if trio.current_time() - started > 10 else backoff * 2
            await trio.sleep(min(backoff, 60))
            if not stopping:
                log.info("worker_restarting", worker=index)

    async def announce() -> None:
        await all_serving.wait()
        log.info(
            "workers_started",
            workers=total,
            address=str(listen),
            admin_address=None if admin_listen is None else str(admin_listen),
        )

    async def on_signals() -> None:
        async for signum in signals:
            if not stopping:
                log.info("signal_received", signal=signal.Signals(signum).name)
            # Workers drain; a second signal is forwarded and cuts that short.
            stop()

    try:
        with placeholder, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(on_signals)
                nursery.start_soon(announce)
                async with trio.open_nursery() as workers:
                    for index in range(total):
                        workers.start_soon(worker, index)
                nursery.cancel_scope.cancel()  # every worker has stopped
    finally:
        if admin_placeholder is not None:
            admin_placeholder.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if failures:
        raise failures[0]


def _mark_dead(pid: int, path: str) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


async def _wait_ready(fd: int) -> bool:
    """Whether the worker holding the other end of pipe ``fd`` said it serves (False: it exited)."""
    async with trio.lowlevel.FdStream(fd) as pipe:
        return bool(await pipe.receive_some(64))


async def _pass_on(stream: trio.abc.ReceiveStream, tail: bytearray) -> None:
    """Copy a worker's stderr to ours as it comes, keeping its end in ``tail``."""
    out = getattr(sys.stderr, "buffer", None)
    async with stream:
        while chunk := await stream.receive_some(65536):
            if out is not None:
                out.write(chunk)
                out.flush()
            tail += chunk
            del tail[:-_STDERR_TAIL]


def _last_line(output: bytes) -> str:
    """The last non-empty line a worker wrote (its error), without our own ``wsgate:`` prefix."""
    lines = [line.strip() for line in output.decode(errors="replace").splitlines()]
    last = next((line for line in reversed(lines) if line), "")
    return last.removeprefix("wsgate: ")


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"

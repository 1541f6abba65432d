"""A real redis-server on 127.0.0.1 for the [cluster] tests (Debian's ``redis-server``).

The suite starts one per session (the ``redis_url`` fixture flushes it before
each test); fault tests that stop or pause Redis start their own
(``own_redis``). When redis-server is missing the tests fail (``make test``
installs it as root); they never skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = os.environ.get("WSGATE_REDIS_SERVER", "redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one inline command to Redis on ``port`` and return its raw reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(" ".join(args).encode() + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


class RedisServer:
    """One redis-server process: start, kill, pause (SIGSTOP), resume, restart on its port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="wsgate-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which(REDIS_SERVER)
        if binary is None:
            raise RuntimeError(
                "redis-server not found: `make test` installs it as root "
                "(apt-get install -y redis-server)"
            )
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",  # nothing on disk: a restart starts empty
            "appendonly": "no",
            "dir": str(self.dir),
            "logfile": str(self.dir / "redis.log"),
        }
        self.process = subprocess.Popen(
            [binary, *(arg for key, value in options.items() for arg in (f"--{key}", value))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if command(self.port, "PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{log}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL it (its data is gone: it keeps nothing on disk)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused process dies too
            self.process.kill()
            self.process.wait()
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        assert command(self.port, "FLUSHALL").startswith(b"+OK")

    def call(self, *args: str) -> bytes:
        return command(self.port, *args)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

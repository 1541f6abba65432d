"""``wsgate serve --workers 2``: one port, two processes, restart, drain."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from wsgate.cli import configure_logging

from .helpers import RawClient


@contextlib.asynccontextmanager
async def running(*args: str) -> AsyncIterator[tuple[trio.Process, Lines]]:
    """``python -m wsgate ARGS`` with its stdout read as JSON lines; killed at the end."""
    command = [sys.executable, "-m", "wsgate", *args]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        yield process, Lines(process.stdout)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await process.stdout.aclose()


class Lines:
    """JSON log lines of a process's stdout, read incrementally."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.seen: list[dict[str, Any]] = []
        self._buffer = b""

    async def until(self, predicate: Any) -> dict[str, Any]:
        for record in self.seen:
            if predicate(record):
                return record
        while True:
            chunk = await self.stream.receive_some(65536)
            assert chunk, "the process ended"
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    raise AssertionError(repr(line)) from None
                self.seen.append(record)
                if predicate(record):
                    return record


@pytest.mark.deadline(60)
async def test_two_workers_share_a_port_restart_and_drain(echo_url: str, tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[gateway]\nlisten = "127.0.0.1:0"\nmax_connections = 11\n\n'
        f'[[apis]]\nname = "echo"\npath = "echo"\nservice_url = "{echo_url}"\n'
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "wsgate", "serve", "--config", str(config), "--workers", "2"],
        stdout=-1,
    )
    assert process.stdout is not None
    lines = Lines(process.stdout)
    try:
        port = int(
            (await lines.until(lambda r: r["event"] == "workers_started"))["address"].split(":")[1]
        )
        for worker in (0, 1):
            started = await lines.until(
                lambda r, w=worker: r["event"] == "gateway_started" and r.get("worker") == w
            )
            assert started["max_connections"] == (6 if worker == 0 else 5)  # 11 divided
        for _ in range(24):
            client = await RawClient.connect(port)
            assert client.response is not None and client.response.status == 101
            await client.close()
            await client.receive_close()
            await client.aclose()
        handshakes = lambda _: sum(r["event"] == "handshake" for r in lines.seen) >= 24  # noqa: E731
        await lines.until(handshakes)
        workers = {r.get("worker") for r in lines.seen if r["event"] == "handshake"}
        assert workers == {0, 1}, "SO_REUSEPORT spread 24 connections over both workers"

        # A worker killed outright is restarted.
        victim = await lines.until(lambda r: r["event"] == "worker_started" and r["worker"] == 0)
        os.kill(victim["pid"], signal.SIGKILL)
        await lines.until(lambda r: r["event"] == "worker_exited" and r["worker"] == 0)
        await lines.until(
            lambda r: (
                r["event"] == "worker_started" and r["worker"] == 0 and r["pid"] != victim["pid"]
            )
        )

        # SIGTERM drains every worker: open pairs get 1001, the supervisor exits 0.
        client = await RawClient.connect(port)
        assert client.response is not None and client.response.status == 101
        process.send_signal(signal.SIGTERM)
        assert (await client.receive_close())[0] == 1001
        await client.close(1001)
        await client.aclose()
        with trio.fail_after(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await process.stdout.aclose()


@pytest.mark.deadline(60)
async def test_workers_log_at_the_level_given_to_the_supervisor(
    echo_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[gateway]\nlisten = "127.0.0.1:0"\n\n'
        f'[[apis]]\nname = "echo"\npath = "echo"\nservice_url = "{echo_url}"\n'
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "wsgate", "serve", "--config", str(config)]
    process = await trio.lowlevel.open_process(
        [*command, "--listen", f"127.0.0.1:{port}", "--workers", "2", "--log-level", "warning"],
        stdout=-1,
    )
    assert process.stdout is not None
    try:
        relayed = 0
        with trio.fail_after(20):
            while relayed < 8:  # no "started" record at this level: retry until both listen
                try:
                    client = await RawClient.connect(port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                assert client.response is not None and client.response.status == 101
                await client.close()
                await client.receive_close()
                await client.aclose()
                relayed += 1
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0
        output = bytearray()
        while chunk := await process.stdout.receive_some(65536):
            output += chunk
        # At info, each pair alone would have logged a handshake and a disconnect.
        records = [json.loads(line) for line in output.splitlines()]
        assert [r for r in records if r["level"] not in ("warning", "error")] == []
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await process.stdout.aclose()


async def _run_supervisor(
    config: Path, cwd: Path, *extra: str
) -> tuple[trio.Process, Lines, trio.abc.ReceiveStream]:
    # -P: the supervisor itself must not be shadowed; what is tested is how it starts workers.
    process = await trio.lowlevel.open_process(
        [sys.executable, "-P", "-m", "wsgate", "serve", "--config", str(config), *extra],
        stdout=-1,
        stderr=-1,
        cwd=str(cwd),
    )
    assert process.stdout is not None and process.stderr is not None
    return process, Lines(process.stdout), process.stderr


async def _read_all(stream: trio.abc.ReceiveStream) -> str:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data.decode(errors="replace")


@pytest.mark.deadline(60)
async def test_workers_started_beside_a_folder_named_wsgate_import_the_package(
    echo_url: str, tmp_path: Path
) -> None:
    # The parent of a clone: `python -m wsgate` there imports the folder, not the package.
    (tmp_path / "wsgate").mkdir()
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[gateway]\nlisten = "127.0.0.1:0"\n\n'
        f'[[apis]]\nname = "echo"\npath = "echo"\nservice_url = "{echo_url}"\n'
    )
    process, lines, stderr = await _run_supervisor(config, tmp_path, "--workers", "2")
    try:
        record = await lines.until(
            lambda r: r["event"] in ("workers_started", "worker_exited", "worker_boot_failed")
        )
        if record["event"] != "workers_started":
            process.kill()
            pytest.fail(f"a worker died: {record}\n{await _read_all(stderr)}")
        port = int(record["address"].split(":")[1])
        client = await RawClient.connect(port)
        assert client.response is not None and client.response.status == 101
        await client.close()
        await client.receive_close()
        await client.aclose()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await process.stdout.aclose()  # type: ignore[union-attr]
        await stderr.aclose()


@pytest.mark.deadline(60)
async def test_workers_that_cannot_start_stop_the_supervisor_with_their_error(
    echo_url: str, tmp_path: Path
) -> None:
    # The files exist (the config is valid) but hold no certificate: each worker fails
    # to load them, before serving; restarting it would only fail again.
    (tmp_path / "gw.pem").write_text("not a certificate\n")
    (tmp_path / "gw-key.pem").write_text("not a key\n")
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[gateway]\nlisten = "127.0.0.1:0"\n\n'
        f'[gateway.tls]\ncertificate = "gw.pem"\nprivate_key = "gw-key.pem"\n\n'
        f'[[apis]]\nname = "echo"\npath = "echo"\nservice_url = "{echo_url}"\n'
    )
    process, lines, stderr = await _run_supervisor(config, tmp_path, "--workers", "2")
    try:
        errors = ""
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def collect() -> None:
                    nonlocal errors
                    errors = await _read_all(stderr)

                nursery.start_soon(collect)
                code = await process.wait()
        assert code == 1
        failed = await lines.until(lambda r: r["event"] == "worker_boot_failed")
        assert failed["level"] == "error"
        assert "cannot load the gateway's TLS certificate" in failed["error"]
        assert not [r for r in lines.seen if r["event"] in ("workers_started", "worker_restarting")]
        # The worker's own error, and the supervisor's last word, on stderr.
        assert "wsgate: cannot load the gateway's TLS certificate" in errors
        last = errors.strip().splitlines()[-1]
        assert last.startswith("wsgate: worker ") and "failed to start (exit status 1)" in last
        assert "cannot load the gateway's TLS certificate" in last
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await process.stdout.aclose()  # type: ignore[union-attr]
        await stderr.aclose()


def test_each_log_record_is_one_write_so_workers_sharing_stdout_never_interleave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Unbuffered (PYTHONUNBUFFERED=1 is common in containers), every write is a
    # system call: a record written in two could have another process's between.
    class Recorder:
        def __init__(self) -> None:
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    configure_logging()
    structlog.get_logger("wsgate").info("first", worker=0)
    structlog.get_logger("wsgate").warning("second", worker=1)
    assert len(recorder.writes) == 2
    assert all(write.endswith("\n") and write.count("\n") == 1 for write in recorder.writes)
    assert [json.loads(write)["event"] for write in recorder.writes] == ["first", "second"]

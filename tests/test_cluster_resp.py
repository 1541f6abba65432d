"""The lean RESP connection the cluster's scripts use, against a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trustme

from wsgate.cluster.redis import RedisClient
from wsgate.cluster.resp import RedisReplyError, RespConnection, encode
from wsgate.cluster.settings import ClusterConfig
from wsgate.errors import ClusterUnavailable

from .redis_server import RedisServer, command, free_port


@contextmanager
def redis_listening(workdir: Path, *options: str) -> Iterator[None]:
    """A redis-server of its own with ``options`` (a unix socket, TLS), until it is ready."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is missing (make test installs it)"
    log = workdir / "redis.log"
    args = ["--save", "", "--appendonly", "no", "--dir", str(workdir), "--logfile", str(log)]
    process = subprocess.Popen([binary, *args, *options])
    try:
        deadline = time.monotonic() + 10
        while "ready to accept connections" not in (
            log.read_text().lower() if log.exists() else ""
        ):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield
    finally:
        process.kill()
        process.wait()


def test_commands_are_resp_arrays_of_bulk_strings() -> None:
    assert encode(("EVALSHA", "ab", 1, "k", "é")) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n"
    )


async def test_replies_of_every_type_and_error_replies(redis_url: str) -> None:
    conn = await RespConnection.open(redis_url)
    try:
        assert await conn.call("SET", "k", "v" * 100_000) == "OK"
        assert await conn.call("GET", "k") == "v" * 100_000  # read in several chunks
        assert await conn.call("INCR", "n") == 1
        assert await conn.call("GET", "missing") is None
        assert await conn.call("EVAL", "return {1, 'a', {2}}", 0) == [1, "a", [2]]
        with pytest.raises(RedisReplyError, match="NOSCRIPT"):
            await conn.call("EVALSHA", "0" * 40, 0)
        assert await conn.call("PING") == "PONG"  # an error reply leaves it usable
    finally:
        await conn.aclose()


async def test_password_user_and_database_from_the_url(own_redis: RedisServer) -> None:
    assert command(own_redis.port, "ACL", "SETUSER", "gw", "on", ">s3cret", "~*", "+@all")
    assert command(own_redis.port, "CONFIG", "SET", "requirepass", "top").startswith(b"+OK")
    base = f"127.0.0.1:{own_redis.port}"
    conn = await RespConnection.open(f"redis://gw:s3cret@{base}/3")
    try:
        await conn.call("SET", "where", "db3")
    finally:
        await conn.aclose()
    conn = await RespConnection.open(f"redis://:top@{base}/0?db=3")
    try:
        assert await conn.call("GET", "where") == "db3"
    finally:
        await conn.aclose()
    with pytest.raises(RedisReplyError):
        await RespConnection.open(f"redis://:wrong@{base}/0")


async def test_a_wrong_password_is_cluster_unavailable_not_a_crash(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    assert command(own_redis.port, "CONFIG", "SET", "requirepass", "top").startswith(b"+OK")
    config = ClusterConfig(redis_url=f"redis://:wrong@127.0.0.1:{own_redis.port}/0", timeout=2.0)
    client = await nursery.start(RedisClient(config).run)
    with pytest.raises(ClusterUnavailable):
        await client.script("return 1", [], [])
    assert client.errors == 1 and not client.available


async def test_the_socket_sends_each_command_at_once(redis_url: str) -> None:
    # TCP_NODELAY: a command is not held back until the previous reply's ACK.
    conn = await RespConnection.open(redis_url)
    try:
        assert isinstance(conn.stream, trio.SocketStream)
        assert conn.stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        await conn.aclose()


async def test_a_command_larger_than_the_send_buffer_is_sent_whole(redis_url: str) -> None:
    # The first write takes what the socket's buffer holds; Trio sends the rest.
    conn = await RespConnection.open(redis_url)
    try:
        assert isinstance(conn.stream, trio.SocketStream)
        buffer = conn.stream.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        value = "x" * (4 * buffer + 12345)
        assert await conn.call("SET", "big", value) == "OK"
        assert await conn.call("STRLEN", "big") == len(value)
        assert await conn.call("PING") == "PONG"
    finally:
        await conn.aclose()


async def test_a_call_cancelled_before_it_starts_sends_nothing(redis_url: str) -> None:
    conn = await RespConnection.open(redis_url)
    try:
        with trio.CancelScope() as scope:
            scope.cancel()
            await conn.call("INCR", "n")
        assert scope.cancelled_caught
        assert await conn.call("GET", "n") is None  # never ran; the connection is still in step
    finally:
        await conn.aclose()


async def test_redis_closing_the_connection_is_an_error_not_a_hang(redis_url: str) -> None:
    conn = await RespConnection.open(redis_url)
    try:
        assert isinstance(conn.stream, trio.SocketStream)
        host, port = conn.stream.socket.getsockname()[:2]
        address = f"{host}:{port}"
        assert await conn.call("CLIENT", "KILL", "ADDR", address, "SKIPME", "no") == 1  # itself
        with pytest.raises(OSError):  # ConnectionError: closed, or reset
            await conn.call("PING")
    finally:
        await conn.aclose()


async def test_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    with redis_listening(tmp_path, "--port", "0", "--unixsocket", str(path)):
        conn = await RespConnection.open(f"unix://{path}?db=2")
        try:
            assert await conn.call("SET", "k", "v" * 100_000) == "OK"
            assert await conn.call("GET", "k") == "v" * 100_000
            assert await conn.call("EVAL", "return redis.call('TIME')[1] ~= nil", 0) == 1
        finally:
            await conn.aclose()


async def test_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    monkeypatch.setenv("SSL_CERT_FILE", str(files["ca"]))  # what the default context trusts
    port = free_port()
    tls = ["--tls-port", str(port), "--tls-auth-clients", "no"]
    tls += ["--tls-cert-file", str(files["cert"]), "--tls-key-file", str(files["key"])]
    tls += ["--tls-ca-cert-file", str(files["ca"])]
    with redis_listening(tmp_path, "--port", "0", *tls):
        conn = await RespConnection.open(f"rediss://127.0.0.1:{port}/0")
        try:
            assert isinstance(conn.stream, trio.SSLStream)
            value = "v" * 300_000  # larger than a TLS record and a socket buffer
            assert await conn.call("SET", "k", value) == "OK"
            assert await conn.call("GET", "k") == value
            with pytest.raises(RedisReplyError, match="NOSCRIPT"):
                await conn.call("EVALSHA", "0" * 40, 0)
        finally:
            await conn.aclose()

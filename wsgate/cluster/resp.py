"""One lean Redis connection for the cluster's scripts: RESP on a Trio stream.

coredis (which :mod:`.redis` keeps for pub/sub) costs about 350 us of CPU per
call here: a writer task, memory streams and several task switches for each
command. A counting check is one ``EVALSHA`` and its reply, so this module
does only that: it writes the command and reads the reply on the caller's own
task, and lets ``hiredis`` (Redis's own C parser, sans-io) parse the reply.

Over TCP and unix sockets a call writes and reads the socket itself
(non-blocking, on its descriptor) and parks on the Trio loop only to wait for
the reply: one trip through the scheduler per call. ``SocketStream.send_all``
and ``receive_some`` each add a scheduling point of their own (three per
call): about 30 us more CPU per check, and with checks 2 ms apart about
35 us more wall time (``python -m benchmarks.cluster_calls --compare``,
docs/cluster.md). TLS (``rediss://``) goes through
:class:`trio.SSLStream`. Trio's ``SocketStream`` sets ``TCP_NODELAY``, so a
command is never held back waiting for a previous segment's ACK.

A connection is used by one call at a time (:class:`~.redis.RedisClient`
keeps a pool); a call that fails or is cancelled mid-way leaves the
connection in an unknown state, so the caller closes it.
"""

from __future__ import annotations

import os
import ssl
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

__all__ = ["RedisReplyError", "RespConnection", "encode"]


class RedisReplyError(Exception):
    """Redis answered a command with an error reply (``-ERR ...``, ``-NOSCRIPT ...``)."""


def encode(args: tuple[object, ...]) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespConnection:
    """A connection to Redis; :meth:`open` one from a redis://, rediss:// or unix:// URL."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        # Imported here: hiredis comes with the cluster extra, like coredis.
        import hiredis

        self.stream = stream
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self._error = hiredis.ReplyError
        # The socket's descriptor when nothing (TLS) sits between us and it.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None

    @classmethod
    async def open(cls, url: str) -> RespConnection:
        """Connect, authenticate and select the database the URL names."""
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        stream: trio.abc.Stream
        if parts.scheme == "unix":
            stream = await trio.open_unix_socket(parts.path)
        else:
            stream = await trio.open_tcp_stream(parts.hostname or "localhost", parts.port or 6379)
            if parts.scheme == "rediss":
                context = ssl.create_default_context()
                stream = trio.SSLStream(stream, context, server_hostname=parts.hostname)
        conn = cls(stream)
        try:
            if isinstance(stream, trio.SSLStream):
                await stream.do_handshake()
            if parts.password is not None:
                user = [unquote(parts.username)] if parts.username else []
                await conn.call("AUTH", *user, unquote(parts.password))
            db = query.get("db") or parts.path.strip("/")
            if db and db != "0":
                await conn.call("SELECT", db)
        except BaseException:
            await conn.aclose()
            raise
        return conn

    async def call(self, *args: object) -> Any:
        """Send one command and return its reply; RedisReplyError for an error reply."""
        data = encode(args)
        fd = self._fd
        if fd is None:
            await self.stream.send_all(data)
        else:
            # Cancelled already: send nothing (a command sent is a command run).
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):  # a full send buffer: let Trio wait for room
                await self.stream.send_all(data[sent:])
        while True:
            reply = self._reader.gets()
            if reply is not False:
                if isinstance(reply, self._error):
                    raise RedisReplyError(str(reply))
                return reply
            chunk: bytes
            if fd is None:
                chunk = bytes(await self.stream.receive_some(65536))
            else:
                await trio.lowlevel.wait_readable(fd)
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue  # woken without data: wait again
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            self._reader.feed(chunk)

    async def aclose(self) -> None:
        """Close at once (shielded: it must happen even inside a cancelled scope)."""
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)

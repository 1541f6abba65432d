"""The errors wsgate raises, and the one place foreign exceptions are mapped to them.

Tree::

    WsgateError
    ├── ConfigError            a config file or object is invalid (every problem listed)
    ├── WorkerBootFailure      a ``--workers`` worker exited before serving (exit 1)
    ├── HandshakeRejected      the client's upgrade request is answered with an HTTP error
    │   ├── OutOfFileDescriptors the process has no descriptor left (accepting the
    │   │                        client, or opening its backend)  -> 503, Retry-After
    │   └── BackendError       the backend could not be used for this handshake
    │       ├── BackendUnreachable   connect/TLS failed           -> 502
    │       ├── BackendTimeout       no complete handshake in time -> 504
    │       ├── BackendRejected      the backend answered non-101  -> its status
    │       └── BackendProtocolError the backend's answer was not a valid upgrade -> 502
    ├── ProxyHeaderError       no valid PROXY protocol header (or an untrusted peer):
    │                          the connection is closed unanswered, never read as HTTP
    ├── ProtocolError          a peer broke WebSocket framing rules  -> close 1002
    │   └── MessageTooBig      a message exceeded max_message_size   -> close 1009
    └── ClusterUnavailable     Redis ([cluster]) did not answer a check in time; the
                               counting policy answers 503 or admits (on_unavailable)

A connection task never lets any of these (or anything else) escape: handshake
errors become HTTP responses, protocol errors become close frames (the codes
are :mod:`wsgate.closing`'s), and anything unexpected is logged and closes the
pair with 1011. Foreign exceptions met while opening a backend (OSError, ssl,
Trio's stream errors and its ``TooSlowError``) become these types in
:func:`map_backend_errors` only.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import trio


class WsgateError(Exception):
    """Base of every error wsgate raises."""


class ConfigError(WsgateError):
    """A configuration is invalid; ``problems`` holds every "FILE: KEY: reason" line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class WorkerBootFailure(WsgateError):
    """A worker of ``wsgate serve --workers N`` exited before it was serving."""


class HandshakeRejected(WsgateError):
    """The client's opening handshake is refused with an HTTP status.

    ``reason`` is a short machine-readable tag for the gateway log
    (``last_error_reason``); the message is the human-readable text sent in the
    response body.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        reason: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = headers or []
        self.body = body
        self.source = source


#: Seconds a client refused for capacity or descriptors is told to wait before retrying.
RETRY_AFTER = 1


class OutOfFileDescriptors(HandshakeRejected):
    """The process ran out of file descriptors (EMFILE/ENFILE): 503, retry soon."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "gateway is out of file descriptors",
            reason="OutOfFileDescriptors",
            headers=[("Retry-After", str(RETRY_AFTER))],
        )


class BackendError(HandshakeRejected):
    """The backend could not be used for this handshake."""


class BackendUnreachable(BackendError):
    """TCP connect or TLS to the backend failed."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message, reason="BackendConnectionFailure")


class BackendTimeout(BackendError):
    """The backend did not complete its handshake within backend_connect_timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(504, message, reason="BackendTimeout")


class BackendRejected(BackendError):
    """The backend answered the upgrade with a non-101 status; it is relayed to the client."""

    def __init__(
        self, status: int, message: str, *, body: bytes, headers: list[tuple[str, str]]
    ) -> None:
        super().__init__(status, message, reason="BackendRejected", body=body, headers=headers)


class BackendProtocolError(BackendError):
    """The backend's answer was not a valid WebSocket upgrade response."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message, reason="BackendProtocolError")


class ProxyHeaderError(WsgateError):
    """A connection to a ``proxy_protocol`` listener did not start with a valid header.

    ``reason`` is the ``reason`` label of ``wsgate_proxy_protocol_refused_total``
    (``not_proxy``, ``malformed``, ``unsupported``, ``oversize``, ``truncated``,
    ``timeout``, ``untrusted``); nothing is sent back, since the peer may not
    even speak HTTP.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ProtocolError(WsgateError):
    """A peer broke the WebSocket framing rules; the pair closes with 1002."""


class MessageTooBig(ProtocolError):
    """A message exceeded the API's max_message_size; the sender gets 1009."""


class ClusterUnavailable(WsgateError):
    """The shared counters (Redis, ``[cluster]``) could not be read or updated in time.

    Raised by :mod:`wsgate.cluster.redis`, the one boundary where the Redis
    client's and Trio's exceptions are mapped; the counting policy that made the
    check applies ``on_unavailable``.
    """


@contextmanager
def map_backend_errors(what: str) -> Iterator[None]:
    """Turn foreign I/O exceptions met while opening a backend into BackendErrors.

    This is the single boundary where OSError, ssl and Trio stream errors from the
    backend side become wsgate's own types, and so is the caller's
    ``trio.fail_after(backend_connect_timeout)`` when it is entered inside this
    block: its ``TooSlowError`` becomes :class:`BackendTimeout`.
    """
    try:
        yield
    except trio.TooSlowError:
        raise BackendTimeout(f"{what}: no complete handshake in time") from None
    except (ssl.SSLError, trio.BrokenResourceError) as exc:
        # A failed TLS handshake raises the ssl error itself; a TLS leg that
        # breaks afterwards raises BrokenResourceError *from* its cause.
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise BackendUnreachable(
                f"{what}: TLS verification failed: {cause.verify_message}"
            ) from exc
        raise BackendUnreachable(f"{what}: TLS/connection failed: {cause or exc}") from exc
    except OSError as exc:
        if out_of_fds(exc):
            raise OutOfFileDescriptors from exc
        raise BackendUnreachable(f"{what}: {exc.strerror or exc}") from exc


def out_of_fds(exc: BaseException | None) -> bool:
    """EMFILE/ENFILE anywhere in ``exc``'s causes (trio's happy eyeballs wraps them)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            return True
        if isinstance(exc, BaseExceptionGroup):
            return any(out_of_fds(inner) for inner in exc.exceptions)
        exc = exc.__cause__
    return False

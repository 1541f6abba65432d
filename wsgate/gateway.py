"""The gateway: listeners, the per-connection task, capacity, drain.

Embedding (see docs/embedding.md)::

    config = wsgate.load_config("gateway.toml")
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(wsgate.Gateway(config).run)
        print(gateway.addresses)       # real ports, so listen = "127.0.0.1:0" works
        ...
        await gateway.drain()          # close every pair with 1001 and return

Each accepted client is served by :meth:`Gateway._serve_client` in its own
task. The task reads the upgrade request, runs the API's onHandshake policies,
opens the backend, answers 101 and then owns the :class:`~wsgate.relay.Pair`
whose nursery holds the two relay tasks. Nothing escapes that task: refusals
become HTTP responses, failures after the 101 become close frames (1011), and
everything is logged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import structlog
import trio

from .backend import open_backend
from .clientaddr import client_address
from .closing import End, close_plan
from .cluster.names import counter_names
from .cluster.redis import RedisClient
from .cluster.store import CounterStore, MemoryStore, RedisStore
from .config import ApiConfig, Config, Listen
from .errors import (
    RETRY_AFTER,
    BackendRejected,
    HandshakeRejected,
    OutOfFileDescriptors,
    ProxyHeaderError,
    map_backend_errors,
    out_of_fds,
)
from .frames import build_close_frame
from .handshake import (
    MAX_REQUEST_HEAD,
    ClientRequest,
    RequestParser,
    backend_headers,
    error_response,
    redact_target,
    switching_protocols,
    validate_upgrade,
)
from .logs import utc_now
from .netio import (
    PEER_GONE,
    SHARED_BUFFER,
    Endpoint,
    RawSocket,
    TLSSocket,
    set_keepalive,
)
from .policies.pipeline import all_policies, pipeline
from .policies.subscription import check_subscription
from .policy import HandshakeContext, PairStats, Policy, secret_query_parameters
from .proxyproto import ProxyHeaderParser, RefusalLog
from .reactor import Reactor
from .relay import Pair
from .routing import Router

#: The name of every connection task (see ``trio.lowlevel.current_task().name``).
_TASK_NAME = "wsgate.connection"
#: Connections accepted back to back before the accept loop lets other tasks run.
_ACCEPTS_BEFORE_YIELD = 16


@attrs.frozen
class GatewayStats:
    """A snapshot of a running gateway."""

    active_pairs: int
    capacity: int
    handshakes_in_progress: int
    draining: bool
    #: Connections a proxy_protocol listener closed unread, by reason.
    proxy_protocol_refused: Mapping[str, int] = attrs.Factory(dict)


@attrs.define
class _HandshakeLog:
    """The gateway-log record of one handshake, filled in as it progresses."""

    correlation_id: str
    caller_ip_address: str
    timestamp: str = attrs.Factory(utc_now)
    started: float = attrs.Factory(trio.current_time)
    api_id: str | None = None
    method: str | None = None
    url: str | None = None
    response_code: int | None = None
    backend_response_code: int | None = None
    backend_url: str | None = None
    subprotocol: str | None = None
    backend_time: float | None = None
    last_error_reason: str | None = None
    last_error_message: str | None = None
    last_error_source: str | None = None
    extra: dict[str, object] = attrs.Factory(dict)

    def emit(self, log: Any, observers: Sequence[Observer]) -> None:
        record: dict[str, Any] = {
            "timestamp": self.timestamp,
            "correlation_id": self.correlation_id,
            "api_id": self.api_id,
            "operation_id": "onHandshake",
            "method": self.method,
            "url": self.url,
            "caller_ip_address": self.caller_ip_address,
            "response_code": self.response_code,
            "backend_response_code": self.backend_response_code,
            "backend_url": self.backend_url,
            "subprotocol": self.subprotocol,
            "total_time": round((trio.current_time() - self.started) * 1000, 3),
            "backend_time": None
            if self.backend_time is None
            else round(self.backend_time * 1000, 3),
            "is_request_success": self.response_code == 101,
            "last_error_reason": self.last_error_reason,
            "last_error_message": self.last_error_message,
            "last_error_source": self.last_error_source,
            **self.extra,
        }
        log.info("handshake", **record)
        for observer in observers:
            try:
                observer.handshake(record)
            except Exception:
                # An observer watches the traffic: its bug must not cost a connection.
                log.exception("observer_failed", observer=type(observer).__name__)


@attrs.frozen
class _Opened:
    """A pair past its 101, and what its connection task needs once relaying ends."""

    pair: Pair
    slot: object  # the capacity limiter's borrower token
    cleanups: tuple[Callable[[PairStats], None], ...]
    client_initial: bytes  # bytes the client sent behind its request
    backend_initial: bytes  # bytes the backend sent behind its 101


class Observer(Protocol):
    """Receives every gateway-log record as it is logged (metrics, tests, audit)."""

    def handshake(self, record: Mapping[str, Any]) -> None:
        """A handshake ended (``response_code`` 101 or the refusal's status)."""
        ...

    def disconnect(self, pair: Pair, record: Mapping[str, Any]) -> None:
        """``pair`` ended; ``record`` is its disconnect log record."""
        ...


class Gateway:
    """A WebSocket API gateway serving ``config``; start it with ``nursery.start(gw.run)``."""

    def __init__(
        self,
        config: Config,
        *,
        policies: Mapping[str, Sequence[Policy]] | None = None,
        observers: Sequence[Observer] = (),
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        self._reuse_port = reuse_port  # several worker processes share the port
        self._keepalive: tuple[int, int, int] | None = None  # set by run()
        self._observers = tuple(observers)
        self._policies = dict(policies or {})
        self._secret_query = self._secret_query_names(config)
        self._router = Router(config.apis)
        self._limiter = trio.CapacityLimiter(config.gateway.max_connections)
        self._pairs: dict[str, Pair] = {}
        self._policy_state: dict[
            int, tuple[object, Any]
        ] = {}  # rate-limit counters etc., by policy
        # Where the limits policies count: memory, or Redis with [cluster].
        self._cluster: RedisStore | None = None
        self._counters: CounterStore = MemoryStore(self._policy_state)
        if config.cluster is not None:
            self._cluster = RedisStore(
                RedisClient(config.cluster), counter_names(config, self._policies)
            )
            self._counters = self._cluster
        self._handshaking = 0
        self._draining = False
        self._proxy_refused: dict[str, int] = {}
        self._proxy_refusal_log = RefusalLog()
        self._addresses: list[tuple[str, int]] = []
        self._accepting = trio.CancelScope()
        self._connections: trio.Nursery | None = None
        self._stopped = trio.Event()
        self._reactor = Reactor() if config.gateway.relay_engine == "reactor" else None
        self._log = structlog.get_logger("wsgate")
        self._server_ssl: ssl.SSLContext | None = None
        if config.gateway.tls:
            self._server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._server_ssl.minimum_version = ssl.TLSVersion.TLSv1_2
            self._server_ssl.load_cert_chain(
                config.gateway.tls.certificate, config.gateway.tls.private_key
            )

    # -- public --------------------------------------------------------------------
    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs actually bound, valid once :meth:`run` has started."""
        return list(self._addresses)

    @property
    def url(self) -> str:
        """The ws:// or wss:// base URL of the first listener."""
        host, port = self._addresses[0]
        host = f"[{host}]" if ":" in host else host
        return f"{'wss' if self._server_ssl else 'ws'}://{host}:{port}"

    @property
    def cluster(self) -> RedisStore | None:
        """The Redis counter store shared with the other units ([cluster]), if any."""
        return self._cluster

    @property
    def pairs(self) -> Mapping[str, Pair]:
        """Open pairs by correlation id (a live, read-only view)."""
        return self._pairs

    def update_config(self, config: Config) -> None:
        """Serve ``config`` from the next handshake on; open pairs are untouched.

        The listen address and TLS settings are fixed for a running gateway.
        Lowering max_connections never closes pairs; new handshakes wait for
        the count to fall under the new limit.
        """
        old = self.config.gateway
        if (config.gateway.listen, config.gateway.tls, config.gateway.relay_engine) != (
            old.listen,
            old.tls,
            old.relay_engine,
        ):
            raise ValueError("listen, tls and relay_engine cannot change while the gateway runs")
        if config.cluster != self.config.cluster:
            raise ValueError("[cluster] cannot change while the gateway runs")
        if self._cluster is not None:
            self._cluster.names = counter_names(config, self._policies)
        self._router = Router(config.apis)
        self._limiter.total_tokens = config.gateway.max_connections
        self._secret_query = self._secret_query_names(config)
        self.config = config
        # Counters of policies that left the config go; unchanged policy objects
        # (the management API keeps them) keep theirs.
        live = {id(policy) for policy in all_policies(config)}
        live.update(id(policy) for policies in self._policies.values() for policy in policies)
        for key in [key for key in self._policy_state if key not in live]:
            del self._policy_state[key]
        self._log.info("config_updated", apis=[api.name for api in config.apis])

    def _secret_query_names(self, config: Config) -> frozenset[str]:
        """Query parameters redacted in every log line, beyond the built-in list.

        Gathered from the whole config, whichever API a request is for: a name
        redacted too often costs nothing, one missed leaks a secret.
        """
        policies = [*all_policies(config), *(p for ps in self._policies.values() for p in ps)]
        return frozenset(
            name.lower()
            for name in (
                *(api.subscription_key_query for api in config.apis),
                *config.gateway.redact_query_parameters,
                *(name for policy in policies for name in secret_query_parameters(policy)),
            )
        )

    def terminate(self, correlation_id: str, reason: str = "terminated by operator") -> bool:
        """Close one pair with 1008 and ``reason``; False if no such pair is open."""
        pair = self._pairs.get(correlation_id)
        if pair is None:
            return False
        pair.stop(End.TERMINATED, reason)
        return True

    def terminate_api(self, api: str, reason: str = "API removed") -> int:
        """Close every open pair of ``api`` with 1001 "going away"; return how many."""
        pairs = [pair for pair in self._pairs.values() if pair.api == api]
        for pair in pairs:
            pair.stop(End.DRAIN, reason)
        return len(pairs)

    def stats(self) -> GatewayStats:
        """Current counts: open pairs, capacity, handshakes under way, draining."""
        return GatewayStats(
            active_pairs=len(self._pairs),
            capacity=self.config.gateway.max_connections,
            handshakes_in_progress=self._handshaking,
            draining=self._draining,
            proxy_protocol_refused=dict(self._proxy_refused),
        )

    async def run(
        self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report ``self`` through ``task_status``, serve until drained or cancelled."""
        listeners = await bind_listeners(self.config.gateway.listen, reuse_port=self._reuse_port)
        # Read once, like the listeners: accepted sockets inherit the listeners' options.
        self._keepalive = self.config.gateway.keepalive
        if self._keepalive is not None:
            for listener in listeners:
                set_keepalive(listener, *self._keepalive)
        self._addresses = [tuple(sock.getsockname()[:2]) for sock in listeners]
        try:
            async with trio.open_nursery() as engine:
                if self._reactor is not None:
                    await engine.start(self._reactor.run)
                if self._cluster is not None:
                    await engine.start(self._cluster.run)
                async with trio.open_nursery() as connections:
                    self._connections = connections
                    with self._accepting:
                        async with trio.open_nursery() as acceptors:
                            for listener in listeners:
                                acceptors.start_soon(self._accept_loop, listener)
                            self._log.info(
                                "gateway_started",
                                addresses=[str(Listen(host=h, port=p)) for h, p in self._addresses],
                                apis=[api.name for api in self.config.apis],
                                max_connections=self.config.gateway.max_connections,
                                relay_engine=self.config.gateway.relay_engine,
                                tls=self._server_ssl is not None,
                            )
                            task_status.started(self)
                # Every pair has ended: the pump has nothing left to serve.
                if self._cluster is not None:
                    await self._cluster.flush()  # their leases, at once
                engine.cancel_scope.cancel()
        finally:
            for listener in listeners:
                listener.close()
            self._stopped.set()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, close every pair with 1001, and wait for them.

        Pairs still open after ``timeout`` seconds (default: the config's
        ``drain_timeout``) are cut. Returns once :meth:`run` has returned.
        """
        if timeout is None:
            timeout = self.config.gateway.drain_timeout
        self._draining = True
        self._accepting.cancel()
        open_pairs = len(self._pairs)
        self._log.info("drain_started", open_pairs=open_pairs, timeout=timeout)
        for pair in list(self._pairs.values()):
            pair.stop(End.DRAIN)
        with trio.move_on_after(timeout):
            await self._stopped.wait()
        if not self._stopped.is_set() and self._connections is not None:
            self._connections.cancel_scope.cancel()
            await self._stopped.wait()
        self._log.info("drain_finished", open_pairs_at_start=open_pairs)

    def _disconnected(self, pair: Pair, record: dict[str, Any]) -> None:
        for observer in self._observers:
            try:
                observer.disconnect(pair, record)
            except Exception:
                pair.log.exception("observer_failed", observer=type(observer).__name__)

    # -- accepting -----------------------------------------------------------------
    async def _accept_loop(self, listener: socket.socket) -> None:
        # A spare descriptor lets us accept and refuse a client with 503 even when
        # the process has run out of them, instead of spinning on EMFILE.
        reserve: int | None = os.open(os.devnull, os.O_RDONLY)
        connections = self._connections
        assert connections is not None
        fd = listener.fileno()
        in_a_row = 0
        try:
            while True:
                # Accept what is queued before waiting, and let other tasks run
                # every few accepts: a flood of connections must not starve pairs.
                if in_a_row >= _ACCEPTS_BEFORE_YIELD:
                    in_a_row = 0
                    await trio.lowlevel.checkpoint()
                try:
                    sock, address = listener.accept()
                except BlockingIOError:
                    in_a_row = 0
                    await trio.lowlevel.wait_readable(fd)
                    continue
                except OSError as exc:
                    if not out_of_fds(exc) or reserve is None:
                        if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                            continue
                        raise
                    os.close(reserve)
                    reserve = None
                    await self._refuse_for_fds(listener)
                    reserve = _reopen_reserve()
                    continue
                in_a_row += 1
                # A constant name: Trio would otherwise format one string per task.
                connections.start_soon(self._serve_client, sock, address, name=_TASK_NAME)
        finally:
            if reserve is not None:
                os.close(reserve)

    async def _refuse_for_fds(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            await trio.sleep(0.05)  # still none (or nobody waiting): back off rather than spin
            return
        self._log.warning("out_of_file_descriptors", limit=fd_limit())
        with sock:
            rejection = OutOfFileDescriptors()
            try:
                sock.setblocking(False)
                # Read the request first (briefly): closing with it unread would
                # reset the connection and could destroy our answer.
                with trio.move_on_after(0.2):
                    await trio.lowlevel.wait_readable(sock)
                    sock.recv(MAX_REQUEST_HEAD)
                sock.send(error_response(rejection))
                sock.shutdown(socket.SHUT_WR)
                # What else is queued goes too (without waiting: the accept loop
                # waits for us): closing with it unread would also send a reset.
                for _ in range(16):  # a few reads: a client that keeps sending gets no more
                    if not sock.recv(MAX_REQUEST_HEAD):
                        break
            except OSError:
                pass

    # -- one client ----------------------------------------------------------------
    async def _serve_client(self, sock: socket.socket, address: Any) -> None:
        """The connection task: handshake, then relay. Never raises but Cancelled."""
        try:
            opened = await self._handshake(sock, address)
            # What the handshake read and decided dies with its frames: an idle pair
            # holds only what relaying needs (memory per pair is a benchmark figure).
            del sock, address
            if opened is None:
                return
            # Relaying happens here rather than in a helper coroutine: one frame less
            # per pair. Only what the end needs is kept, not the _Opened holding it.
            pair, slot, cleanups = opened.pair, opened.slot, opened.cleanups
            client_initial, backend_initial = opened.client_initial, opened.backend_initial
            del opened
            self._pairs[pair.correlation_id] = pair
            try:
                if self._draining:
                    pair.stop(End.DRAIN)
                await pair.run(client_initial, backend_initial)
            finally:
                del self._pairs[pair.correlation_id]
                self._limiter.release_on_behalf_of(slot)
                _run_cleanups(cleanups, pair.stats(), pair.log)
        except Exception:
            # The last line of defence, as in hypercorn's task group: what escaped
            # the handshake's and the relay's own handling (a host application's
            # log processor that raises, say) costs this connection only, never
            # the gateway and its other connections. Its sockets are closed by then.
            with contextlib.suppress(Exception):
                self._log.exception("connection_task_failed")

    async def _handshake(self, sock: socket.socket, address: Any) -> _Opened | None:
        """Read the request, run onHandshake, open the backend and answer 101.

        Returns the opened pair, or None once the client has been refused (and
        the refusal logged) or has left. Never raises but Cancelled.
        """
        record = _HandshakeLog(correlation_id=str(uuid.uuid4()), caller_ip_address=address[0])
        log = self._log.bind(correlation_id=record.correlation_id)
        client: Endpoint | None = None
        handed_over = False
        self._handshaking += 1  # until the request is read (wsgate_handshakes_in_progress)
        counted = True
        peer: str = address[0]
        initial = b""  # bytes read behind a PROXY header
        deadline: float | None = None
        read: tuple[ClientRequest, bytes] | None = None
        try:
            if self.config.gateway.proxy_protocol:
                # The header comes first, before TLS: read it under the handshake's deadline.
                deadline = trio.current_time() + self.config.gateway.handshake_timeout
                proxied = await self._proxy_header(sock, peer, deadline)
                if proxied is None:
                    return None  # refused (logged, counted) or a bare TCP check
                peer, initial = proxied
                record.caller_ip_address = peer
            parser = RequestParser(client_ip=peer, secure=self._server_ssl is not None)
            if self._server_ssl is None:
                # Straight from the accepted socket: a SocketStream would cost syscalls
                # for nothing. The request usually follows the connection at once:
                # take what is queued before arming handshake_timeout, which only
                # bounds waiting (entering a deadline costs Trio about what a park does).
                client = RawSocket(sock)
                read = _queued_request(client, parser, initial)
            if read is None and not parser.closed:
                if deadline is None:
                    deadline = trio.current_time() + self.config.gateway.handshake_timeout
                with trio.fail_at(deadline):
                    if client is None:
                        client = await self._open_tls_client(sock, initial)
                    read = await _read_request(client, parser)
            if read is None:
                # Connected and left without a request: nothing to log. Its end
                # was read, so it gets a FIN; a reset would only hurt a client
                # that half-closed and still reads.
                if client is not None:
                    with trio.move_on_after(self.config.gateway.close_timeout):
                        await client.close(0)
                return None
            assert client is not None  # a request was read from it
            request, trailing = read
            if self.config.gateway.trusted:
                request = self._behind_proxies(request, peer)
                record.caller_ip_address = request.client_ip
            record.method = request.method
            record.url = redact_target(request.target, self._secret_query)
            self._handshaking -= 1
            counted = False
            opened = await self._broker(client, request, trailing, record, log)
            handed_over = True  # the pair owns the connection now
            return opened
        except HandshakeRejected as exc:
            await self._refuse(client, exc, record, log)
        except trio.TooSlowError:
            await self._refuse(
                client,
                HandshakeRejected(
                    408, "no complete handshake within handshake_timeout", reason="HandshakeTimeout"
                ),
                record,
                log,
            )
        except PEER_GONE:
            pass  # the client left before its request was complete: nothing to answer
        except ssl.SSLError as exc:
            # Only the TLS handshake raises it: the client got no request in.
            log.info("tls_handshake_failed", caller_ip_address=peer, error=str(exc))
        except Exception as exc:
            log.exception("connection_failed")
            if record.response_code is None:
                await self._refuse(
                    client,
                    HandshakeRejected(500, "internal gateway error", reason="InternalError"),
                    record,
                    log,
                    detail=repr(exc),
                )
        finally:
            if counted:
                self._handshaking -= 1
            if not handed_over:
                if client is not None:
                    client.abort()
                elif sock.fileno() != -1:
                    sock.close()
        return None

    async def _proxy_header(
        self, sock: socket.socket, peer: str, deadline: float
    ) -> tuple[str, bytes] | None:
        """Read the PROXY header: (the client it names, the bytes read past it).

        None once the connection is refused (logged, rate-limited, and counted:
        it is closed by the caller, unanswered) or closed without a byte.
        """
        try:
            if not self.config.gateway.trusted.trusts(peer):
                raise ProxyHeaderError("untrusted", "the peer is not in trusted_proxies")
            sock.setblocking(False)  # accepted sockets start blocking
            parser = ProxyHeaderParser()
            buf = SHARED_BUFFER[:8192]
            got = 0
            with trio.fail_at(deadline):
                while True:
                    try:
                        n = sock.recv_into(buf)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(sock)
                        continue
                    if n == 0 and got == 0:
                        return None  # a TCP health check: nothing to log
                    got += n
                    header = parser.feed(buf[:n])
                    if header is not None:
                        break
        except trio.TooSlowError:
            error = ProxyHeaderError(
                "timeout", "no complete PROXY protocol header within handshake_timeout"
            )
        except ProxyHeaderError as exc:
            error = exc
        except PEER_GONE:
            error = ProxyHeaderError("truncated", "connection reset before a PROXY header")
        else:
            # LOCAL, UNKNOWN, UNSPEC and UNIX name no client address: the peer stands.
            client = header.source[0] if header.source is not None else peer
            return client, parser.trailing
        self._proxy_refused[error.reason] = self._proxy_refused.get(error.reason, 0) + 1
        suppressed = self._proxy_refusal_log.admit(trio.current_time())
        if suppressed is not None:
            self._log.warning(
                "proxy_protocol_refused",
                peer_ip_address=peer,
                reason=error.reason,
                error=error.message,
                suppressed=suppressed,
            )
        return None

    def _behind_proxies(self, request: ClientRequest, peer: str) -> ClientRequest:
        """``request`` as from the client its trusted proxies name (wsgate.clientaddr)."""
        gateway = self.config.gateway
        found = client_address(
            peer, request.headers, gateway.trusted, header=gateway.forwarded_header
        )
        return attrs.evolve(
            request,
            client_ip=found.ip,
            peer_ip=peer,
            secure=request.secure if found.secure is None else found.secure,
        )

    async def _open_tls_client(self, sock: socket.socket, initial: bytes = b"") -> TLSSocket:
        assert self._server_ssl is not None
        tls = TLSSocket(sock, self._server_ssl, server_side=True, initial=initial)
        try:
            await tls.do_handshake()
        except BaseException:
            tls.abort()  # the caller's cleanup only knows the socket it passed us
            raise
        return tls

    async def _refuse(
        self,
        client: Endpoint | None,
        rejection: HandshakeRejected,
        record: _HandshakeLog,
        log: Any,
        detail: str | None = None,
    ) -> None:
        record.response_code = rejection.status
        record.last_error_reason = rejection.reason
        record.last_error_message = detail or rejection.message
        record.last_error_source = rejection.source
        if isinstance(rejection, BackendRejected):
            record.backend_response_code = rejection.status
        record.emit(log, self._observers)
        if client is None:
            return
        with trio.move_on_after(self.config.gateway.close_timeout):
            try:
                await client.send_all(error_response(rejection))
                await client.close(self.config.gateway.close_timeout)
            except PEER_GONE:
                pass

    async def _broker(
        self,
        client: Endpoint,
        request: ClientRequest,
        trailing: bytes,
        record: _HandshakeLog,
        log: Any,
    ) -> _Opened:
        """Run onHandshake, take a capacity slot, open the backend and answer 101."""
        match = self._router.match(request.path)
        if match is None:
            raise HandshakeRejected(404, "no API at this path", reason="ApiNotFound")
        api, rest = match
        record.api_id = api.name
        log = log.bind(api_id=api.name)
        upgrade = validate_upgrade(request)
        config = self.config  # one handshake sees one config, even across a reload
        access = check_subscription(config, api, request)
        ctx = HandshakeContext(
            request=request,
            api=api,
            backend=api.backend,
            rest=rest,
            query=access.query,
            headers=[
                header
                for header in backend_headers(request, upgrade, gateway_host=request.header("host"))
                if header[0] not in access.drop_headers
            ],
            states=self._policy_state,
            counter_store=self._counters,
            product=access.product,
            subscription=access.subscription,
        )
        ctx.log_fields.update(access.log_fields)
        record.extra = ctx.log_fields  # what policies add (product_id...) is logged
        policies = [*pipeline(config, api, access.product), *self._policies.get(api.name, ())]
        opened: _Opened | None = None
        try:
            for policy in policies:
                try:
                    await policy.on_handshake(ctx)
                except HandshakeRejected as exc:
                    exc.source = exc.source or policy.policy_name
                    raise
            if self._draining:
                raise HandshakeRejected(503, "gateway is shutting down", reason="Draining")
            slot = object()
            try:
                self._limiter.acquire_on_behalf_of_nowait(slot)
            except trio.WouldBlock:
                raise HandshakeRejected(
                    503,
                    f"gateway is at capacity ({self._limiter.total_tokens} connections)",
                    reason="CapacityExceeded",
                    headers=[("Retry-After", str(RETRY_AFTER))],
                ) from None
            try:
                pair, backend_initial = await self._connect(client, api, ctx, upgrade, record, log)
            except BaseException:
                self._limiter.release_on_behalf_of(slot)
                raise
            opened = _Opened(
                pair=pair,
                slot=slot,
                # A tuple: usually empty, and the empty tuple costs an idle pair nothing.
                cleanups=tuple(ctx.cleanups),
                client_initial=trailing,
                backend_initial=backend_initial,
            )
            return opened
        finally:
            if opened is None:
                # Policies' end-of-connection hooks (slots, quotas) run however it ended.
                _run_cleanups(ctx.cleanups, PairStats(), log)

    async def _connect(
        self,
        client: Endpoint,
        api: ApiConfig,
        ctx: HandshakeContext,
        upgrade: Any,
        record: _HandshakeLog,
        log: Any,
    ) -> tuple[Pair, bytes]:
        """Open the backend for ``api``, answer 101 and log the handshake.

        Returns the new pair and the bytes the backend sent behind its 101.
        """
        target = ctx.backend_target
        backend_scheme = "wss" if ctx.backend.secure else "ws"
        record.backend_url = redact_target(
            f"{backend_scheme}://{ctx.backend.host_header}{target}", self._secret_query
        )
        started = trio.current_time()
        try:
            # The deadline inside the mapping: its TooSlowError is a BackendTimeout.
            with (
                map_backend_errors(ctx.backend.url),
                trio.fail_after(self.config.gateway.backend_connect_timeout),
            ):
                backend = await open_backend(
                    ctx.backend,
                    target,
                    ctx.headers,
                    upgrade,
                    ca_file=api.backend_ca_file,
                    keepalive=self._keepalive,
                )
        finally:
            record.backend_time = trio.current_time() - started
        record.backend_response_code = 101
        try:
            await client.send_all(switching_protocols(upgrade.key, backend.accept))
        except PEER_GONE:
            await _goodbye_to_backend(backend.endpoint, self.config.gateway.close_timeout)
            raise
        except BaseException:
            backend.endpoint.abort()
            raise
        record.response_code = 101
        record.subprotocol = backend.accept.subprotocol
        try:
            pair = Pair(
                correlation_id=record.correlation_id,
                api=api.name,
                caller_ip=record.caller_ip_address,
                client=client,
                backend=backend.endpoint,
                max_message_size=api.max_message_size,
                allow_rsv=backend.accept.extensions is not None,
                idle_timeout=api.idle_timeout,
                close_timeout=self.config.gateway.close_timeout,
                log=self._log,
                deadline=None
                if ctx.deadline is None
                else trio.current_time() + (ctx.deadline - time.time()),
                deadline_reason=ctx.deadline_reason,
                limiter=ctx.message_limiter,
                on_disconnect=self._disconnected if self._observers else None,
                reactor=self._reactor,
            )
        except BaseException:
            backend.endpoint.abort()  # the client's is aborted by the caller
            raise
        record.emit(log, self._observers)
        return pair, backend.trailing


async def _goodbye_to_backend(backend: Endpoint, close_timeout: float) -> None:
    """Close an upgraded backend whose client left before its 101, as a pair would.

    The backend did nothing wrong: it hears what a pair whose client vanished
    tells it (:func:`~wsgate.closing.close_plan`) and gets our FIN, not a reset.
    """
    plan = close_plan(End.CLIENT_VANISHED)
    try:
        with trio.move_on_after(close_timeout):
            await backend.send_all(build_close_frame(plan.to_backend, plan.reason, mask=True))
            await backend.close(close_timeout)
    except PEER_GONE:
        pass
    finally:
        backend.abort()  # nothing left to do once closed; a reset if cut short


def _run_cleanups(
    cleanups: Sequence[Callable[[PairStats], None]], stats: PairStats, log: Any
) -> None:
    """Run policies' end-of-connection hooks; one failing does not skip the others."""
    for cleanup in cleanups:
        try:
            cleanup(stats)
        except Exception:
            log.exception("policy_cleanup_failed")


def _queued_request(
    client: RawSocket, parser: RequestParser, initial: bytes = b""
) -> tuple[ClientRequest, bytes] | None:
    """The request, if ``initial`` and the bytes already queued complete it; None if not (yet)."""
    if initial and (request := parser.feed(initial)) is not None:
        return request, parser.trailing
    buf = SHARED_BUFFER[:8192]
    n = client.recv_nowait(buf)
    if n < 0:
        return None
    request = parser.feed(buf[:n])
    return None if request is None else (request, parser.trailing)


async def _read_request(
    client: Endpoint, parser: RequestParser
) -> tuple[ClientRequest, bytes] | None:
    """Read the rest of one opening request; None if the client left without sending a byte."""
    buf = SHARED_BUFFER[:8192]
    while True:
        n = await client.recv_into(buf)
        request = parser.feed(buf[:n])
        if request is not None:
            return request, parser.trailing
        if parser.closed:
            return None


async def bind_listeners(listen: Listen, *, reuse_port: bool = False) -> list[socket.socket]:
    """Non-blocking listening sockets for every address ``listen.host`` resolves to.

    With ``reuse_port``, SO_REUSEPORT lets several processes listen on one port
    and the kernel spreads new connections among them.
    """
    infos = await trio.socket.getaddrinfo(
        listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(1024)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _reopen_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


def fd_limit() -> int:
    """The process's current soft limit on open file descriptors."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard limit (each pair needs two); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return fd_limit()

"""The onHandshake hook: the contract between the gateway and its policies.

A policy is a frozen attrs class registered under its config name
(:func:`wsgate.policies.registry.register`)::

    @register("check-header")
    @attrs.frozen(kw_only=True)
    class CheckHeader:
        name: str                       # fields = the policy's config keys
        ignore_case: bool = True
        ...
        async def on_handshake(self, ctx: HandshakeContext) -> None: ...

Policies run in pipeline order (global, product, API; see
:mod:`wsgate.policies`). A policy refuses a handshake by raising
:class:`~wsgate.errors.HandshakeRejected` (the gateway logs the policy's name
as ``last_error_source``) or answers it itself by raising
:class:`PolicyResponse`. It shapes the backend request by editing ``ctx``:
``backend`` (which service), ``rest`` and ``query`` (the request-target),
``headers`` (end-to-end headers). For the pair's whole life it may:

* ``ctx.on_close(fn)``: ``fn(stats)`` runs exactly once when the connection
  ends, whether or not the backend was ever reached (release a concurrency
  slot, charge relayed bytes to a quota);
* ``ctx.close_at(when, reason)``: close the pair with 1008 at wall-clock time
  ``when`` (a JWT's ``exp``);
* ``ctx.limit_messages(limiter)``: meter the client's frames with a
  :class:`MessageLimiter` (message-rate-limit).

Policy config is immutable; counters that outlive one handshake (rate limits,
quotas) live in ``ctx.state(self, factory)``, one object per policy instance
for the gateway's lifetime.

The items of a ``policies`` list (:data:`PolicyEntry`) are policies and the two
markers defined here: :data:`BASE` (``{ policy = "base" }``) and
:class:`SkippedPolicy` (a seed policy wsgate cannot apply at onHandshake).
This module imports no config: :mod:`wsgate.config` builds on it.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias, TypeVar
from urllib.parse import parse_qsl

import attrs

from .addresses import BackendURL
from .errors import HandshakeRejected
from .validate import KEY_KINDS, KeyedValueError, Validator, keyed, valid_key_spec

if TYPE_CHECKING:
    from .handshake import ClientRequest, Headers

__all__ = [
    "BASE",
    "KEY_KINDS",
    "UNSUPPORTED_POLICIES",
    "ApiView",
    "BasePlacement",
    "HandshakeContext",
    "MessageLimiter",
    "PairStats",
    "Policy",
    "PolicyEntry",
    "PolicyResponse",
    "SkippedPolicy",
    "is_policy",
    "policy_list",
    "secret_query_parameters",
    "unsupported_at_api",
    "valid_key_spec",
]

T = TypeVar("T")


class PolicyResponse(HandshakeRejected):
    """A policy answers the handshake itself (return-response); not an error."""

    def __init__(
        self, status: int, *, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> None:
        super().__init__(
            status, "answered by policy", reason="ReturnResponse", headers=headers, body=body
        )


@attrs.frozen
class PairStats:
    """What a finished connection relayed (zeros if it never reached the backend)."""

    messages_from_client: int = 0
    messages_from_backend: int = 0
    bytes_from_client: int = 0
    bytes_from_backend: int = 0
    duration: float = 0.0


class MessageLimiter(Protocol):
    """Meters the client's traffic on one pair (see message-rate-limit)."""

    def charge(self, messages: int, nbytes: int, now: float) -> float | None:
        """Account for traffic just relayed at trio time ``now``.

        Returns 0.0 to go on, a positive delay in seconds to wait before reading
        more (backpressure), or None to close the pair with 1008.
        """
        ...


class ApiView(Protocol):
    """What a policy may read of the API being called (a :class:`wsgate.config.ApiConfig`)."""

    @property
    def name(self) -> str: ...
    @property
    def display_name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def products(self) -> tuple[str, ...]: ...
    @property
    def backend(self) -> BackendURL: ...


@attrs.define
class HandshakeContext:
    """The handshake as one policy sees it, and the backend request it shapes."""

    request: ClientRequest
    api: ApiView
    backend: BackendURL
    rest: str  # the request path after the API's URL suffix
    query: str  # the client's query string, as forwarded
    headers: Headers  # end-to-end headers forwarded to the backend
    states: MutableMapping[int, tuple[object, Any]] = attrs.Factory(dict)  # gateway-lifetime
    product: Any = None  # the ProductConfig the handshake runs under, if any
    subscription: Any = None  # the SubscriptionConfig whose key was presented, if any
    claims: dict[str, Any] | None = None  # a validated JWT's claims (validate-jwt)
    log_fields: dict[str, object] = attrs.Factory(dict)  # extra keys for the gateway log
    cleanups: list[Callable[[PairStats], None]] = attrs.Factory(list)
    deadline: float | None = None  # wall-clock time the pair must close (1008)
    deadline_reason: str = ""
    message_limiter: MessageLimiter | None = None
    #: Where the limits policies count (a wsgate.cluster.store.CounterStore); None:
    #: in ``states``, in this process.
    counter_store: Any = None

    @property
    def backend_target(self) -> str:
        """The request-target the backend will receive."""
        return self.backend.target(self.rest, self.query)

    def on_close(self, fn: Callable[[PairStats], None]) -> None:
        """Run ``fn(stats)`` once when this connection ends, however it ends."""
        self.cleanups.append(fn)

    def close_at(self, when: float, reason: str) -> None:
        """Close the pair with 1008 at wall-clock time ``when`` (earliest call wins)."""
        if self.deadline is None or when < self.deadline:
            self.deadline, self.deadline_reason = when, reason

    def limit_messages(self, limiter: MessageLimiter) -> None:
        """Meter the client's frames on this pair with ``limiter``."""
        self.message_limiter = limiter

    def state(self, policy: object, factory: Callable[[], T]) -> T:
        """The gateway-lifetime state object of ``policy``, made by ``factory`` once.

        The entry holds the policy itself, so its id cannot be reused by another
        object while the state lives; the gateway prunes entries whose policy
        left the configuration.
        """
        entry = self.states.get(id(policy))
        if entry is None or entry[0] is not policy:
            entry = self.states[id(policy)] = (policy, factory())
        state: T = entry[1]
        return state

    def key(self, spec: str) -> str | None:
        """Resolve a counter-key spec; None when the request has no such value.

        ``ip`` (caller IP), ``subscription`` (subscription id), ``api``,
        ``product``, ``header:NAME``, ``query:NAME``, ``claim:NAME`` (from a
        JWT validated earlier in the pipeline). Never evaluates code.
        """
        kind, _, arg = spec.partition(":")
        if kind == "ip":
            return self.request.client_ip
        if kind == "subscription":
            return getattr(self.subscription, "id", None)
        if kind == "api":
            return self.api.name
        if kind == "product":
            return getattr(self.product, "id", None)
        if kind == "header":
            return self.request.header(arg.lower())
        if kind == "query":
            return next((v for k, v in parse_qsl(self.request.query) if k == arg), None)
        if kind == "claim" and self.claims is not None:
            value = self.claims.get(arg)
            return None if value is None else str(value)
        return None


class Policy(Protocol):
    """One step of an onHandshake pipeline (``policy_name`` is set by @register)."""

    policy_name: ClassVar[str]

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        """Inspect ``ctx``; raise HandshakeRejected to refuse, or edit it."""
        ...


def secret_query_parameters(policy: object) -> tuple[str, ...]:
    """Query parameters whose values ``policy`` says must never be logged.

    A policy that reads a secret from the query (validate-jwt's token) declares
    them in an optional ``secret_query_parameters`` attribute.
    """
    names: tuple[str, ...] = getattr(policy, "secret_query_parameters", ())
    return names


# --- the items of a policies list ---------------------------------------------------------

#: Policies the seed platform cannot apply to a WebSocket API's onHandshake operation.
#: At API scope they are config errors; inherited from global or product scope they
#: are kept as :class:`SkippedPolicy` entries that never run.
UNSUPPORTED_POLICIES = frozenset(
    {
        "mock-response",
        "cache-lookup",
        "cache-store",
        "cross-domain",
        "cors",
        "jsonp",
        "set-method",
        "set-body",
        "xml-to-json",
        "json-to-xml",
        "xsl-transform",
        "validate-content",
        "validate-parameters",
        "validate-headers",
        "validate-status-code",
    }
)


@attrs.frozen
class BasePlacement:
    """``{ policy = "base" }``: the enclosing scope's policies run at this position.

    Like the seed platform's ``<base/>``. Allowed once in a product's or an API's
    list; without it the enclosing scope's policies run first, and with
    ``inherit_policies = false`` they do not run at all.
    """

    policy_name: ClassVar[str] = "base"


#: The one placement marker (all instances are equal).
BASE = BasePlacement()


@keyed
def _unsupported(_inst: object, _attr: attrs.Attribute[Any], value: str) -> None:
    if value not in UNSUPPORTED_POLICIES:
        raise ValueError(f"{value!r} is not one of the policies unsupported at onHandshake")


@attrs.frozen
class SkippedPolicy:
    """An unsupported policy configured at global or product scope: kept, never run.

    Its other settings are not validated (wsgate has no implementation of it).
    """

    policy_name: str = attrs.field(validator=_unsupported)


#: One item of a ``policies`` list.
PolicyEntry: TypeAlias = "Policy | BasePlacement | SkippedPolicy"


def unsupported_at_api(name: str) -> str:
    """Why unsupported policy ``name`` is refused in an API's list."""
    return (
        f"policy {name!r} is not supported by the onHandshake operation and cannot be"
        " applied at API scope (inherited from global or product scope it is skipped)"
    )


def is_policy(item: object) -> bool:
    """Whether ``item`` looks like a :class:`Policy` (a registered class with the hook)."""
    return isinstance(getattr(type(item), "policy_name", None), str) and callable(
        getattr(item, "on_handshake", None)
    )


def policy_list(scope: str) -> Validator:
    """Validator of a ``policies`` list at ``scope`` ("global", "product" or "api").

    Items are policies or markers; markers are legal for ``scope``; one base at most.
    """

    def check(_inst: object, attr: attrs.Attribute[Any], items: Sequence[object]) -> None:
        problems: list[tuple[str, str]] = []
        bases = 0
        for index, item in enumerate(items):
            key = f"{attr.name}[{index}]"
            if isinstance(item, BasePlacement):
                bases += 1
                if scope == "global":
                    problems.append(
                        (key, '{ policy = "base" } is only allowed at product and API scope')
                    )
                elif bases > 1:
                    problems.append((key, '{ policy = "base" } may appear only once per scope'))
            elif isinstance(item, SkippedPolicy):
                if scope == "api":
                    problems.append((key, unsupported_at_api(item.policy_name)))
            elif not is_policy(item):
                problems.append((key, f"not a policy: a {type(item).__name__}"))
        if problems:
            raise KeyedValueError(problems)

    return check

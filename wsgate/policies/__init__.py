"""Products, subscriptions and the onHandshake pipeline; importing it registers every policy.

The gateway calls two pure functions per handshake (see docs/policies.md)::

    access = check_subscription(config, api, request)   # may raise HandshakeRejected
    for policy in pipeline(config, api, access.product):
        await policy.on_handshake(ctx)

:func:`check_subscription` finds the subscription whose key the client presented
(header or query parameter) and the product the call runs under;
:func:`pipeline` gives the policies to run, global then product then API, with
``{ policy = "base" }`` placement and ``inherit_policies`` applied and the
unsupported (skipped) ones left out.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from urllib.parse import unquote_plus

import attrs

from wsgate.config import (
    ApiConfig,
    BasePlacement,
    Config,
    PolicyEntry,
    ProductConfig,
    SkippedPolicy,
    SubscriptionConfig,
)
from wsgate.errors import HandshakeRejected
from wsgate.handshake import ClientRequest
from wsgate.policy import Policy

from . import basic, jwt, limits

__all__ = ["Access", "all_policies", "basic", "check_subscription", "jwt", "limits", "pipeline"]

MISSING_KEY = (
    "Access denied due to missing subscription key. Make sure to include subscription key"
    " when making requests to an API."
)
INVALID_KEY = (
    "Access denied due to invalid subscription key. Make sure to provide a valid key for an"
    " active subscription."
)
SUSPENDED = "Access denied due to a suspended subscription."


@attrs.frozen
class Access:
    """Who is calling: the outcome of :func:`check_subscription`.

    ``query`` is the client's query string with every subscription-key parameter
    removed (forward it instead of the original); ``drop_headers`` are the
    lower-case header names to remove before forwarding (the key header).
    """

    product: ProductConfig | None
    subscription: SubscriptionConfig | None
    query: str
    drop_headers: tuple[str, ...]

    @property
    def log_fields(self) -> dict[str, object]:
        """``product_id`` and ``subscription_id`` for the gateway log record."""
        return {
            "product_id": None if self.product is None else self.product.id,
            "subscription_id": None if self.subscription is None else self.subscription.id,
        }


def check_subscription(config: Config, api: ApiConfig, request: ClientRequest) -> Access:
    """Identify the subscription and product of a handshake for ``api``.

    The key is the API's ``subscription_key_header`` (first occurrence) or, if that
    header is absent, its ``subscription_key_query`` parameter (first occurrence).
    A key, when given, is always checked, even for an API that does not require
    one. Raises HandshakeRejected (``source="subscription"``):

    * 401 ``SubscriptionKeyMissing``: no key and the API requires a subscription;
    * 401 ``SubscriptionKeyInvalid``: the key is no subscription's primary or
      secondary key, or its subscription's scope does not cover ``api``;
    * 403 ``SubscriptionSuspended``: the subscription covers ``api`` but is suspended.

    The product is the subscription's scope when that is a product, None for a
    subscription scoped to an API or to "all". A call without a key runs under the
    API's first product that does not require a subscription, if any.
    """
    header = api.subscription_key_header.lower()
    query, query_keys = _remove_param(request.query, api.subscription_key_query)
    key = request.header(header)
    if key is None and query_keys:
        key = query_keys[0]
    drop = (header,)
    if not key:
        if _requires_subscription(config, api):
            raise HandshakeRejected(
                401, MISSING_KEY, reason="SubscriptionKeyMissing", source="subscription"
            )
        open_product = next(
            (
                product
                for product_id in api.products
                if (product := config.product(product_id)) is not None
                and not product.subscription_required
            ),
            None,
        )
        return Access(open_product, None, query, drop)
    subscription = _find(config.subscriptions, key)
    if subscription is None or not _covers(config, subscription, api):
        raise HandshakeRejected(
            401, INVALID_KEY, reason="SubscriptionKeyInvalid", source="subscription"
        )
    if subscription.state != "active":
        raise HandshakeRejected(
            403, SUSPENDED, reason="SubscriptionSuspended", source="subscription"
        )
    return Access(config.product(subscription.scope), subscription, query, drop)


def _requires_subscription(config: Config, api: ApiConfig) -> bool:
    if api.subscription_required is not None:
        return api.subscription_required
    # An API built outside a Config: the same rule Config applies.
    return any(
        product.subscription_required
        for product_id in api.products
        if (product := config.product(product_id)) is not None
    )


def _find(subscriptions: Sequence[SubscriptionConfig], key: str) -> SubscriptionConfig | None:
    """The subscription with ``key``, comparing every key in constant time."""
    presented = key.encode("utf-8", "replace")
    found = None
    for subscription in subscriptions:
        for candidate in subscription.keys:
            if hmac.compare_digest(presented, candidate.encode()) and found is None:
                found = subscription
    return found


def _covers(config: Config, subscription: SubscriptionConfig, api: ApiConfig) -> bool:
    scope = subscription.scope
    if scope == "all" or scope == api.name:
        return True
    return scope in api.products and config.product(scope) is not None


def _remove_param(query: str, name: str) -> tuple[str, list[str]]:
    """``query`` without parameter ``name`` (others untouched), and its decoded values."""
    kept, values = [], []
    for part in query.split("&") if query else ():
        raw_name, _, raw_value = part.partition("=")
        if unquote_plus(raw_name) == name:
            values.append(unquote_plus(raw_value))
        else:
            kept.append(part)
    return "&".join(kept), values


def pipeline(config: Config, api: ApiConfig, product: ProductConfig | None) -> tuple[Policy, ...]:
    """The policies to run for ``api`` under ``product``: global, product, API.

    A scope's list runs after its enclosing scope's (global for a product; the
    product's effective list, or global without a product, for an API), unless
    it places them with ``{ policy = "base" }`` or drops them with
    ``inherit_policies = false``. Unsupported policies kept at global or product
    scope are skipped. The result is cached on ``config`` (it is immutable).
    """
    key = ("wsgate.policies.pipeline", api.name, None if product is None else product.id)
    cached: tuple[ApiConfig, ProductConfig | None, tuple[Policy, ...]] = config.derived(
        key, lambda: (api, product, _build(config, api, product))
    )
    if cached[0] is api and cached[1] is product:
        return cached[2]
    return _build(config, api, product)  # objects from outside this config: not cached


def _build(config: Config, api: ApiConfig, product: ProductConfig | None) -> tuple[Policy, ...]:
    outer: list[PolicyEntry] = list(config.gateway.policies)
    if product is not None:
        outer = _nest(outer, product.policies, product.inherit_policies)
    entries = _nest(outer, api.policies, api.inherit_policies)
    return tuple(entry for entry in entries if not isinstance(entry, BasePlacement | SkippedPolicy))


def _nest(outer: list[PolicyEntry], own: Sequence[PolicyEntry], inherit: bool) -> list[PolicyEntry]:
    """``own`` with ``outer`` at its base marker (or first), or without it if not inherited."""
    if not inherit:
        return [entry for entry in own if not isinstance(entry, BasePlacement)]
    if not any(isinstance(entry, BasePlacement) for entry in own):
        return [*outer, *own]
    result: list[PolicyEntry] = []
    for entry in own:
        result.extend(outer if isinstance(entry, BasePlacement) else [entry])
    return result


def all_policies(config: Config) -> list[Policy]:
    """Every policy object of ``config``, at every scope (skipped ones excluded)."""
    scopes = [config.gateway.policies]
    scopes += [product.policies for product in config.products]
    scopes += [api.policies for api in config.apis]
    return [
        entry
        for entries in scopes
        for entry in entries
        if not isinstance(entry, BasePlacement | SkippedPolicy)
    ]

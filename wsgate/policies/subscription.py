"""Products and subscriptions: who is calling, and under which product.

The gateway calls :func:`check_subscription` once per handshake (see
docs/policies.md); it may raise HandshakeRejected, and its :class:`Access`
says which product the call runs under.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from urllib.parse import unquote_plus

import attrs

from wsgate.config import ApiConfig, Config, ProductConfig, SubscriptionConfig
from wsgate.errors import HandshakeRejected
from wsgate.handshake import ClientRequest

__all__ = ["INVALID_KEY", "MISSING_KEY", "SUSPENDED", "Access", "check_subscription"]

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

"""The onHandshake pipeline: which policies run for a handshake, in which order.

Global, then product, then API, with ``{ policy = "base" }`` placement and
``inherit_policies`` applied and the unsupported (skipped) ones left out::

    for policy in pipeline(config, api, access.product):
        await policy.on_handshake(ctx)
"""

from __future__ import annotations

from collections.abc import Sequence

from wsgate.config import ApiConfig, Config, ProductConfig
from wsgate.policy import BasePlacement, Policy, PolicyEntry, SkippedPolicy

__all__ = ["all_policies", "pipeline"]


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

"""Stable names for the counting policies of a config, and which policies count.

Every unit computes the same Redis key prefix for a policy from the same
config (scope, position, policy name), so N units share one counter; and
``wsgate serve --workers N`` refuses a counting policy without ``[cluster]``.
Above :mod:`wsgate.config` (it reads a whole config), below the gateway and CLI.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..config import Config

__all__ = ["counter_names", "counting_policies"]


def _scopes(config: Config) -> Iterable[tuple[str, str, Sequence[object]]]:
    """(scope name, config key path, policies) of every policy list in ``config``."""
    yield "global", "gateway.policies", config.gateway.policies
    for i, product in enumerate(config.products):
        yield f"product:{product.id}", f"products[{i}].policies", product.policies
    for i, api in enumerate(config.apis):
        yield f"api:{api.name}", f"apis[{i}].policies", api.policies


def counter_names(
    config: Config, extra: Mapping[str, Sequence[object]] | None = None
) -> dict[int, str]:
    """A stable name for every policy of ``config`` by ``id``: scope, position, policy name.

    ``extra`` holds the policies a :class:`~wsgate.gateway.Gateway` was given in
    code, per API. Units running the same config compute the same names.
    """
    names: dict[int, str] = {}
    for scope, _path, entries in _scopes(config):
        for index, entry in enumerate(entries):
            names[id(entry)] = f"{scope}:{index}:{getattr(entry, 'policy_name', '?')}"
    for api, entries in (extra or {}).items():
        for index, entry in enumerate(entries):
            names[id(entry)] = f"code:{api}:{index}:{getattr(entry, 'policy_name', '?')}"
    return names


def counting_policies(config: Config) -> list[tuple[str, str]]:
    """(policy name, key path) of every policy that counts across handshakes."""
    return [
        (str(getattr(entry, "policy_name", "?")), f"{path}[{index}]")
        for _scope, path, entries in _scopes(config)
        for index, entry in enumerate(entries)
        if getattr(entry, "counts_handshakes", False)
    ]

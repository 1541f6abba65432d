"""The policy registry: every policy class by the name a config file gives it.

A policy module registers its classes with :func:`register`; importing
:mod:`wsgate.policies` registers the built-in ones, so anything that looks a
name up imports the package first (importing this module does that too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["POLICIES", "register"]

T = TypeVar("T")

#: Every policy class by its config name (filled by :func:`register`).
POLICIES: dict[str, type] = {}


def register(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a policy class available in config as ``policy = name``."""

    def add(cls: type[T]) -> type[T]:
        if name in POLICIES:
            raise ValueError(f"policy {name!r} registered twice")
        POLICIES[name] = cls
        cls.policy_name = name  # type: ignore[attr-defined]
        return cls

    return add

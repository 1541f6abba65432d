"""Request path to API: longest URL suffix wins, matched on segment boundaries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class _HasPath(Protocol):
    @property
    def path(self) -> str: ...


A = TypeVar("A", bound=_HasPath)


class Router(Generic[A]):
    """Immutable routing table; build a new one when the APIs change."""

    def __init__(self, apis: Iterable[A]) -> None:
        self._by_path = {api.path.strip("/"): api for api in apis}

    def match(self, path: str) -> tuple[A, str] | None:
        """The API for request ``path`` and the rest of the path after its suffix.

        ``/chat/room/1`` with an API at ``chat`` gives that API and ``/room/1``;
        ``/chatroom`` does not match ``chat``. An API with the empty suffix
        catches every path no other API claims.
        """
        trimmed = path.lstrip("/")
        end = len(trimmed)
        while True:
            api = self._by_path.get(trimmed[:end])
            if api is not None and (end in (0, len(trimmed)) or trimmed[end] == "/"):
                return api, trimmed[end:] if end or not trimmed else "/" + trimmed
            if end == 0:
                return None
            end = max(trimmed.rfind("/", 0, end), 0)

"""The onHandshake hook: where policies inspect and rewrite a client's handshake.

A policy is any object with a ``name`` and an async ``on_handshake(ctx)``. It
may refuse the handshake by raising :class:`~wsgate.errors.HandshakeRejected`
(its ``source`` is set to the policy's name for the gateway log), or change
what goes to the backend by editing the context: ``backend`` (which service),
``rest`` and ``query`` (the request-target), ``headers`` (end-to-end headers).
Policies run in order; the first refusal wins.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from .config import ApiConfig, BackendURL
from .handshake import ClientRequest, Headers


@attrs.define
class HandshakeContext:
    """The handshake as one policy sees it, and the backend request it shapes."""

    request: ClientRequest
    api: ApiConfig
    backend: BackendURL
    rest: str  # the request path after the API's URL suffix
    query: str  # the client's query string, as forwarded
    headers: Headers  # end-to-end headers forwarded to the backend
    log_fields: dict[str, object] = attrs.Factory(dict)  # extra keys for the gateway log

    @property
    def backend_target(self) -> str:
        """The request-target the backend will receive."""
        return self.backend.target(self.rest, self.query)


class Policy(Protocol):
    """One step of an API's onHandshake pipeline."""

    name: str

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        """Inspect ``ctx``; raise HandshakeRejected to refuse, or edit it."""
        ...

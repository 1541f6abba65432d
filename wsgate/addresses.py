"""Address and TLS value types: where wsgate listens, what it connects to, its certificate.

Frozen attrs classes validated at construction, shared by the gateway's config
(:mod:`wsgate.config`), the admin listener's (:mod:`wsgate.admin.settings`), the
backend client and the policies. :meth:`Listen.parse` and
:meth:`BackendURL.parse` read one string, so their errors describe the string
(``ValueError(reason)``); the caller knows which key it came from.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from wsgate.validate import KeyedValueError, existing_file, has_space_or_control, keyed

__all__ = ["BackendURL", "Listen", "TLSConfig"]


@keyed
def _host(_inst: object, _attr: attrs.Attribute[Any], value: str) -> None:
    if not value:
        raise ValueError("host must not be empty")
    if has_space_or_control(value) or any(c in value for c in "[]/@?#"):
        raise ValueError(f"invalid host {value!r}")
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {value!r}") from None


def _port(minimum: int) -> Any:
    @keyed
    def check(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= 65535:
            raise ValueError(f"port must be an integer {minimum}-65535, got {value!r}")

    return check


def _reasons(exc: KeyedValueError) -> ValueError:
    """A parsed string's problems without the keys of its parts (they are no config keys)."""
    return ValueError("; ".join(reason for _key, reason in exc.problems))


@attrs.frozen(kw_only=True)
class Listen:
    """Where the gateway listens: a host name or IP (IPv6 without brackets) and a port (0 = any)."""

    host: str = attrs.field(validator=_host)
    port: int = attrs.field(validator=_port(0))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Listen:
        """Parse ``"host:port"`` or ``"[ipv6]:port"``; ValueError on bad input."""
        hint = "expected 'host:port' (e.g. '127.0.0.1:8080' or '[::1]:8080')"
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if sep and ":" not in host:
                raise ValueError(f"brackets are only for IPv6 addresses, got {text!r}")
        else:
            host, sep, port = text.rpartition(":")
            if ":" in host:
                raise ValueError(f"IPv6 addresses need brackets, e.g. '[::1]:8080', got {text!r}")
        if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port):
            raise ValueError(f"{hint}, got {text!r}")
        try:
            return cls(host=host, port=int(port))
        except KeyedValueError as exc:
            raise _reasons(exc) from None


@attrs.frozen(kw_only=True)
class TLSConfig:
    """A certificate chain and its private key, for serving TLS (wss://, https://)."""

    certificate: Path = attrs.field(validator=existing_file)
    private_key: Path = attrs.field(validator=existing_file)


@attrs.frozen(kw_only=True)
class BackendURL:
    """A parsed ``ws://`` / ``wss://`` service URL.

    ``host`` has no brackets even for IPv6; ``port`` is explicit (80/443 by
    default); ``path`` starts with "/"; ``query`` has no leading "?".
    """

    secure: bool
    host: str = attrs.field(validator=_host)
    port: int = attrs.field(validator=_port(1))
    path: str = "/"
    query: str = ""

    @classmethod
    def parse(cls, url: str) -> BackendURL:
        """Parse a service URL; ValueError says what is wrong with it."""
        if has_space_or_control(url):
            raise ValueError("must not contain whitespace or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid URL {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if "://" not in url:
            # Without "//" urlsplit reads "localhost:9000" as scheme "localhost".
            raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
        if scheme not in ("ws", "wss"):
            raise ValueError(f"scheme must be ws or wss, got {scheme!r}")
        if "@" in parts.netloc:
            raise ValueError("must not contain userinfo (user:password@)")
        if not parts.hostname:
            raise ValueError(f"URL has no host: {url!r}")
        if "#" in url:
            raise ValueError("must not have a fragment ('#...')")
        secure = scheme == "wss"
        try:
            return cls(
                secure=secure,
                host=parts.hostname,
                port=port if port is not None else (443 if secure else 80),
                path=parts.path or "/",
                query=parts.query,
            )
        except KeyedValueError as exc:
            raise _reasons(exc) from None

    @property
    def host_header(self) -> str:
        """The Host header value: the port is omitted when it is the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.secure else 80) else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL back as a string, in normal form."""
        query = f"?{self.query}" if self.query else ""
        return f"{'wss' if self.secure else 'ws'}://{self.host_header}{self.path}{query}"

    def target(self, rest: str, client_query: str) -> str:
        """The request-target for the backend.

        ``rest`` (the client's path below the API's path) is appended to this
        URL's path with exactly one "/" between them; the query is this URL's
        query and then the client's, joined with "&".
        """
        path = self.path
        if rest:
            path = path.removesuffix("/") + "/" + rest.removeprefix("/")
        query = "&".join(q for q in (self.query, client_query) if q)
        return f"{path}?{query}" if query else path

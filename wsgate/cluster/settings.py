"""``ClusterConfig``: the ``[cluster]`` table (Redis URL, key prefix, timeout, failure mode).

Like :mod:`wsgate.admin.settings` this module builds on :mod:`wsgate.validate`
only, never on :mod:`wsgate.config`, so the config reader can import it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs

from ..validate import has_space_or_control, keyed, number, one_of, optional

__all__ = ["ON_UNAVAILABLE", "SCHEMES", "ClusterConfig", "redacted_url"]

#: URL schemes the Redis client understands.
SCHEMES = ("redis", "rediss", "unix")

#: What a counting policy does when Redis cannot answer in time.
ON_UNAVAILABLE = ("closed", "open")


def check_redis_url(url: object) -> None:
    """Raise ValueError (never quoting the URL: it may hold a password) unless it is usable."""
    if not isinstance(url, str):
        raise ValueError("must be a string")
    if not url:
        raise ValueError("must not be empty")
    if has_space_or_control(url):
        raise ValueError("must not contain whitespace or control characters")
    if "://" not in url:
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid URL: {exc}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(f"scheme must be redis, rediss or unix, got {parts.scheme!r}")
    if parts.fragment:
        raise ValueError("must not have a fragment ('#...')")
    query = dict(parse_qsl(parts.query))
    db = query.get("db")
    if parts.scheme.lower() == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs a socket path (unix:///run/redis.sock)")
    else:
        if not parts.hostname:
            raise ValueError("URL has no host")
        if port == 0:
            raise ValueError("port must be 1-65535")
        path = parts.path.strip("/")
        if path:
            db = path
    if db is not None and not (db.isdigit() and db.isascii()):
        raise ValueError(f"database must be a number (redis://host:6379/0), got {db!r}")


def redacted_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


@keyed
def _redis_url(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    check_redis_url(value)


_positive = number(0, inclusive=False)
# Renewals run every lease_ttl / 3: below a second they would be most of the traffic.
_lease_ttl = number(1)


@keyed
def _key_prefix(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    if has_space_or_control(value):
        raise ValueError("must not contain whitespace or control characters")
    if len(value) > 64:
        raise ValueError("must be at most 64 characters")


#: Validator of a counting policy's ``on_unavailable`` (None: the table's value).
on_unavailable = optional(one_of(*ON_UNAVAILABLE))


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """Where the units of one deployment share their counters (``[cluster]``).

    ``redis_url`` (``redis://``, ``rediss://`` or ``unix://``; read from the
    environment with ``{ env = "VAR" }``) never appears in ``repr``;
    ``timeout`` bounds one Redis round trip; ``on_unavailable`` says what a
    counting policy does when Redis does not answer in time ("closed": 503
    with Retry-After; "open": admit and log); a concurrency lease not renewed
    for ``lease_ttl`` seconds (its unit was killed) is gone.
    """

    redis_url: str = attrs.field(repr=False, validator=_redis_url)
    key_prefix: str = attrs.field(default="wsgate:", validator=_key_prefix)
    timeout: float = attrs.field(default=0.25, validator=_positive)
    on_unavailable: str = attrs.field(default="closed", validator=one_of(*ON_UNAVAILABLE))
    lease_ttl: float = attrs.field(default=15.0, validator=_lease_ttl)

    @property
    def display_url(self) -> str:
        """The Redis URL with its password masked."""
        return redacted_url(self.redis_url)

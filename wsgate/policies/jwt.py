"""validate-jwt: admit a handshake only with a valid JSON Web Token.

The token comes from a header (``Authorization`` unless ``header_name`` says
otherwise, optionally with ``require_scheme``) or from a query parameter. It is
verified against exactly one key source:

* ``secret`` / ``secret_env``: an HMAC secret (HS256, HS384, HS512);
* ``public_key`` (inline PEM), ``public_key_file``, ``jwks_file``: RSA (RS256,
  RS384, RS512), EC (ES256 on P-256, ES384 on P-384) or Ed25519/Ed448 (EdDSA)
  public keys, loaded once when the config is loaded;
* ``openid_config_url``: the provider's discovery document is fetched, then its
  ``jwks_uri``; the keys are cached for ``jwks_refresh_interval`` seconds and
  refetched early when a token names an unknown ``kid`` (at most once per
  ``jwks_refresh_backoff`` seconds). A failed fetch keeps the old keys.

No algorithm confusion: ``none`` is never accepted, a secret only ever verifies
HS* tokens and a public key never does (both refused when the config loads),
and each key is only tried with the algorithms that fit its type and curve.

Every failure is turned into one :class:`~wsgate.errors.HandshakeRejected` in
:meth:`ValidateJwt._rejection`; the client gets ``failed_validation_httpcode``
and ``failed_validation_error_message`` whatever went wrong, the gateway log
gets the reason tag and a short detail (``jwt_error`` in ``ctx.log_fields``).
Neither ever contains the token.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, cast
from urllib.parse import parse_qsl, urlsplit

import attrs
import httpx
import jwt
import structlog
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.types import Options

from ..errors import HandshakeRejected
from ..policy import HandshakeContext
from ..validate import (
    KeyedValueError,
    boolean,
    has_space_or_control,
    http_status,
    keyed,
    number,
    one_of,
)
from .registry import register

__all__ = ["DEFAULT_MESSAGE", "RequiredClaim", "ValidateJwt"]

DEFAULT_MESSAGE = "Unauthorized. Access token is missing or invalid."

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

#: HS algorithms and the shortest secret each may use (RFC 7518 3.2: the hash size).
HMAC_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512"})
EC_ALGORITHMS: dict[str, type[ec.EllipticCurve]] = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1}
ASYMMETRIC_ALGORITHMS = frozenset({*RSA_ALGORITHMS, *EC_ALGORITHMS, "EdDSA"})
SUPPORTED_ALGORITHMS = frozenset({*HMAC_ALGORITHMS, *ASYMMETRIC_ALGORITHMS})
MIN_RSA_BITS = 2048
#: Discovery documents and key sets larger than this are refused.
MAX_DOCUMENT_BYTES = 1024 * 1024

KEY_SOURCES = (
    "secret",
    "secret_env",
    "public_key",
    "public_key_file",
    "jwks_file",
    "openid_config_url",
)

_log = structlog.get_logger("wsgate.policies.jwt")


# --- validators and converters (messages: see wsgate.validate) ---------------------------


@keyed
def _opt_str(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"must be a non-empty string, got {value!r}")


@keyed
def _text(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")


@keyed
def _token_name(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    _opt_str(_inst, attr, value)
    if isinstance(value, str) and has_space_or_control(value):
        raise ValueError(f"must not contain whitespace, got {value!r}")


def _tuple(items: Iterable[str]) -> tuple[str, ...]:
    """A TOML array becomes a tuple; anything else is left for the field's validator."""
    return tuple(items) if isinstance(items, list) else cast(tuple[str, ...], items)


def _opt_tuple(items: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if items is None else _tuple(items)


@keyed
def _strings(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if value is None and attr.default is None:
        return
    if not isinstance(value, tuple):
        raise ValueError(f"must be a list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise ValueError(f"must contain only non-empty strings, got {item!r}")


def _opt_path(value: str | os.PathLike[str] | None) -> Path | None:
    """A string becomes a Path; anything else is left for the field's validator."""
    return Path(value) if isinstance(value, str) else cast(Path | None, value)


@keyed
def _path(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, Path):
        raise ValueError(f"must be a file path, got {value!r}")


@keyed
def _algorithms(_inst: object, attr: attrs.Attribute[Any], value: tuple[str, ...] | None) -> None:
    _strings(_inst, attr, value)
    if value is None:
        return
    if not value:
        raise ValueError("must not be empty (leave it out for the key's defaults)")
    for name in value:
        if name.lower() == "none":
            raise ValueError("'none' (unsigned tokens) is never accepted")
        if name not in SUPPORTED_ALGORITHMS:
            raise ValueError(
                f"unsupported algorithm {name!r}; "
                f"choose from {', '.join(sorted(SUPPORTED_ALGORITHMS))}"
            )


@keyed
def _http_url(_inst: object, attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    _opt_str(_inst, attr, value)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")


@keyed
def _separator(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value):  # " " is one
        raise ValueError(f"must be a non-empty string, got {value!r}")


@attrs.frozen(kw_only=True)
class RequiredClaim:
    """One ``required_claims`` entry: the claim must be present and, if ``values``
    are given, hold all (``match = "all"``) or any (``match = "any"``) of them.

    A claim that is a list (``roles``) is compared item by item; a string claim is
    one value, or several if ``separator`` is set (``scope`` with ``" "``).
    """

    name: str = attrs.field(validator=_token_name)
    values: tuple[str, ...] = attrs.field(default=(), converter=_tuple, validator=_strings)
    match: Literal["all", "any"] = attrs.field(default="all", validator=one_of("all", "any"))
    separator: str | None = attrs.field(default=None, validator=_separator)

    def satisfied_by(self, claims: Mapping[str, Any]) -> bool:
        if self.name not in claims or claims[self.name] is None:
            return False
        if not self.values:
            return True
        present = set(_claim_values(claims[self.name], self.separator))
        hits = [value in present for value in self.values]
        return all(hits) if self.match == "all" else any(hits)


def _claim_values(value: object, separator: str | None) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        text = ("true" if item else "false") if isinstance(item, bool) else str(item)
        out.extend(text.split(separator) if separator and isinstance(item, str) else [text])
    return out


def _required_claims(
    items: Iterable[RequiredClaim | Mapping[str, Any]],
) -> tuple[RequiredClaim, ...]:
    if isinstance(items, str | Mapping) or not isinstance(items, Iterable):
        raise ValueError(
            f"must be a list of tables {{ name = ..., values = [...] }}, got {items!r}"
        )
    result = []
    for index, item in enumerate(items):
        if isinstance(item, RequiredClaim):
            result.append(item)
            continue
        if not isinstance(item, Mapping):
            raise KeyedValueError([(f"required_claims[{index}]", f"must be a table, got {item!r}")])
        try:
            result.append(RequiredClaim(**item))
        except TypeError as exc:  # unknown or missing keys
            raise KeyedValueError(
                [(f"required_claims[{index}]", f"{exc}; keys are name, values, match, separator")]
            ) from None
        except KeyedValueError as exc:
            raise KeyedValueError(
                (f"required_claims[{index}].{key}", reason) for key, reason in exc.problems
            ) from None
    return tuple(result)


# --- keys -------------------------------------------------------------------------------


@attrs.frozen
class _Key:
    """A verification key, its ``kid`` (if any) and the algorithms it may verify."""

    kid: str | None
    key: PublicKey | bytes = attrs.field(repr=False)
    algorithms: frozenset[str]


def _fitting_algorithms(key: PublicKey | bytes) -> frozenset[str]:
    """The algorithms this key type can verify, with no confusion between families."""
    if isinstance(key, bytes):
        return frozenset(alg for alg, size in HMAC_ALGORITHMS.items() if len(key) >= size)
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS if key.key_size >= MIN_RSA_BITS else frozenset()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return frozenset(
            alg for alg, curve in EC_ALGORITHMS.items() if isinstance(key.curve, curve)
        )
    return frozenset({"EdDSA"})


def _describe_key(key: PublicKey | bytes) -> str:
    if isinstance(key, bytes):
        return f"a {len(key)}-byte secret"
    if isinstance(key, rsa.RSAPublicKey):
        return f"an RSA-{key.key_size} key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC {key.curve.name} key"
    return "an EdDSA key"


def _as_public(key: object, what: str = "") -> PublicKey:
    """``key`` (the public half of a private one) if it is a supported type.

    ``what`` prefixes error messages: "" or "FILE: ".
    """
    if isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        key = key.public_key()
    if isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        return key
    raise ValueError(f"{what}unsupported key type {type(key).__name__} (use RSA, EC or Ed25519)")


def _load_pem(data: bytes, what: str) -> PublicKey:
    if b"PRIVATE KEY" in data:
        raise ValueError(f"{what}holds a private key; give the public key or a certificate")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            loaded: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            loaded = load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"{what}not a valid PEM public key or certificate") from None
    return _as_public(loaded, what)


def _static_key(key: PublicKey | bytes, allowed: frozenset[str], what: str) -> _Key:
    usable = _fitting_algorithms(key) & allowed
    if not usable:
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            raise ValueError(f"{what}RSA keys must have at least {MIN_RSA_BITS} bits")
        if isinstance(key, bytes):
            needs = ", ".join(f"{alg} needs {HMAC_ALGORITHMS[alg]}" for alg in sorted(allowed))
            raise ValueError(f"{what}{_describe_key(key)} is too short ({needs}; RFC 7518 3.2)")
        raise ValueError(f"{what}{_describe_key(key)} fits none of algorithms {sorted(allowed)}")
    if isinstance(key, bytes) and usable != allowed:
        short = sorted(allowed - usable)
        raise ValueError(f"{what}{_describe_key(key)} is too short for {', '.join(short)}")
    return _Key(None, key, usable)


def _jwk_key(jwk: object, allowed: frozenset[str]) -> _Key:
    """One JWK as a verification key; ValueError says why it cannot be used."""
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"use is {jwk.get('use')!r}, not 'sig'")
    kty = jwk.get("kty")
    loaders = {
        "RSA": RSAAlgorithm.from_jwk,
        "EC": ECAlgorithm.from_jwk,
        "OKP": OKPAlgorithm.from_jwk,
    }
    if kty not in loaders:
        # Notably "oct": a symmetric key published in a key set is never trusted.
        raise ValueError(f"unsupported kty {kty!r}")
    try:
        key = _as_public(loaders[kty](jwk))
    except (jwt.PyJWTError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"invalid {kty} key: {exc}") from None
    usable = _fitting_algorithms(key) & allowed
    alg = jwk.get("alg")
    if alg is not None:
        usable &= {alg}
    if not usable:
        raise ValueError(f"{_describe_key(key)} (alg {alg!r}) fits none of {sorted(allowed)}")
    return _Key(kid, key, usable)


def _parse_jwks(doc: object, allowed: frozenset[str], what: str) -> tuple[_Key, ...]:
    """The usable keys of a JWKS document; ValueError if there are none."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError(f"{what}not a JWK set (a JSON object with a 'keys' array)")
    keys: list[_Key] = []
    skipped: list[str] = []
    for index, jwk in enumerate(doc["keys"]):
        try:
            keys.append(_jwk_key(jwk, allowed))
        except ValueError as exc:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            skipped.append(f"keys[{index}]{f' (kid {kid!r})' if kid else ''}: {exc}")
    if not keys:
        why = "; ".join(skipped) if skipped else "the set is empty"
        raise ValueError(f"{what}no usable signing keys ({why})")
    return tuple(keys)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


# --- OpenID Connect key cache -----------------------------------------------------------


@attrs.define
class _KeyCache:
    """The keys fetched from an OpenID provider: per policy instance, gateway lifetime."""

    keys: tuple[_Key, ...] = ()
    fetched_at: float = -math.inf  # trio time of the last successful fetch
    attempted_at: float = -math.inf  # trio time of the last attempt, failed or not
    last_error: str = ""
    fetches: int = 0  # attempts, for tests and metrics
    lock: trio.Lock = attrs.Factory(trio.Lock)


class _FetchError(Exception):
    pass


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The system trust store, loaded once (httpx would load certifi on every client)."""
    return ssl.create_default_context()


async def _get_json(client: httpx.AsyncClient, url: str) -> object:
    async with client.stream("GET", url, headers={"Accept": "application/json"}) as response:
        if response.status_code != 200:
            raise _FetchError(f"GET {url}: HTTP {response.status_code}")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_DOCUMENT_BYTES:
                raise _FetchError(f"GET {url}: larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise _FetchError(f"GET {url}: not valid JSON") from None


# --- failures ---------------------------------------------------------------------------


class _Failure(Exception):
    """A validation failure found by this module rather than by pyjwt."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# pyjwt's exceptions, most specific first, as (type, log reason, log detail).
_PYJWT_FAILURES: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "TokenExpired", "token has expired"),
    (jwt.ImmatureSignatureError, "TokenNotYetValid", "token is not valid yet (nbf or iat)"),
    (jwt.InvalidAudienceError, "TokenAudienceMismatch", "audience is not accepted"),
    (jwt.InvalidIssuerError, "TokenIssuerMismatch", "issuer is not accepted"),
    (jwt.MissingRequiredClaimError, "TokenClaimMissing", "a required claim is missing"),
    (jwt.InvalidSignatureError, "TokenSignatureInvalid", "signature verification failed"),
    (jwt.InvalidAlgorithmError, "TokenAlgorithmNotAllowed", "algorithm is not allowed"),
    (jwt.DecodeError, "TokenInvalid", "token is malformed"),
    (jwt.PyJWTError, "TokenInvalid", "token is invalid"),
)


def _unverified_header(token: str) -> dict[str, Any]:
    """The token's header, decoded but not validated: enough to pick a key.

    ``jwt.decode`` validates the whole token afterwards. pyjwt's own
    ``get_unverified_header`` checks every character of all three segments in
    Python, which cost as much as verifying an RS256 signature.
    """
    segment, dot, _ = token.partition(".")
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:  # bad base64, UTF-8 or JSON
        header = None
    if not dot or not isinstance(header, dict):
        raise _Failure("TokenInvalid", "token is malformed")
    return header


def _short(value: object) -> str:
    """An attacker-supplied header value, safe and short enough for a log line."""
    text = str(value)
    return repr(text if len(text) <= 40 and text.isprintable() else text[:40] + "...")


# --- the policy -------------------------------------------------------------------------


@register("validate-jwt")
@attrs.frozen(kw_only=True)
class ValidateJwt:
    """Require a valid JWT; see the module docstring and docs/policies.md."""

    policy_name: ClassVar[str]

    # where the token is
    header_name: str | None = attrs.field(default=None, validator=_token_name)
    query_parameter_name: str | None = attrs.field(default=None, validator=_token_name)
    require_scheme: str | None = attrs.field(default=None, validator=_token_name)
    # the key: exactly one source
    secret: str | None = attrs.field(default=None, repr=False, validator=_opt_str)
    secret_env: str | None = attrs.field(default=None, validator=_token_name)
    public_key: str | None = attrs.field(default=None, validator=_opt_str)
    # metadata "file": a path the config reader should resolve against the config's folder
    public_key_file: Path | None = attrs.field(
        default=None, converter=_opt_path, validator=_path, metadata={"file": True}
    )
    jwks_file: Path | None = attrs.field(
        default=None, converter=_opt_path, validator=_path, metadata={"file": True}
    )
    openid_config_url: str | None = attrs.field(default=None, validator=_http_url)
    jwks_refresh_interval: float = attrs.field(default=3600.0, validator=number(0, inclusive=False))
    jwks_refresh_backoff: float = attrs.field(default=10.0, validator=number(0))
    fetch_timeout: float = attrs.field(default=10.0, validator=number(0, inclusive=False))
    # what a valid token is
    algorithms: tuple[str, ...] | None = attrs.field(
        default=None, converter=_opt_tuple, validator=_algorithms
    )
    audiences: tuple[str, ...] = attrs.field(default=(), converter=_tuple, validator=_strings)
    issuers: tuple[str, ...] = attrs.field(default=(), converter=_tuple, validator=_strings)
    required_claims: tuple[RequiredClaim, ...] = attrs.field(default=(), converter=_required_claims)
    require_expiration_time: bool = attrs.field(default=True, validator=boolean)
    clock_skew: float = attrs.field(default=0.0, validator=number(0))
    # how a failure is answered
    failed_validation_httpcode: int = attrs.field(default=401, validator=http_status(400, 599))
    failed_validation_error_message: str = attrs.field(default=DEFAULT_MESSAGE, validator=_text)
    # beyond the seed
    close_on_expiry: bool = attrs.field(default=False, validator=boolean)

    _allowed: frozenset[str] = attrs.field(init=False, repr=False, eq=False)
    _keys: tuple[_Key, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        sources = [name for name in KEY_SOURCES if getattr(self, name) is not None]
        if len(sources) != 1:
            given = f"got {', '.join(sources)}" if sources else "got none"
            raise ValueError(
                f"exactly one key source is required: {', '.join(KEY_SOURCES)} ({given})"
            )
        if self.header_name is not None and self.query_parameter_name is not None:
            raise ValueError("set header_name or query_parameter_name, not both")
        if self.require_scheme is not None and self.query_parameter_name is not None:
            raise KeyedValueError([("require_scheme", "only applies to a token in a header")])
        symmetric = sources[0] in ("secret", "secret_env")
        if self.algorithms is not None:
            allowed = frozenset(self.algorithms)
        else:
            allowed = frozenset(HMAC_ALGORITHMS) if symmetric else ASYMMETRIC_ALGORITHMS
        if symmetric and allowed - set(HMAC_ALGORITHMS):
            wrong = ", ".join(sorted(allowed - set(HMAC_ALGORITHMS)))
            raise KeyedValueError(
                [("algorithms", f"{wrong} need a public key; a secret only verifies HS*")]
            )
        if not symmetric and allowed & set(HMAC_ALGORITHMS):
            wrong = ", ".join(sorted(allowed & set(HMAC_ALGORITHMS)))
            raise KeyedValueError(
                [
                    (
                        "algorithms",
                        f"{wrong} cannot be used with {sources[0]} (algorithm confusion: HS* "
                        "would treat the public key as a shared secret); use a secret instead",
                    )
                ]
            )
        if symmetric and self.algorithms is None:
            # Default to the HS algorithms the secret is long enough for.
            size = len(self._secret_bytes())
            allowed = frozenset(a for a, n in HMAC_ALGORITHMS.items() if size >= n) or allowed
        try:
            keys = self._load_keys(sources[0], allowed)
        except KeyedValueError:
            raise
        except ValueError as exc:
            raise KeyedValueError([(sources[0], str(exc))]) from None
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_keys", keys)

    def _secret_bytes(self) -> bytes:
        if self.secret is not None:
            return self.secret.encode()
        assert self.secret_env is not None
        value = os.environ.get(self.secret_env)
        if not value:
            raise KeyedValueError(
                [("secret_env", f"environment variable {self.secret_env} is not set")]
            )
        return value.encode()

    def _load_keys(self, source: str, allowed: frozenset[str]) -> tuple[_Key, ...]:
        """The configured keys; ValueError names the file when one is at fault."""
        if source in ("secret", "secret_env"):
            return (_static_key(self._secret_bytes(), allowed, ""),)
        if source == "public_key":
            assert self.public_key is not None
            return (_static_key(_load_pem(self.public_key.encode(), ""), allowed, ""),)
        if source == "public_key_file":
            assert self.public_key_file is not None
            what = f"{self.public_key_file}: "
            key = _load_pem(_read_file(self.public_key_file), what)
            return (_static_key(key, allowed, what),)
        if source == "jwks_file":
            assert self.jwks_file is not None
            what = f"{self.jwks_file}: "
            data = _read_file(self.jwks_file)
            try:
                doc = json.loads(data)
            except ValueError as exc:
                raise ValueError(f"{what}not valid JSON: {exc}") from None
            return _parse_jwks(doc, allowed, what)
        _tls_context()  # load the trust store now rather than during a handshake
        return ()  # openid_config_url: fetched on first use

    @property
    def token_location(self) -> str:
        """Where the token is read from, for docs and logs."""
        if self.query_parameter_name is not None:
            return f"query parameter {self.query_parameter_name}"
        return f"header {self.header_name or 'Authorization'}"

    # -- handshake -------------------------------------------------------------------

    @property
    def secret_query_parameters(self) -> tuple[str, ...]:
        """Query parameters whose values the gateway log must not show: the token's."""
        return () if self.query_parameter_name is None else (self.query_parameter_name,)

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        try:
            token = self._token(ctx)
            header = _unverified_header(token)
            alg, kid = header.get("alg"), header.get("kid")
            if not isinstance(alg, str) or alg not in self._allowed:
                raise _Failure(
                    "TokenAlgorithmNotAllowed", f"algorithm {_short(alg)} is not allowed"
                )
            if kid is not None and not isinstance(kid, str):
                raise _Failure("TokenInvalid", "kid in the token header is not a string")
            keys = await self._current_keys(ctx, kid)
            claims = self._decode(token, alg, kid, keys)
            for claim in self.required_claims:
                if not claim.satisfied_by(claims):
                    raise _Failure(
                        "TokenClaimMismatch", f"claim {claim.name!r} is missing or does not match"
                    )
        except (_Failure, jwt.PyJWTError) as exc:
            raise self._rejection(ctx, exc) from None
        ctx.claims = claims
        exp = claims.get("exp")
        if self.close_on_expiry and isinstance(exp, int | float) and not isinstance(exp, bool):
            ctx.close_at(float(exp) + self.clock_skew, "token expired")

    def _token(self, ctx: HandshakeContext) -> str:
        if self.query_parameter_name is not None:
            value = next(
                (v for k, v in parse_qsl(ctx.request.query) if k == self.query_parameter_name), ""
            )
            if not value:
                raise _Failure("TokenMissing", f"no {self.token_location}")
            return value
        header = (self.header_name or "Authorization").lower()
        value = (ctx.request.header(header) or "").strip()
        if not value:
            raise _Failure("TokenMissing", f"no {self.token_location}")
        scheme, _, rest = value.partition(" ")
        if self.require_scheme is not None:
            if scheme.lower() != self.require_scheme.lower() or not rest.strip():
                raise _Failure(
                    "TokenMissing", f"{self.token_location} lacks the {self.require_scheme} scheme"
                )
            return rest.strip()
        # Without require_scheme, "Bearer <token>" and a bare token are both accepted.
        return rest.strip() if scheme.lower() == "bearer" and rest.strip() else value

    def _decode(
        self, token: str, alg: str, kid: str | None, keys: tuple[_Key, ...]
    ) -> dict[str, Any]:
        candidates = [
            key
            for key in keys
            if alg in key.algorithms and (kid is None or key.kid is None or key.kid == kid)
        ]
        if not candidates:
            if not keys:
                raise _Failure("TokenKeysUnavailable", "no signing keys are available")
            raise _Failure(
                "TokenSignatureKeyNotFound", f"no key for kid {_short(kid)} and algorithm {alg}"
            )
        options: Options = {
            "require": ["exp"] if self.require_expiration_time else [],
            "verify_aud": bool(self.audiences),
            "enforce_minimum_key_length": True,
        }
        failure: jwt.PyJWTError | None = None
        for key in candidates:
            try:
                return jwt.decode(
                    token,
                    key.key,
                    algorithms=sorted(key.algorithms),  # configured, never from the token
                    options=options,
                    audience=self.audiences or None,
                    issuer=self.issuers or None,
                    leeway=self.clock_skew,
                )
            except jwt.InvalidSignatureError as exc:  # another key may fit (no kid)
                failure = exc
        assert failure is not None
        raise failure

    def _rejection(self, ctx: HandshakeContext, exc: Exception) -> HandshakeRejected:
        """The one place a validation failure becomes the handshake's answer."""
        if isinstance(exc, _Failure):
            reason, detail = exc.reason, exc.detail
        else:
            reason, detail = next((r, d) for t, r, d in _PYJWT_FAILURES if isinstance(exc, t))
            if isinstance(exc, jwt.MissingRequiredClaimError):
                detail = f"required claim {exc.claim!r} is missing"
        ctx.log_fields["jwt_error"] = detail
        headers: list[tuple[str, str]] = []
        if self.failed_validation_httpcode == 401:
            scheme = self.require_scheme or "Bearer"
            error = "" if reason == "TokenMissing" else ' error="invalid_token"'
            headers.append(("WWW-Authenticate", f"{scheme}{error}"))
        return HandshakeRejected(
            self.failed_validation_httpcode,
            self.failed_validation_error_message,
            reason=reason,
            headers=headers,
            source=self.policy_name,
        )

    # -- OpenID Connect --------------------------------------------------------------

    async def _current_keys(self, ctx: HandshakeContext, kid: str | None) -> tuple[_Key, ...]:
        if self.openid_config_url is None:
            return self._keys
        cache = ctx.state(self, _KeyCache)
        if self._should_fetch(cache, kid):
            async with cache.lock:
                if self._should_fetch(cache, kid):  # not already done by a task we waited for
                    await self._refresh(cache)
        if not cache.keys:
            why = cache.last_error or "none fetched yet"
            raise _Failure("TokenKeysUnavailable", f"no signing keys available ({why})")
        return cache.keys

    def _should_fetch(self, cache: _KeyCache, kid: str | None) -> bool:
        now = trio.current_time()
        if now - cache.attempted_at < self.jwks_refresh_backoff:
            return False  # rate limit: fetched (or failed) a moment ago
        if not cache.keys or now - cache.fetched_at >= self.jwks_refresh_interval:
            return True
        return kid is not None and all(key.kid != kid for key in cache.keys)

    async def _refresh(self, cache: _KeyCache) -> None:
        assert self.openid_config_url is not None
        previous, cache.attempted_at = cache.attempted_at, trio.current_time()
        cache.fetches += 1
        try:
            keys = await self._fetch(self.openid_config_url)
        except trio.Cancelled:
            # This handshake went away mid-fetch; let the next one try at once.
            cache.attempted_at = previous
            raise
        except _FetchError as exc:
            cache.last_error = str(exc)
            _log.warning(
                "jwks_fetch_failed",
                policy=self.policy_name,
                openid_config_url=self.openid_config_url,
                error=cache.last_error,
                keeping_keys=len(cache.keys),
            )
            return
        cache.keys, cache.fetched_at, cache.last_error = keys, trio.current_time(), ""
        _log.info("jwks_fetched", openid_config_url=self.openid_config_url, keys=len(keys))

    async def _fetch(self, url: str) -> tuple[_Key, ...]:
        """Discovery document, then its jwks_uri; every failure as a _FetchError."""
        try:
            with trio.fail_after(self.fetch_timeout):
                async with httpx.AsyncClient(
                    timeout=self.fetch_timeout, follow_redirects=True, verify=_tls_context()
                ) as client:
                    discovery = await _get_json(client, url)
                    jwks_uri = discovery.get("jwks_uri") if isinstance(discovery, dict) else None
                    if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in (
                        "http",
                        "https",
                    ):
                        raise _FetchError(f"{url}: no http(s) jwks_uri in the discovery document")
                    jwks = await _get_json(client, jwks_uri)
            return _parse_jwks(jwks, self._allowed, f"{jwks_uri}: ")
        except trio.TooSlowError:
            raise _FetchError(f"{url}: no answer within {self.fetch_timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise _FetchError(f"{url}: {type(exc).__name__}: {exc}") from None
        except ValueError as exc:  # _parse_jwks
            raise _FetchError(str(exc)) from None

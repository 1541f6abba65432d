"""validate-jwt on hand-built handshake contexts, with tokens made here by pyjwt.

The OpenID tests fetch from a real HTTP server on 127.0.0.1 (trio + h11) under
a MockClock that only moves when a test jumps it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import h11
import jwt
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from structlog.testing import capture_logs

from wsgate.config import ApiConfig
from wsgate.errors import HandshakeRejected
from wsgate.handshake import ClientRequest
from wsgate.policies.jwt import DEFAULT_MESSAGE, ValidateJwt
from wsgate.policies.registry import POLICIES
from wsgate.policy import HandshakeContext

API = ApiConfig(name="chat", path="chat", service_url="ws://127.0.0.1:9/")
SECRET = "s" * 64  # long enough for HS512 (64 bytes)


def make_ctx(
    headers: list[tuple[str, str]] | None = None,
    *,
    target: str = "/chat",
    states: dict[int, Any] | None = None,
) -> HandshakeContext:
    request = ClientRequest("GET", target, [(k.lower(), v) for k, v in headers or []], "192.0.2.1")
    return HandshakeContext(
        request=request,
        api=API,
        backend=API.backend,
        rest="",
        query=request.query,
        headers=[],
        states={} if states is None else states,
    )


def bearer(token: str) -> HandshakeContext:
    return make_ctx([("Authorization", f"Bearer {token}")])


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 300, **extra}


async def rejected(policy: ValidateJwt, ctx: HandshakeContext) -> HandshakeRejected:
    with pytest.raises(HandshakeRejected) as info:
        await policy.on_handshake(ctx)
    exc = info.value
    assert exc.source == "validate-jwt"
    assert ctx.claims is None
    return exc


def pem(key: Any) -> str:
    data: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data.decode()


def jwk(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, "use": "sig", **extra}


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def keys(rsa_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    return {
        "RSA": rsa_key,
        "P-256": ec.generate_private_key(ec.SECP256R1()),
        "P-384": ec.generate_private_key(ec.SECP384R1()),
        "Ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


# --- every algorithm family -------------------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_algorithms(alg: str) -> None:
    policy = ValidateJwt(secret=SECRET)
    ctx = bearer(jwt.encode(claims(), SECRET, algorithm=alg))
    await policy.on_handshake(ctx)
    assert ctx.claims is not None and ctx.claims["sub"] == "alice"


@pytest.mark.parametrize(
    ("alg", "kind"),
    [
        ("RS256", "RSA"),
        ("RS384", "RSA"),
        ("RS512", "RSA"),
        ("ES256", "P-256"),
        ("ES384", "P-384"),
        ("EdDSA", "Ed25519"),
    ],
)
async def test_asymmetric_algorithms_with_inline_pem(
    keys: dict[str, Any], alg: str, kind: str
) -> None:
    policy = ValidateJwt(public_key=pem(keys[kind]))
    ctx = bearer(jwt.encode(claims(), keys[kind], algorithm=alg))
    await policy.on_handshake(ctx)
    assert ctx.claims is not None and ctx.claims["sub"] == "alice"


async def test_public_key_file_and_certificate_like_pem(
    tmp_path: Path, keys: dict[str, Any]
) -> None:
    path = tmp_path / "key.pem"
    path.write_text(pem(keys["P-256"]))
    policy = ValidateJwt(public_key_file=str(path), algorithms=["ES256"])
    ctx = bearer(jwt.encode(claims(), keys["P-256"], algorithm="ES256"))
    await policy.on_handshake(ctx)
    assert ctx.claims is not None


async def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGATE_TEST_JWT_SECRET", SECRET)
    policy = ValidateJwt(secret_env="WSGATE_TEST_JWT_SECRET")
    await policy.on_handshake(bearer(jwt.encode(claims(), SECRET, algorithm="HS256")))
    assert "s" * 10 not in repr(ValidateJwt(secret=SECRET))


def test_registered_under_its_config_name() -> None:
    assert POLICIES["validate-jwt"] is ValidateJwt
    assert ValidateJwt.policy_name == "validate-jwt"


# --- failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token_claims", "options", "reason"),
    [
        ({"exp": int(time.time()) - 60}, {}, "TokenExpired"),
        ({"nbf": int(time.time()) + 600}, {}, "TokenNotYetValid"),
        ({"aud": "other"}, {"audiences": ["chat"]}, "TokenAudienceMismatch"),
        ({}, {"audiences": ["chat"]}, "TokenClaimMissing"),
        ({"iss": "https://evil.test"}, {"issuers": ["https://idp.test"]}, "TokenIssuerMismatch"),
        ({"exp": None}, {}, "TokenClaimMissing"),
        (
            {"roles": ["user"]},
            {"required_claims": [{"name": "roles", "values": ["admin"]}]},
            "TokenClaimMismatch",
        ),
        ({}, {"required_claims": [{"name": "tenant"}]}, "TokenClaimMismatch"),
    ],
)
async def test_claim_failures(
    token_claims: dict[str, Any], options: dict[str, Any], reason: str
) -> None:
    policy = ValidateJwt(secret=SECRET, **options)
    payload = {k: v for k, v in claims(**token_claims).items() if v is not None}
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    ctx = bearer(token)
    exc = await rejected(policy, ctx)
    assert (exc.status, exc.reason, exc.message) == (401, reason, DEFAULT_MESSAGE)
    assert ("WWW-Authenticate", 'Bearer error="invalid_token"') in exc.headers
    assert token not in str(ctx.log_fields) and token not in str(exc)


async def test_audiences_issuers_and_claims_accepted() -> None:
    policy = ValidateJwt(
        secret=SECRET,
        audiences=["chat", "admin"],
        issuers=["https://a.test", "https://b.test"],
        required_claims=[
            {"name": "roles", "values": ["user", "admin"], "match": "any"},
            {"name": "scope", "values": ["read", "write"], "separator": " "},
            {"name": "verified", "values": ["true"]},
        ],
    )
    token = jwt.encode(
        claims(
            aud=["x", "chat"],
            iss="https://b.test",
            roles=["user"],
            scope="write read",
            verified=True,
        ),
        SECRET,
        algorithm="HS256",
    )
    ctx = bearer(token)
    await policy.on_handshake(ctx)
    assert ctx.claims is not None and ctx.claims["roles"] == ["user"]
    # match = "all" (the default) needs every value
    strict = ValidateJwt(
        secret=SECRET, required_claims=[{"name": "roles", "values": ["user", "admin"]}]
    )
    assert (await rejected(strict, bearer(token))).reason == "TokenClaimMismatch"


async def test_expiration_time_optional_and_clock_skew() -> None:
    no_exp = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    await ValidateJwt(secret=SECRET, require_expiration_time=False).on_handshake(bearer(no_exp))
    just_expired = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    await ValidateJwt(secret=SECRET, clock_skew=60).on_handshake(bearer(just_expired))
    exc = await rejected(ValidateJwt(secret=SECRET), bearer(just_expired))
    assert exc.reason == "TokenExpired"


async def test_bad_signature(rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey) -> None:
    policy = ValidateJwt(public_key=pem(rsa_key))
    exc = await rejected(policy, bearer(jwt.encode(claims(), rsa_key2, algorithm="RS256")))
    assert exc.reason == "TokenSignatureInvalid"
    tampered = jwt.encode(claims(), SECRET, algorithm="HS256")[:-3] + "AAA"
    exc = await rejected(ValidateJwt(secret=SECRET), bearer(tampered))
    assert exc.reason == "TokenSignatureInvalid"


async def test_malformed_token() -> None:
    ctx = bearer("not-a-jwt")
    exc = await rejected(ValidateJwt(secret=SECRET), ctx)
    assert exc.reason == "TokenInvalid"
    assert ctx.log_fields["jwt_error"] == "token is malformed"


async def test_alg_none_is_refused() -> None:
    token = jwt.encode(claims(), None, algorithm="none")  # type: ignore[arg-type]
    exc = await rejected(ValidateJwt(secret=SECRET), bearer(token))
    assert exc.reason == "TokenAlgorithmNotAllowed"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "token",
    [
        "%%%.e30.c2ln",  # a header that is not base64
        _b64(b"\xff\xfe") + ".e30.c2ln",  # not UTF-8
        _b64(b"{not json") + ".e30.c2ln",
        _b64(b'["HS256"]') + ".e30.c2ln",  # JSON, but not an object
        _b64(b'{"alg": "HS256"}'),  # a header alone
        "\u00e9" + _b64(b'{"alg": "HS256"}') + ".e30.c2ln",  # not ASCII
        _b64(b'{"alg": "HS256"}') + ".%%%.c2ln",  # a valid header, a broken payload
    ],
)
async def test_malformed_tokens_are_refused_as_invalid(token: str) -> None:
    ctx = bearer(token)
    exc = await rejected(ValidateJwt(secret=SECRET), ctx)
    assert exc.reason == "TokenInvalid"
    assert ctx.log_fields["jwt_error"] == "token is malformed"


async def test_hs256_token_signed_with_the_public_key_is_refused(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    """The classic confusion attack: HMAC over the token with the PEM as secret."""
    public_pem = pem(rsa_key)
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims()).encode())
    mac = hmac.new(public_pem.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    token = f"{head}.{body}.{_b64(mac)}"
    exc = await rejected(ValidateJwt(public_key=public_pem), bearer(token))
    assert exc.reason == "TokenAlgorithmNotAllowed"
    # ...and the config refuses to allow HS* next to a public key at all.
    with pytest.raises(ValueError, match="algorithm confusion"):
        ValidateJwt(public_key=public_pem, algorithms=["RS256", "HS256"])


async def test_algorithm_outside_the_allow_list(rsa_key: rsa.RSAPrivateKey) -> None:
    policy = ValidateJwt(public_key=pem(rsa_key), algorithms=["RS512"])
    exc = await rejected(policy, bearer(jwt.encode(claims(), rsa_key, algorithm="RS256")))
    assert exc.reason == "TokenAlgorithmNotAllowed"


# --- where the token is -----------------------------------------------------------------


async def test_token_locations() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    # Authorization by default, with or without "Bearer"
    await ValidateJwt(secret=SECRET).on_handshake(bearer(token))
    await ValidateJwt(secret=SECRET).on_handshake(make_ctx([("Authorization", token)]))
    # another header
    policy = ValidateJwt(secret=SECRET, header_name="X-Token")
    await policy.on_handshake(make_ctx([("X-Token", token)]))
    assert (await rejected(policy, bearer(token))).reason == "TokenMissing"
    # a query parameter (a header is then ignored)
    policy = ValidateJwt(secret=SECRET, query_parameter_name="access_token")
    await policy.on_handshake(make_ctx(target=f"/chat?x=1&access_token={token}"))
    exc = await rejected(policy, bearer(token))
    assert exc.reason == "TokenMissing"
    assert exc.headers == [("WWW-Authenticate", "Bearer")]


async def test_require_scheme() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    policy = ValidateJwt(secret=SECRET, require_scheme="Bearer")
    await policy.on_handshake(make_ctx([("Authorization", f"bearer {token}")]))
    for value in (token, f"Basic {token}", "Bearer "):
        ctx = make_ctx([("Authorization", value)])
        exc = await rejected(policy, ctx)
        assert exc.reason == "TokenMissing"
        assert "Bearer scheme" in str(ctx.log_fields["jwt_error"]) or value == "Bearer "


async def test_missing_token_and_custom_status() -> None:
    policy = ValidateJwt(
        secret=SECRET, failed_validation_httpcode=403, failed_validation_error_message="nope"
    )
    exc = await rejected(policy, make_ctx())
    assert (exc.status, exc.message, exc.reason, exc.headers) == (403, "nope", "TokenMissing", [])


async def test_close_on_expiry_sets_the_deadline() -> None:
    exp = int(time.time()) + 120
    token = jwt.encode(claims(exp=exp), SECRET, algorithm="HS256")
    ctx = bearer(token)
    await ValidateJwt(secret=SECRET, close_on_expiry=True, clock_skew=5).on_handshake(ctx)
    assert (ctx.deadline, ctx.deadline_reason) == (exp + 5, "token expired")
    ctx = bearer(token)
    await ValidateJwt(secret=SECRET).on_handshake(ctx)
    assert ctx.deadline is None


async def test_claims_feed_counter_keys() -> None:
    ctx = bearer(jwt.encode(claims(tenant="acme"), SECRET, algorithm="HS256"))
    await ValidateJwt(secret=SECRET).on_handshake(ctx)
    assert ctx.key("claim:tenant") == "acme"


# --- config validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "exactly one key source"),
        ({"secret": SECRET, "jwks_file": "x.json"}, "exactly one key source"),
        ({"secret": SECRET, "algorithms": ["none"]}, "never accepted"),
        ({"secret": SECRET, "algorithms": ["HS999"]}, "unsupported algorithm"),
        ({"secret": SECRET, "algorithms": ["RS256"]}, "need a public key"),
        ({"secret": "short"}, "too short"),
        ({"secret": "x" * 32, "algorithms": ["HS512"]}, r"too short \(HS512 needs 64"),
        ({"secret": SECRET, "header_name": "A", "query_parameter_name": "t"}, "not both"),
        ({"secret": SECRET, "query_parameter_name": "t", "require_scheme": "Bearer"}, "header"),
        ({"secret_env": "WSGATE_TEST_UNSET_VARIABLE"}, "WSGATE_TEST_UNSET_VARIABLE is not set"),
        ({"public_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}, "PEM"),
        ({"secret": SECRET, "clock_skew": -1}, "clock_skew"),
        ({"secret": SECRET, "failed_validation_httpcode": 200}, "400-599"),
        ({"secret": SECRET, "audiences": "chat"}, "list of strings"),
        ({"secret": SECRET, "required_claims": [{"name": "a", "match": "some"}]}, "match"),
        ({"secret": SECRET, "required_claims": [{"nom": "a"}]}, r"required_claims\[0\]"),
        ({"openid_config_url": "ftp://idp.test/"}, "http"),
    ],
)
def test_config_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ValidateJwt(**fields)


def test_key_file_errors_name_the_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=r"missing\.pem"):
        ValidateJwt(public_key_file=missing)
    private = tmp_path / "private.pem"
    private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match=r"private\.pem: holds a private key"):
        ValidateJwt(public_key_file=private)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        ValidateJwt(jwks_file=bad)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ValueError, match=r"empty\.json: no usable signing keys.*'oct'"):
        ValidateJwt(jwks_file=empty)


def test_weak_rsa_key_is_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="at least 2048 bits"):
        ValidateJwt(public_key=pem(weak))


def test_ec_key_must_fit_the_algorithms(keys: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="EC secp384r1 key fits none"):
        ValidateJwt(public_key=pem(keys["P-384"]), algorithms=["ES256"])


# --- JWKS file --------------------------------------------------------------------------


async def test_jwks_file_picks_the_key_by_kid(
    tmp_path: Path, keys: dict[str, Any], rsa_key2: rsa.RSAPrivateKey
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    jwk(keys["RSA"], "rsa-1", alg="RS256"),
                    jwk(rsa_key2, "rsa-2"),
                    jwk(keys["P-256"], "ec-1"),
                    jwk(keys["Ed25519"], "ed-1"),
                    {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
                ]
            }
        )
    )
    policy = ValidateJwt(jwks_file=path)
    for key, alg, kid in [
        (keys["RSA"], "RS256", "rsa-1"),
        (rsa_key2, "RS512", "rsa-2"),
        (keys["P-256"], "ES256", "ec-1"),
        (keys["Ed25519"], "EdDSA", "ed-1"),
    ]:
        ctx = bearer(jwt.encode(claims(), key, algorithm=alg, headers={"kid": kid}))
        await policy.on_handshake(ctx)
        assert ctx.claims is not None
    # rsa-1 is pinned to RS256 by its "alg"
    token = jwt.encode(claims(), keys["RSA"], algorithm="RS384", headers={"kid": "rsa-1"})
    assert (await rejected(policy, bearer(token))).reason == "TokenSignatureKeyNotFound"
    # a kid that names another key's slot does not verify
    token = jwt.encode(claims(), keys["RSA"], algorithm="RS512", headers={"kid": "rsa-2"})
    assert (await rejected(policy, bearer(token))).reason == "TokenSignatureInvalid"
    # without a kid every fitting key is tried
    await policy.on_handshake(bearer(jwt.encode(claims(), rsa_key2, algorithm="RS256")))


# --- OpenID configuration URL, against a real local server --------------------------------


class IdentityProvider:
    """A tiny OpenID provider: discovery document and JWKS over HTTP/1.1 (trio + h11)."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.failing = False
        self.stall: trio.Event | None = None  # if set, /keys waits for it
        self.keys_requested = trio.Event()
        self.hits: list[str] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/openid-configuration"

    def jwks_fetches(self) -> int:
        return self.hits.count("/keys")

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def _route(self, target: str) -> tuple[int, bytes]:
        if target == "/.well-known/openid-configuration":
            doc = {
                "issuer": f"http://127.0.0.1:{self.port}",
                "jwks_uri": f"http://127.0.0.1:{self.port}/keys",
            }
            return 200, json.dumps(doc).encode()
        if target == "/keys" and not self.failing:
            return 200, json.dumps(self.jwks).encode()
        return 500, b'{"error": "down"}'

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        target = ""
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    target = event.target.decode()
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            self.hits.append(target)
            if target == "/keys":
                self.keys_requested.set()
                if self.stall is not None:
                    await self.stall.wait()
            status, body = self._route(target)
            headers = [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
            try:
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client gave up


@pytest.fixture
async def idp(nursery: trio.Nursery) -> IdentityProvider:
    provider = IdentityProvider()
    await nursery.start(provider.serve)
    return provider


async def test_openid_keys_fetched_cached_and_refreshed(
    idp: IdentityProvider, mock_clock: trio.testing.MockClock, keys: dict[str, Any]
) -> None:
    rsa_key = keys["RSA"]
    idp.jwks = {"keys": [jwk(rsa_key, "k1")]}
    policy = ValidateJwt(openid_config_url=idp.url, jwks_refresh_interval=20)
    states: dict[int, Any] = {}
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})

    await policy.on_handshake(make_ctx([("Authorization", f"Bearer {token}")], states=states))
    assert idp.hits == ["/.well-known/openid-configuration", "/keys"]
    await policy.on_handshake(make_ctx([("Authorization", f"Bearer {token}")], states=states))
    assert idp.jwks_fetches() == 1  # cached

    mock_clock.jump(19)
    await policy.on_handshake(make_ctx([("Authorization", f"Bearer {token}")], states=states))
    assert idp.jwks_fetches() == 1
    mock_clock.jump(1)
    await policy.on_handshake(make_ctx([("Authorization", f"Bearer {token}")], states=states))
    assert idp.jwks_fetches() == 2  # refreshed after jwks_refresh_interval


async def test_openid_unknown_kid_refresh_is_rate_limited(
    idp: IdentityProvider,
    mock_clock: trio.testing.MockClock,
    keys: dict[str, Any],
    rsa_key2: rsa.RSAPrivateKey,
) -> None:
    idp.jwks = {"keys": [jwk(keys["RSA"], "old")]}
    policy = ValidateJwt(openid_config_url=idp.url, jwks_refresh_backoff=10)
    states: dict[int, Any] = {}

    def ctx(key: Any, kid: str) -> HandshakeContext:
        token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": kid})
        return make_ctx([("Authorization", f"Bearer {token}")], states=states)

    await policy.on_handshake(ctx(keys["RSA"], "old"))
    idp.jwks = {"keys": [jwk(keys["RSA"], "old"), jwk(rsa_key2, "new")]}  # key rotation
    # right after a fetch, an unknown kid does not hit the provider again
    assert (await rejected(policy, ctx(rsa_key2, "new"))).reason == "TokenSignatureKeyNotFound"
    assert idp.jwks_fetches() == 1
    mock_clock.jump(10)
    await policy.on_handshake(ctx(rsa_key2, "new"))  # unknown kid -> refetch -> found
    assert idp.jwks_fetches() == 2
    # a flood of made-up kids costs at most one fetch per backoff period
    for _ in range(5):
        await rejected(policy, ctx(rsa_key2, "bogus"))
    assert idp.jwks_fetches() == 2
    mock_clock.jump(10)
    for _ in range(5):
        await rejected(policy, ctx(rsa_key2, "bogus"))
    assert idp.jwks_fetches() == 3


async def test_openid_failed_fetch_keeps_the_old_keys(
    idp: IdentityProvider, mock_clock: trio.testing.MockClock, keys: dict[str, Any]
) -> None:
    idp.jwks = {"keys": [jwk(keys["P-256"], "ec")]}
    policy = ValidateJwt(openid_config_url=idp.url, jwks_refresh_interval=15)
    states: dict[int, Any] = {}
    token = jwt.encode(claims(), keys["P-256"], algorithm="ES256", headers={"kid": "ec"})
    await policy.on_handshake(make_ctx([("Authorization", f"Bearer {token}")], states=states))

    idp.failing = True
    mock_clock.jump(15)
    with capture_logs() as logs:
        ctx = make_ctx([("Authorization", f"Bearer {token}")], states=states)
        await policy.on_handshake(ctx)  # refresh failed, old keys still verify
    assert ctx.claims is not None
    assert idp.jwks_fetches() == 2
    [failure] = [entry for entry in logs if entry["event"] == "jwks_fetch_failed"]
    assert failure["log_level"] == "warning" and "HTTP 500" in failure["error"]
    assert failure["keeping_keys"] == 1


async def test_openid_with_no_keys_rejects_and_says_why(
    idp: IdentityProvider, mock_clock: trio.testing.MockClock, keys: dict[str, Any]
) -> None:
    idp.failing = True
    policy = ValidateJwt(openid_config_url=idp.url)
    states: dict[int, Any] = {}
    token = jwt.encode(claims(), keys["Ed25519"], algorithm="EdDSA")
    with capture_logs() as logs:
        ctx = make_ctx([("Authorization", f"Bearer {token}")], states=states)
        exc = await rejected(policy, ctx)
    assert (exc.status, exc.reason) == (401, "TokenKeysUnavailable")
    assert "HTTP 500" in str(ctx.log_fields["jwt_error"])
    assert any(entry["event"] == "jwks_fetch_failed" for entry in logs)

    idp.failing = False
    idp.jwks = {"keys": [jwk(keys["Ed25519"], "ed")]}
    mock_clock.jump(10)  # the default jwks_refresh_backoff
    await policy.on_handshake(make_ctx([("Authorization", f"Bearer {token}")], states=states))


async def test_openid_unreachable_provider(
    mock_clock: trio.testing.MockClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/.well-known/openid-configuration"
    policy = ValidateJwt(openid_config_url=url)
    # an HS token is refused before any key is looked for
    ctx = bearer(jwt.encode(claims(), "x" * 32, algorithm="HS256"))
    assert (await rejected(policy, ctx)).reason == "TokenAlgorithmNotAllowed"
    ctx = bearer(jwt.encode(claims(), rsa_key, algorithm="RS256"))
    assert (await rejected(policy, ctx)).reason == "TokenKeysUnavailable"
    assert "ConnectError" in str(ctx.log_fields["jwt_error"])


async def test_openid_concurrent_handshakes_share_one_fetch(
    idp: IdentityProvider, mock_clock: trio.testing.MockClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    idp.jwks = {"keys": [jwk(rsa_key, "k")]}
    policy = ValidateJwt(openid_config_url=idp.url)
    states: dict[int, Any] = {}
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k"})
    contexts = [make_ctx([("Authorization", f"Bearer {token}")], states=states) for _ in range(5)]
    async with trio.open_nursery() as nursery:
        for ctx in contexts:
            nursery.start_soon(policy.on_handshake, ctx)
    assert all(ctx.claims is not None for ctx in contexts)
    assert idp.jwks_fetches() == 1


async def test_openid_fetch_cancelled_with_its_handshake_is_retried_at_once(
    idp: IdentityProvider, mock_clock: trio.testing.MockClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    idp.jwks = {"keys": [jwk(rsa_key, "k")]}
    idp.stall = trio.Event()
    policy = ValidateJwt(openid_config_url=idp.url)
    states: dict[int, Any] = {}
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k"})
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def handshake() -> None:
            with scope:
                await policy.on_handshake(
                    make_ctx([("Authorization", f"Bearer {token}")], states=states)
                )

        nursery.start_soon(handshake)
        await idp.keys_requested.wait()
        scope.cancel()  # the client went away mid-fetch
    assert scope.cancelled_caught
    idp.stall.set()
    ctx = make_ctx([("Authorization", f"Bearer {token}")], states=states)
    await policy.on_handshake(ctx)  # no backoff wait: the cancelled attempt did not count
    assert ctx.claims is not None and idp.jwks_fetches() == 2


async def test_non_string_alg_or_kid() -> None:
    head = _b64(json.dumps({"alg": ["HS256"], "typ": "JWT"}).encode())
    token = f"{head}.{_b64(json.dumps(claims()).encode())}.{_b64(b'sig')}"
    assert (await rejected(ValidateJwt(secret=SECRET), bearer(token))).reason == (
        "TokenAlgorithmNotAllowed"
    )
    head = _b64(json.dumps({"alg": "HS256", "kid": 7}).encode())
    token = f"{head}.{_b64(json.dumps(claims()).encode())}.{_b64(b'sig')}"
    assert (await rejected(ValidateJwt(secret=SECRET), bearer(token))).reason == "TokenInvalid"

"""The basic policies and check_subscription as pure functions on hand-built handshakes."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from wsgate.config import ApiConfig, BackendURL, Config, parse_config
from wsgate.errors import HandshakeRejected
from wsgate.handshake import ClientRequest, end_to_end
from wsgate.policies.basic import (
    AuthenticationBasic,
    CheckHeader,
    IpFilter,
    ReturnResponse,
    RewriteUri,
    SetBackendService,
    SetHeader,
    SetQueryParameter,
)
from wsgate.policies.registry import POLICIES
from wsgate.policies.subscription import Access, check_subscription
from wsgate.policy import HandshakeContext, PolicyResponse

API = ApiConfig(name="chat", path="chat", service_url="ws://backend.test:9000/ws")


def make_ctx(
    target: str = "/chat",
    headers: list[tuple[str, str]] | None = None,
    *,
    client_ip: str = "192.0.2.10",
    claims: dict[str, Any] | None = None,
) -> HandshakeContext:
    """A handshake as the gateway builds it before running policies."""
    request = ClientRequest(
        "GET",
        target,
        [("host", "gateway.test"), ("upgrade", "websocket"), ("connection", "Upgrade")]
        + [(k.lower(), v) for k, v in headers or []],
        client_ip,
    )
    rest = request.path.removeprefix("/chat")
    return HandshakeContext(
        request=request,
        api=API,
        backend=API.backend,
        rest=rest,
        query=request.query,
        headers=end_to_end(request.headers),
        claims=claims,
    )


async def rejected(policy: Any, ctx: HandshakeContext) -> HandshakeRejected:
    with pytest.raises(HandshakeRejected) as info:
        await policy.on_handshake(ctx)
    return info.value


def test_all_basic_policies_are_registered() -> None:
    expected: dict[str, Any] = {
        "check-header": CheckHeader,
        "ip-filter": IpFilter,
        "set-header": SetHeader,
        "set-query-parameter": SetQueryParameter,
        "rewrite-uri": RewriteUri,
        "set-backend-service": SetBackendService,
        "authentication-basic": AuthenticationBasic,
        "return-response": ReturnResponse,
    }
    for name, cls in expected.items():
        assert POLICIES[name] is cls
        assert cls.policy_name == name


# --- check-header -----------------------------------------------------------------------


async def test_check_header_missing() -> None:
    error = await rejected(CheckHeader(name="X-Tenant"), make_ctx())
    assert (error.status, error.message) == (401, "Missing or invalid header X-Tenant")
    assert (error.reason, error.source) == ("HeaderCheckFailed", "check-header")


async def test_check_header_presence_only() -> None:
    await CheckHeader(name="X-Tenant").on_handshake(make_ctx(headers=[("X-Tenant", "any")]))


async def test_check_header_values_and_case() -> None:
    policy = CheckHeader(name="X-Tenant", values=["acme", "Initech"])
    await policy.on_handshake(make_ctx(headers=[("X-Tenant", "ACME")]))
    await policy.on_handshake(make_ctx(headers=[("x-tenant", "other"), ("X-Tenant", "initech")]))
    strict = CheckHeader(
        name="X-Tenant",
        values=["acme"],
        ignore_case=False,
        failed_check_httpcode=403,
        failed_check_error_message="tenant not allowed",
    )
    await strict.on_handshake(make_ctx(headers=[("X-Tenant", "acme")]))
    error = await rejected(strict, make_ctx(headers=[("X-Tenant", "ACME")]))
    assert (error.status, error.message) == (403, "tenant not allowed")
    # The whole value is compared, not its comma-separated parts.
    await rejected(strict, make_ctx(headers=[("X-Tenant", "evil, acme")]))


async def test_check_header_sees_earlier_changes_and_managed_headers() -> None:
    ctx = make_ctx(headers=[("Sec-WebSocket-Protocol", "chat.v2")])
    await SetHeader(name="X-Checked", value="yes").on_handshake(ctx)
    await CheckHeader(name="X-Checked", values=["yes"]).on_handshake(ctx)
    # Per-hop headers are not in ctx.headers: they are read from the client's request.
    await CheckHeader(name="Host", values=["gateway.test"]).on_handshake(ctx)
    await CheckHeader(name="Sec-WebSocket-Protocol", values=["chat.v2"]).on_handshake(ctx)
    await SetHeader(name="X-Gone", exists_action="delete").on_handshake(ctx)
    await rejected(CheckHeader(name="X-Gone"), ctx)


# --- ip-filter --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_ip", "listed"),
    [
        ("192.0.2.10", True),
        ("192.0.2.200", False),
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("2001:db8::7", True),
        ("2001:db9::7", False),
        ("::ffff:10.9.9.9", True),  # IPv4-mapped: matched as IPv4
        ("fe80::1%eth0", False),
        ("::1", True),
    ],
)
async def test_ip_filter(client_ip: str, listed: bool) -> None:
    addresses = ["192.0.2.10", "10.0.0.0/8", "2001:db8::/32", "::1"]
    allow = IpFilter(action="allow", addresses=addresses)
    forbid = IpFilter(action="forbid", addresses=addresses)
    ctx = make_ctx(client_ip=client_ip)
    passing, failing = (allow, forbid) if listed else (forbid, allow)
    await passing.on_handshake(ctx)
    error = await rejected(failing, ctx)
    assert (error.status, error.reason, error.source) == (403, "CallerIpNotAllowed", "ip-filter")


async def test_ip_filter_unparsable_peer_fails_closed() -> None:
    for action in ("allow", "forbid"):
        await rejected(IpFilter(action=action, addresses=["10.0.0.0/8"]), make_ctx(client_ip="?"))


def test_ip_filter_config_errors() -> None:
    with pytest.raises(ValueError, match=r"has host bits set \(did you mean '10.0.0.0/8'\?\)"):
        IpFilter(action="allow", addresses=["10.0.0.1/8"])
    with pytest.raises(ValueError, match=r"invalid IP address or CIDR range 'example\.com'"):
        IpFilter(action="allow", addresses=["example.com"])
    with pytest.raises(ValueError, match="at least one"):
        IpFilter(action="forbid", addresses=[])
    with pytest.raises(ValueError, match="must be one of 'allow', 'forbid'"):
        IpFilter(action="block", addresses=["::1"])


# --- set-header -------------------------------------------------------------------------


def header_values(ctx: HandshakeContext, name: str) -> list[str]:
    return [v for k, v in ctx.headers if k == name]


@pytest.mark.parametrize(
    ("action", "before", "after"),
    [
        ("override", ["a", "b"], ["new"]),
        ("override", [], ["new"]),
        ("skip", ["a"], ["a"]),
        ("skip", [], ["new"]),
        ("append", ["a"], ["a", "new"]),
        ("delete", ["a", "b"], []),
        ("delete", [], []),
    ],
)
async def test_set_header_actions(action: str, before: list[str], after: list[str]) -> None:
    ctx = make_ctx(headers=[("X-A", v) for v in before] + [("X-Other", "kept")])
    value = None if action == "delete" else "new"
    await SetHeader(name="X-A", value=value, exists_action=action).on_handshake(ctx)
    assert header_values(ctx, "x-a") == after
    assert header_values(ctx, "x-other") == ["kept"]


async def test_set_header_value_from_request() -> None:
    policy = SetHeader(name="X-User", value_from="claim:sub")
    ctx = make_ctx(headers=[("X-User", "admin")], claims={"sub": "alice"})
    await policy.on_handshake(ctx)
    assert header_values(ctx, "x-user") == ["alice"]
    # No value: override removes what the client sent, so it cannot be spoofed.
    ctx = make_ctx(headers=[("X-User", "admin")])
    await policy.on_handshake(ctx)
    assert header_values(ctx, "x-user") == []
    ctx = make_ctx(headers=[("X-User", "admin")])
    await SetHeader(name="X-User", value_from="claim:sub", exists_action="append").on_handshake(ctx)
    assert header_values(ctx, "x-user") == ["admin"]
    ctx = make_ctx(client_ip="2001:db8::1")
    await SetHeader(name="X-Caller", value_from="ip").on_handshake(ctx)
    assert header_values(ctx, "x-caller") == ["2001:db8::1"]


async def test_set_header_refuses_unsafe_request_values() -> None:
    ctx = make_ctx(claims={"sub": "alice\r\nX-Evil: 1"})
    error = await rejected(SetHeader(name="X-User", value_from="claim:sub"), ctx)
    assert (error.status, error.reason) == (400, "InvalidRequestValue")
    assert header_values(ctx, "x-evil") == []


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "connection",
        "Upgrade",
        "Content-Length",
        "Transfer-Encoding",
        "Keep-Alive",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Protocol",
        "sec-websocket-anything",
        "TE",
        "Proxy-Authorization",
    ],
)
def test_set_header_refuses_managed_headers(name: str) -> None:
    with pytest.raises(ValueError, match="cannot be set by a policy"):
        SetHeader(name=name, value="x")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"value": "a\rb"}, "CR, LF or NUL"),
        ({"value": "a\nb"}, "CR, LF or NUL"),
        ({"value": "a\0b"}, "CR, LF or NUL"),
        ({"value": "caf\u00e9"}, "printable ASCII"),
        ({"value": " a"}, "whitespace"),
        ({}, "exactly one of value and value_from"),
        ({"value": "a", "value_from": "ip"}, "exactly one of value and value_from"),
        ({"value": "a", "exists_action": "delete"}, 'not used with exists_action = "delete"'),
        ({"value": "a", "exists_action": "replace"}, "must be one of 'override'"),
        ({"value_from": "cookie"}, "invalid key 'cookie'"),
    ],
)
def test_set_header_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SetHeader(name="X-A", **kwargs)
    with pytest.raises(ValueError, match="invalid header name"):
        SetHeader(name="X A", value="1")


# --- set-query-parameter ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "query", "expected"),
    [
        ("override", "a=1&v=old&b=2&v=x", "a=1&b=2&v=new%20%26%20more"),
        ("override", "", "v=new%20%26%20more"),
        ("skip", "v=old", "v=old"),
        ("skip", "a=1", "a=1&v=new%20%26%20more"),
        ("append", "v=old", "v=old&v=new%20%26%20more"),
        ("delete", "a=1&v=old&v&b=2", "a=1&b=2"),
    ],
)
async def test_set_query_parameter(action: str, query: str, expected: str) -> None:
    ctx = make_ctx("/chat?" + query if query else "/chat")
    value = None if action == "delete" else "new & more"
    await SetQueryParameter(name="v", value=value, exists_action=action).on_handshake(ctx)
    assert ctx.query == expected


async def test_set_query_parameter_value_from() -> None:
    ctx = make_ctx("/chat?tenant=spoofed", headers=[("X-Tenant", "a/b")])
    await SetQueryParameter(name="tenant", value_from="header:X-Tenant").on_handshake(ctx)
    assert ctx.query == "tenant=a%2Fb"
    ctx = make_ctx("/chat?tenant=spoofed")
    await SetQueryParameter(name="tenant", value_from="header:X-Tenant").on_handshake(ctx)
    assert ctx.query == ""
    assert ctx.backend_target == "/ws"


# --- rewrite-uri ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "target", "headers", "backend_target"),
    [
        ("/v2/{rest}", "/chat/room/1?a=b", [], "/ws/v2/room/1?a=b"),
        ("/v2/{rest}", "/chat", [], "/ws/v2/"),
        ("/", "/chat/room", [], "/ws/"),
        ("/t/{header:X-Tenant}/{rest}", "/chat/r", [("X-Tenant", "a b/c")], "/ws/t/a%20b%2Fc/r"),
        ("/rooms/{query:room}", "/chat?room=lobby&x=1", [], "/ws/rooms/lobby?x=1"),
        ("/{api}?who={ip}&v=2", "/chat?x=1&v=9", [], "/ws/chat?who=192.0.2.10&v=2&x=1"),
        ("/r?page={query:page}&fixed", "/chat?y=2", [], "/ws/r?fixed&y=2"),
        ("/r?page={query:page}", "/chat?page=3", [], "/ws/r?page=3"),
        ("/lit{{eral}}", "/chat", [], "/ws/lit{eral}"),
    ],
)
async def test_rewrite_uri(
    template: str, target: str, headers: list[tuple[str, str]], backend_target: str
) -> None:
    ctx = make_ctx(target, headers)
    await RewriteUri(template=template).on_handshake(ctx)
    assert ctx.backend_target == backend_target


async def test_rewrite_uri_without_copying_params() -> None:
    ctx = make_ctx("/chat/x?a=1&b=2")
    await RewriteUri(template="/v3/{rest}?b=0", copy_unmatched_params=False).on_handshake(ctx)
    assert ctx.backend_target == "/ws/v3/x?b=0"


async def test_rewrite_uri_copies_the_current_query() -> None:
    # Parameters removed earlier (e.g. the subscription key) stay removed.
    ctx = make_ctx("/chat?subscription-key=secret&a=1")
    ctx.query = "a=1"
    await RewriteUri(template="/v2").on_handshake(ctx)
    assert ctx.backend_target == "/ws/v2?a=1"


@pytest.mark.parametrize("value", [None, "", ".", ".."])
async def test_rewrite_uri_path_value_missing(value: str | None) -> None:
    headers = [] if value is None else [("X-Tenant", value)]
    ctx = make_ctx("/chat", headers)
    error = await rejected(RewriteUri(template="/t/{header:X-Tenant}"), ctx)
    assert (error.status, error.reason, error.source) == (
        400,
        "RewriteUriValueMissing",
        "rewrite-uri",
    )
    assert "{header:X-Tenant}" in error.message


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("v2/{rest}", "must start with '/'"),
        ("", "must start with '/'"),
        ("/v2/{rest", "unbalanced brace"),
        ("/v2/rest}", "unbalanced brace"),
        ("/v2/{}", "unknown placeholder {}"),
        ("/v2/{cookie:a}", "unknown placeholder {cookie:a}"),
        ("/v2/{header:}", "unknown placeholder {header:}"),
        ("/v2?r={rest}", "{rest} is only allowed in the path"),
        ("/a/../b", "'.' and '..' segments are not allowed"),
        ("/a/./b", "'.' and '..' segments are not allowed"),
        ("/a b", "whitespace"),
        ("/a#frag", "'#'"),
        ("/a?{query:x}=1", "query parameter names must be literal"),
        ("/a?=1", "query parameter names must be literal"),
    ],
)
def test_rewrite_uri_config_errors(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("(", r"\(")):
        RewriteUri(template=template)


# --- set-backend-service ----------------------------------------------------------------


async def test_set_backend_service() -> None:
    policy = SetBackendService(base_url="wss://other.test/v2?tier=gold")
    ctx = make_ctx("/chat/room?a=1")
    await policy.on_handshake(ctx)
    assert ctx.backend == BackendURL(
        secure=True, host="other.test", port=443, path="/v2", query="tier=gold"
    )
    assert ctx.backend_target == "/v2/room?tier=gold&a=1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h/", "scheme must be ws or wss"),
        ("ws://u:p@h/", "userinfo"),
        ("h:9000", "expected a ws:// or wss:// URL"),
        ("ws://{header:host}/", "invalid"),
    ],
)
def test_set_backend_service_config_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SetBackendService(base_url=url)


# --- authentication-basic ---------------------------------------------------------------


async def test_authentication_basic() -> None:
    policy = AuthenticationBasic(username="gw", password="p\u00e4ss:word")
    ctx = make_ctx(headers=[("Authorization", "Bearer client-token")])
    await policy.on_handshake(ctx)
    (value,) = header_values(ctx, "authorization")
    assert value == "Basic " + base64.b64encode("gw:p\u00e4ss:word".encode()).decode()
    assert "p\u00e4ss" not in repr(policy)
    assert repr(policy) == "AuthenticationBasic(username='gw')"
    with pytest.raises(ValueError, match="must not contain ':'"):
        AuthenticationBasic(username="a:b", password="x")
    with pytest.raises(ValueError, match="control characters") as info:
        AuthenticationBasic(username="a", password="sec\nret")
    assert "sec" not in str(info.value)


# --- return-response --------------------------------------------------------------------


async def test_return_response() -> None:
    policy = ReturnResponse(
        status=503, headers={"Retry-After": "30", "Content-Type": "text/plain"}, body="later"
    )
    with pytest.raises(PolicyResponse) as info:
        await policy.on_handshake(make_ctx())
    response = info.value
    assert response.status == 503
    assert response.headers == [("Retry-After", "30"), ("Content-Type", "text/plain")]
    assert response.body == b"later"
    assert ReturnResponse(headers=[["X-A", "1"], ["X-A", "2"]]).headers == (
        ("X-A", "1"),
        ("X-A", "2"),
    )
    assert ReturnResponse().status == 200


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"status": 101}, "200-599"),
        ({"status": True}, "200-599"),
        ({"headers": {"Connection": "close"}}, "'Connection' cannot be set"),
        ({"headers": {"X-A": "a\r\nb"}}, "X-A: must not contain CR, LF or NUL"),
        ({"headers": {"X A": "1"}}, "invalid header name 'X A'"),
        ({"headers": ["X-A"]}, "expected a table"),
        ({"body": 5}, "expected a string"),
    ],
)
def test_return_response_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReturnResponse(**kwargs)


# --- check_subscription -----------------------------------------------------------------

KEY_P, KEY_S, KEY_OTHER = "p" * 32, "s" * 32, "o" * 32


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config(
        {
            "products": [
                {"id": "gold"},
                {"id": "free", "subscription_required": False},
                {"id": "silver"},
            ],
            "subscriptions": [
                {"id": "alice", "scope": "gold", "primary_key": KEY_P, "secondary_key": KEY_S},
                {"id": "bob", "scope": "silver", "primary_key": KEY_OTHER},
                {"id": "carol", "scope": "chat", "primary_key": "c" * 32},
                {"id": "admin", "scope": "all", "primary_key": "a" * 32},
                {"id": "dave", "scope": "gold", "primary_key": "d" * 32, "state": "suspended"},
            ],
            "apis": [
                {
                    "name": "chat",
                    "path": "chat",
                    "service_url": "ws://h/",
                    "products": ["gold", "free"],
                },
                {"name": "open", "path": "open", "service_url": "ws://h/", "products": ["free"]},
                {
                    "name": "custom",
                    "path": "custom",
                    "service_url": "ws://h/",
                    "products": ["gold"],
                    "subscription_key_header": "X-Api-Key",
                    "subscription_key_query": "key",
                },
            ],
        }
    )


def request(target: str, headers: list[tuple[str, str]] | None = None) -> ClientRequest:
    return ClientRequest("GET", target, [(k.lower(), v) for k, v in headers or []], "192.0.2.1")


def check(config: Config, api: str, target: str, headers: Any = None) -> Access:
    (found,) = [a for a in config.apis if a.name == api]
    return check_subscription(config, found, request(target, headers))


def denied(config: Config, api: str, target: str, headers: Any = None) -> HandshakeRejected:
    with pytest.raises(HandshakeRejected) as info:
        check(config, api, target, headers)
    assert info.value.source == "subscription"
    return info.value


def test_key_in_header(config: Config) -> None:
    access = check(config, "chat", "/chat?a=1", [("Ocp-Apim-Subscription-Key", KEY_P)])
    assert access.subscription is not None and access.subscription.id == "alice"
    assert access.product is config.products[0]
    assert access.query == "a=1"
    assert access.drop_headers == ("ocp-apim-subscription-key",)
    assert access.log_fields == {"product_id": "gold", "subscription_id": "alice"}


def test_key_in_query_is_removed(config: Config) -> None:
    access = check(config, "chat", f"/chat?a=1&subscription-key={KEY_P}&b=%20x&subscription-key=z")
    assert access.subscription is not None and access.subscription.id == "alice"
    assert access.query == "a=1&b=%20x"
    access = check(config, "chat", f"/chat?subscription%2Dkey={KEY_P}")
    assert access.query == ""


def test_secondary_key(config: Config) -> None:
    access = check(config, "chat", f"/chat?subscription-key={KEY_S}")
    assert access.subscription is not None and access.subscription.id == "alice"


def test_header_wins_over_query(config: Config) -> None:
    access = check(
        config,
        "chat",
        f"/chat?subscription-key={KEY_OTHER}",
        [("Ocp-Apim-Subscription-Key", KEY_P)],
    )
    assert access.subscription is not None and access.subscription.id == "alice"
    assert access.query == ""  # the query key is removed whichever is used


def test_missing_key(config: Config) -> None:
    for headers in ([], [("Ocp-Apim-Subscription-Key", "")]):
        error = denied(config, "chat", "/chat", headers)
        assert (error.status, error.reason) == (401, "SubscriptionKeyMissing")
        assert error.message.startswith("Access denied due to missing subscription key.")


def test_wrong_key(config: Config) -> None:
    for key in ("x" * 32, KEY_P[:-1], KEY_P + "p", KEY_P.upper()):
        error = denied(config, "chat", "/chat", [("Ocp-Apim-Subscription-Key", key)])
        assert (error.status, error.reason) == (401, "SubscriptionKeyInvalid")
        assert error.message.startswith("Access denied due to invalid subscription key.")
        assert key not in error.message


def test_suspended(config: Config) -> None:
    error = denied(config, "chat", "/chat", [("Ocp-Apim-Subscription-Key", "d" * 32)])
    assert (error.status, error.reason) == (403, "SubscriptionSuspended")


def test_scope_mismatch(config: Config) -> None:
    # bob's product does not contain chat; carol's API scope is another API.
    error = denied(config, "chat", f"/chat?subscription-key={KEY_OTHER}")
    assert (error.status, error.reason) == (401, "SubscriptionKeyInvalid")
    error = denied(config, "custom", "/custom", [("X-Api-Key", "c" * 32)])
    assert (error.status, error.reason) == (401, "SubscriptionKeyInvalid")


def test_api_and_all_scopes_have_no_product(config: Config) -> None:
    for key, sub in (("c" * 32, "carol"), ("a" * 32, "admin")):
        access = check(config, "chat", "/chat", [("Ocp-Apim-Subscription-Key", key)])
        assert access.subscription is not None and access.subscription.id == sub
        assert access.product is None
    access = check(config, "custom", "/custom", [("X-Api-Key", "a" * 32)])
    assert access.subscription is not None and access.subscription.id == "admin"


def test_open_api(config: Config) -> None:
    access = check(config, "open", "/open?x=1")
    assert (access.subscription, access.query) == (None, "x=1")
    assert access.product is not None and access.product.id == "free"
    assert access.log_fields == {"product_id": "free", "subscription_id": None}
    # A valid key still identifies the caller...
    access = check(config, "open", "/open", [("Ocp-Apim-Subscription-Key", "a" * 32)])
    assert access.subscription is not None and access.subscription.id == "admin"
    # ...and a key that is given is always checked.
    error = denied(config, "open", "/open", [("Ocp-Apim-Subscription-Key", "x" * 32)])
    assert error.status == 401


def test_custom_key_names(config: Config) -> None:
    access = check(config, "custom", f"/custom?key={KEY_P}&subscription-key=kept")
    assert access.subscription is not None and access.subscription.id == "alice"
    assert access.query == "subscription-key=kept"
    assert access.drop_headers == ("x-api-key",)
    error = denied(config, "custom", "/custom", [("Ocp-Apim-Subscription-Key", KEY_P)])
    assert error.reason == "SubscriptionKeyMissing"


def test_api_outside_any_product_is_open() -> None:
    config = parse_config({"apis": [{"name": "echo", "path": "echo", "service_url": "ws://h/"}]})
    access = check(config, "echo", "/echo?a=1")
    assert (access.product, access.subscription, access.query) == (None, None, "a=1")
    # Not required, but a key that is given is checked: here no subscription has it.
    error = denied(config, "echo", "/echo?subscription-key=whatever&a=1")
    assert (error.status, error.reason) == (401, "SubscriptionKeyInvalid")

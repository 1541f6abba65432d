"""Config for products, subscriptions and policies; the pipeline's scope order."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
from structlog.testing import capture_logs

from wsgate.config import (
    BASE,
    UNSUPPORTED_POLICIES,
    ApiConfig,
    Config,
    GatewayConfig,
    KeyedValueError,
    ProductConfig,
    SkippedPolicy,
    SubscriptionConfig,
    load_config,
    parse_config,
)
from wsgate.errors import ConfigError
from wsgate.policies.basic import AuthenticationBasic, CheckHeader, SetHeader
from wsgate.policies.pipeline import pipeline
from wsgate.policies.registry import POLICIES

KEY_A = "a" * 24
KEY_B = "b" * 24

API = """
[[apis]]
name = "echo"
path = "echo"
service_url = "ws://127.0.0.1:9000/echo"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [p.removeprefix(f"{path}: ") for p in info.value.problems]


def one_problem(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


def api_with(*policies: str) -> str:
    """The API table with ``[[apis.policies]]`` tables given as TOML bodies."""
    return API + "".join(f"[[apis.policies]]\n{textwrap.dedent(p)}\n" for p in policies)


# --- products and subscriptions ---------------------------------------------------------


def test_products_subscriptions_and_api_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSGATE_TEST_KEY", KEY_B)
    config = load_config(
        write(
            tmp_path,
            f"""
            [[products]]
            id = "gold"
            display_name = "Gold"

            [[products]]
            id = "free"
            subscription_required = false
            inherit_policies = false

            [[subscriptions]]
            id = "alice"
            scope = "gold"
            primary_key = "{KEY_A}"
            secondary_key = {{ env = "WSGATE_TEST_KEY" }}

            [[subscriptions]]
            id = "ops"
            scope = "all"
            primary_key = "{"c" * 16}"
            state = "suspended"

            [[apis]]
            name = "paid"
            path = "paid"
            service_url = "ws://h/"
            products = ["free", "gold"]

            [[apis]]
            name = "open"
            path = "open"
            service_url = "ws://h/"
            products = ["free"]
            subscription_key_header = "X-Key"
            subscription_key_query = "key"

            [[apis]]
            name = "alone"
            path = "alone"
            service_url = "ws://h/"

            [[apis]]
            name = "forced"
            path = "forced"
            service_url = "ws://h/"
            products = ["gold"]
            subscription_required = false
            inherit_policies = false
            """,
        )
    )
    gold, free = config.products
    assert gold == ProductConfig(id="gold", display_name="Gold")
    assert (gold.subscription_required, gold.inherit_policies, gold.policies) == (True, True, ())
    assert (free.display_name, free.subscription_required, free.inherit_policies) == (
        "free",
        False,
        False,
    )
    alice, ops = config.subscriptions
    assert (alice.scope, alice.primary_key, alice.secondary_key, alice.state) == (
        "gold",
        KEY_A,
        KEY_B,
        "active",
    )
    assert alice.keys == (KEY_A, KEY_B)
    assert (ops.scope, ops.secondary_key, ops.state, ops.keys) == (
        "all",
        None,
        "suspended",
        ("c" * 16,),
    )
    paid, open_, alone, forced = config.apis
    # The default: required if any of the API's products requires a subscription.
    assert [api.subscription_required for api in config.apis] == [True, False, False, False]
    assert paid.subscription_key_header == "Ocp-Apim-Subscription-Key"
    assert paid.subscription_key_query == "subscription-key"
    assert (open_.subscription_key_header, open_.subscription_key_query) == ("X-Key", "key")
    assert (alone.products, alone.inherit_policies, forced.inherit_policies) == ((), True, False)
    assert config.product("gold") is gold
    assert config.product("nope") is None


def test_code_built_api_resolves_subscription_required_in_config() -> None:
    api = ApiConfig(name="a", path="a", service_url="ws://h/", products=["p", "q"])
    assert api.subscription_required is None  # unknown until the products are known
    products = [ProductConfig(id="p", subscription_required=False), ProductConfig(id="q")]
    assert Config(apis=[api], products=products).apis[0].subscription_required is True
    products[1] = ProductConfig(id="q", subscription_required=False)
    assert Config(apis=[api], products=products).apis[0].subscription_required is False
    explicit = attrs.evolve(api, subscription_required=True)
    products = [ProductConfig(id="p", subscription_required=False), products[1]]
    assert Config(apis=[explicit], products=products).apis == (explicit,)


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    sub = SubscriptionConfig(id="s", scope="all", primary_key=KEY_A, secondary_key=KEY_B)
    config = Config(
        subscriptions=[sub],
        gateway=GatewayConfig(policies=[AuthenticationBasic(username="u", password="hunter2-pw")]),
    )
    for text in (repr(sub), str(sub), repr(config), str(config)):
        assert KEY_A not in text
        assert KEY_B not in text
        assert "hunter2-pw" not in text
    assert "id='s'" in repr(sub)


def test_env_key_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WSGATE_TEST_UNSET", raising=False)
    monkeypatch.setenv("WSGATE_TEST_SHORT", "tiny")
    sub = '[[subscriptions]]\nid = "s"\nscope = "all"\n'
    assert one_problem(tmp_path, sub + 'primary_key = { env = "WSGATE_TEST_UNSET" }') == (
        "subscriptions[0].primary_key: environment variable 'WSGATE_TEST_UNSET' is not set"
    )
    assert one_problem(tmp_path, sub + 'primary_key = { env = "WSGATE_TEST_SHORT" }') == (
        "subscriptions[0].primary_key: too short: a subscription key needs at least 16 characters"
    )
    for bad in ('{ var = "X" }', '{ env = "X", default = "y" }', "{ env = 1 }", '{ env = "" }'):
        assert one_problem(tmp_path, sub + f"primary_key = {bad}") == (
            'subscriptions[0].primary_key: expected a string or a table { env = "VARIABLE" }'
        )
    assert one_problem(tmp_path, sub + "primary_key = 5") == (
        'subscriptions[0].primary_key: expected a string or a table { env = "VARIABLE" },'
        " got an integer"
    )


PRODUCT = '[[products]]\nid = "gold"\n'
SUB = f'[[subscriptions]]\nid = "s"\nscope = "gold"\nprimary_key = "{KEY_A}"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[products]]\nid = "Gold"',
            "products[0].id: invalid name 'Gold': use lowercase letters, digits and '-',"
            " starting with a letter or digit",
        ),
        (
            '[[products]]\nid = "all"',
            "products[0].id: 'all' is reserved: a subscription scope of \"all\" means every API",
        ),
        (PRODUCT + PRODUCT, "products[1].id: duplicate id 'gold' (also products[0].id)"),
        (PRODUCT + 'display_name = ""', "products[0].display_name: must not be empty"),
        (
            PRODUCT + 'subscription_required = "yes"',
            "products[0].subscription_required: expected a boolean, got a string",
        ),
        (PRODUCT + "colour = 1", "products[0].colour: unknown key"),
        ("[[products]]", "products[0].id: missing required key"),
        (
            PRODUCT + API + 'products = ["glod"]',
            "apis[0].products[0]: unknown product 'glod' (did you mean 'gold'?)",
        ),
        (
            PRODUCT + API + 'products = ["gold", "gold"]',
            "apis[0].products[1]: duplicate 'gold'",
        ),
        (
            '[[products]]\nid = "echo"\n' + API,
            "products[0].id: 'echo' is also an API name; product ids and API names must differ"
            " (either may be a subscription's scope)",
        ),
        (
            PRODUCT + SUB.replace('scope = "gold"', 'scope = "gold2"'),
            "subscriptions[0].scope: unknown product or API 'gold2' (did you mean 'gold'?)"
            ' (expected a product id, an API name or "all")',
        ),
        (
            SUB.replace('scope = "gold"', 'scope = "All"'),
            "subscriptions[0].scope: invalid name 'All': use lowercase letters, digits and '-',"
            " starting with a letter or digit",
        ),
        (
            PRODUCT + SUB + SUB.replace('id = "s"', 'id = "t"'),
            "subscriptions[1].primary_key: same key as subscriptions[0].primary_key;"
            " a key must identify one subscription",
        ),
        (
            PRODUCT
            + SUB
            + SUB.replace('id = "s"', 'id = "t"').replace(KEY_A, KEY_B)
            + f'secondary_key = "{KEY_A}"',
            "subscriptions[1].secondary_key: same key as subscriptions[0].primary_key;"
            " a key must identify one subscription",
        ),
        (
            PRODUCT + SUB + f'secondary_key = "{KEY_A}"',
            "subscriptions[0].secondary_key: must differ from primary_key",
        ),
        (PRODUCT + SUB + SUB, "subscriptions[1].id: duplicate id 's' (also subscriptions[0].id)"),
        (
            PRODUCT + SUB.replace(KEY_A, "a b" * 8),
            "subscriptions[0].primary_key: must contain only visible ASCII characters (no spaces)",
        ),
        (
            PRODUCT + SUB + 'state = "paused"',
            "subscriptions[0].state: must be one of 'active', 'suspended', got 'paused'",
        ),
        (
            '[[subscriptions]]\nid = "s"\nscope = "all"',
            "subscriptions[0].primary_key: missing required key",
        ),
        (
            API + "subscription_required = 1",
            "apis[0].subscription_required: expected a boolean, got an integer",
        ),
        (
            API + 'subscription_key_header = "X Key"',
            "apis[0].subscription_key_header: invalid header name 'X Key'",
        ),
        (
            API + 'subscription_key_query = "a&b"',
            "apis[0].subscription_key_query: invalid query parameter name 'a&b': must be"
            " non-empty, without spaces, control characters or any of & = # % +",
        ),
        (
            API + "inherit_policies = 0",
            "apis[0].inherit_policies: expected a boolean, got an integer",
        ),
    ],
)
def test_product_and_subscription_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert one_problem(tmp_path, text) == expected


def test_key_errors_never_show_the_key(tmp_path: Path) -> None:
    secret = "s3cr3t!x"
    text = PRODUCT + SUB.replace(KEY_A, secret) + SUB.replace('id = "s"', 'id = "t"')
    text += SUB.replace('id = "s"', 'id = "u"')
    found = problems(tmp_path, text)
    assert found == [
        "subscriptions[0].primary_key: too short: a subscription key needs at least 16 characters"
    ]
    assert not any(secret in p for p in found)
    found = problems(tmp_path, PRODUCT + SUB + SUB.replace('id = "s"', 'id = "t"'))
    assert not any(KEY_A in p for p in found)


def test_code_built_subscriptions_are_validated() -> None:
    with pytest.raises(ValueError, match="too short"):
        SubscriptionConfig(id="s", scope="all", primary_key="short")
    with pytest.raises(ValueError, match="must be one of 'active', 'suspended'"):
        SubscriptionConfig(id="s", scope="all", primary_key=KEY_A, state="off")
    with pytest.raises(KeyedValueError, match=r"subscriptions\[0\]\.scope: unknown product or API"):
        Config(subscriptions=[SubscriptionConfig(id="s", scope="gold", primary_key=KEY_A)])
    with pytest.raises(ValueError, match="'all' is reserved"):
        ProductConfig(id="all")


# --- policy tables ----------------------------------------------------------------------


def test_policies_at_every_scope(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            [gateway]
            policies = [{ policy = "ip-filter", action = "forbid", addresses = ["10.0.0.0/8"] }]

            [[products]]
            id = "gold"
            [[products.policies]]
            policy = "set-header"
            name = "X-Product"
            value = "gold"
            [[products.policies]]
            policy = "base"

            [[apis]]
            name = "echo"
            path = "echo"
            service_url = "ws://h/"
            products = ["gold"]
            [[apis.policies]]
            policy = "check-header"
            name = "X-Tenant"
            values = ["acme", "Initech"]
            ignore_case = false
            failed_check_httpcode = 403
            """,
        )
    )
    (ip_filter,) = config.gateway.policies
    assert ip_filter.policy_name == "ip-filter"
    assert config.products[0].policies == (SetHeader(name="X-Product", value="gold"), BASE)
    assert config.apis[0].policies == (
        CheckHeader(
            name="X-Tenant",
            values=("acme", "Initech"),
            ignore_case=False,
            failed_check_httpcode=403,
        ),
    )
    assert (
        config.apis[0].policies[0].failed_check_error_message
        == "Missing or invalid header X-Tenant"
    )


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            'policy = "chek-header"',
            "apis[0].policies[0].policy: unknown policy 'chek-header'"
            " (did you mean 'check-header'?)",
        ),
        ('name = "X"', "apis[0].policies[0].policy: missing required key"),
        ("policy = 3", "apis[0].policies[0].policy: expected a string, got an integer"),
        (
            'policy = "check-header"\nname = "X"\nvalue = ["a"]',
            "apis[0].policies[0].value: unknown key (did you mean 'values'?)",
        ),
        ('policy = "check-header"', "apis[0].policies[0].name: missing required key"),
        (
            'policy = "check-header"\nname = "X"\nfailed_check_httpcode = 200',
            "apis[0].policies[0].failed_check_httpcode:"
            " must be an HTTP status code 400-599, got 200",
        ),
        (
            'policy = "check-header"\nname = "X"\nvalues = "a"',
            "apis[0].policies[0].values: expected an array of strings, got a string",
        ),
        (
            'policy = "check-header"\nname = "X"\nignore_case = "no"',
            "apis[0].policies[0].ignore_case: must be true or false, got 'no'",
        ),
        (
            'policy = "ip-filter"\naction = "allow"\naddresses = ["10.0.0.1", "10.0.0.300"]',
            "apis[0].policies[0].addresses[1]: invalid IP address or CIDR range '10.0.0.300'",
        ),
        (
            'policy = "ip-filter"\naction = "deny"\naddresses = ["10.0.0.1"]',
            "apis[0].policies[0].action: must be one of 'allow', 'forbid', got 'deny'",
        ),
        (
            'policy = "set-header"\nname = "Host"\nvalue = "x"',
            "apis[0].policies[0].name: 'Host' cannot be set by a policy: the gateway manages it"
            " for each hop (Host, Connection, Upgrade, Content-Length, Transfer-Encoding,"
            " Keep-Alive, Sec-WebSocket-*, ...)",
        ),
        (
            'policy = "set-header"\nname = "X-A"\nvalue = "a\\r\\nX-Evil: 1"',
            "apis[0].policies[0].value: must not contain CR, LF or NUL",
        ),
        (
            'policy = "set-header"\nname = "X-A"\nvalue = "a"\nvalue_from = "ip"',
            "apis[0].policies[0].value_from: give exactly one of value and value_from",
        ),
        (
            'policy = "set-header"\nname = "X-A"\nvalue_from = "cookie:a"',
            "apis[0].policies[0].value_from: invalid key 'cookie:a': use ip, subscription, api,"
            " product, header:NAME, query:NAME or claim:NAME",
        ),
        (
            'policy = "set-backend-service"\nbase_url = "http://h/"',
            "apis[0].policies[0].base_url: scheme must be ws or wss, got 'http'",
        ),
        (
            'policy = "rewrite-uri"\ntemplate = "/v2/{rest"',
            "apis[0].policies[0].template: unbalanced brace: write '{{' or '}}' for a literal one",
        ),
        (
            'policy = "return-response"\nstatus = 101',
            "apis[0].policies[0].status: must be an HTTP status code 200-599, got 101",
        ),
        (
            'policy = "return-response"\nheaders = { "Content-Length" = "5" }',
            "apis[0].policies[0].headers: 'Content-Length' cannot be set: the gateway writes it",
        ),
        (
            'policy = "cors"\nallowed_origins = ["*"]',
            "apis[0].policies[0].policy: policy 'cors' is not supported by the onHandshake"
            " operation and cannot be applied at API scope (inherited from global or product"
            " scope it is skipped)",
        ),
        (
            'policy = "base"\nname = "x"',
            'apis[0].policies[0].name: unknown key: { policy = "base" } takes no other keys',
        ),
    ],
)
def test_policy_errors(tmp_path: Path, policy: str, expected: str) -> None:
    assert one_problem(tmp_path, api_with(policy)) == expected


def test_policy_list_shape_errors(tmp_path: Path) -> None:
    assert one_problem(tmp_path, API + 'policies = { policy = "base" }') == (
        "apis[0].policies: expected an array of tables, got a table"
    )
    assert one_problem(tmp_path, API + 'policies = ["base"]') == (
        "apis[0].policies[0]: expected a table, got a string"
    )
    assert one_problem(tmp_path, api_with('policy = "base"', 'policy = "base"')) == (
        'apis[0].policies[1]: { policy = "base" } may appear only once per scope'
    )
    assert one_problem(tmp_path, '[gateway]\npolicies = [{ policy = "base" }]') == (
        'gateway.policies[0]: { policy = "base" } is only allowed at product and API scope'
    )


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_POLICIES))
def test_every_unsupported_policy_is_refused_at_api_scope(tmp_path: Path, name: str) -> None:
    problem = one_problem(tmp_path, api_with(f'policy = "{name}"'))
    assert problem.startswith(f"apis[0].policies[0].policy: policy {name!r} is not supported")
    assert "API scope" in problem


def test_unsupported_policies_are_skipped_at_global_and_product_scope(tmp_path: Path) -> None:
    text = (
        """
        [gateway]
        policies = [
            { policy = "cors", allowed_origins = ["*"] },
            { policy = "check-header", name = "X-A" },
        ]

        [[products]]
        id = "gold"
        policies = [{ policy = "mock-response", status_code = 200 }, { policy = "cache-lookup" }]

        [[products]]
        id = "silver"
        """
        + API
        + 'products = ["gold"]\n'
    )
    with capture_logs() as logs:
        config = load_config(write(tmp_path, text))
    assert config.gateway.policies[0] == SkippedPolicy("cors")
    assert config.products[0].policies == (
        SkippedPolicy("mock-response"),
        SkippedPolicy("cache-lookup"),
    )
    warnings = [log for log in logs if log["event"] == "config_policies_skipped"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["policies"] == [
        {"policy": "cors", "scope": "global"},
        {"policy": "mock-response", "scope": "product:gold"},
        {"policy": "cache-lookup", "scope": "product:gold"},
    ]
    api, gold = config.apis[0], config.products[0]
    assert [p.policy_name for p in pipeline(config, api, gold)] == ["check-header"]
    assert [p.policy_name for p in pipeline(config, api, None)] == ["check-header"]


def test_no_warning_without_skipped_policies(tmp_path: Path) -> None:
    with capture_logs() as logs:
        load_config(write(tmp_path, API))
    assert logs == []


def test_code_built_policy_lists_are_validated() -> None:
    with pytest.raises(KeyedValueError) as info:
        ApiConfig(name="a", path="a", service_url="ws://h/", policies=[SkippedPolicy("jsonp")])
    assert info.value.problems[0][0] == "policies[0]"
    assert "'jsonp' is not supported" in info.value.problems[0][1]
    with pytest.raises(KeyedValueError, match="only allowed at product and API scope"):
        GatewayConfig(policies=[BASE])
    with pytest.raises(KeyedValueError, match=r"policies\[1\]: not a policy: a str"):
        ProductConfig(id="p", policies=[BASE, "check-header"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not one of the policies unsupported"):
        SkippedPolicy("check-header")
    assert GatewayConfig(policies=[SkippedPolicy("cors")]).policies == (SkippedPolicy("cors"),)


@attrs.frozen(kw_only=True)
class Typed:
    """A policy using attrs' own validators, as third-party policies may."""

    policy_name: ClassVar[str]
    count: int = attrs.field(validator=attrs.validators.instance_of(int))
    mode: str = attrs.field(default="a", validator=attrs.validators.in_(["a", "b"]))
    low: int = 0
    high: int = 1

    def __attrs_post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low must not exceed high")

    async def on_handshake(self, ctx: Any) -> None:
        pass


def test_attrs_validator_errors_are_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(POLICIES, "typed", Typed)
    monkeypatch.setattr(Typed, "policy_name", "typed", raising=False)
    assert problems(tmp_path, api_with('policy = "typed"\ncount = "3"\nmode = "c"')) == [
        "apis[0].policies[0].count: expected an integer, got a string",
        "apis[0].policies[0].mode: 'mode' must be in ['a', 'b'] (got 'c')",
    ]
    assert one_problem(tmp_path, api_with('policy = "typed"\ncount = 1\nlow = 3')) == (
        "apis[0].policies[0]: low must not exceed high"
    )
    config = load_config(write(tmp_path, api_with('policy = "typed"\ncount = 1')))
    assert config.apis[0].policies == (Typed(count=1),)


def test_every_policy_error_is_reported_together(tmp_path: Path) -> None:
    text = (
        '[gateway]\npolicies = [{ policy = "nope" }, { policy = "base" }]\n'
        + '[[products]]\nid = "gold"\npolicies = [{ policy = "check-header", name = "X Y" }]\n'
        + api_with('policy = "jsonp"', 'policy = "ip-filter"\naction = "allow"\naddresses = []')
    )
    assert problems(tmp_path, text) == [
        "gateway.policies[0].policy: unknown policy 'nope'",
        "products[0].policies[0].name: invalid header name 'X Y'",
        "apis[0].policies[0].policy: policy 'jsonp' is not supported by the onHandshake"
        " operation and cannot be applied at API scope (inherited from global or product scope"
        " it is skipped)",
        "apis[0].policies[1].addresses: must list at least one address or CIDR range",
    ]


def test_parse_config_reads_policies_from_dicts() -> None:
    config = parse_config(
        {
            "apis": [
                {
                    "name": "echo",
                    "path": "echo",
                    "service_url": "ws://h/",
                    "policies": [{"policy": "set-header", "name": "X-A", "value": "1"}],
                }
            ]
        }
    )
    assert config.apis[0].policies == (SetHeader(name="X-A", value="1"),)


# --- pipeline order ---------------------------------------------------------------------


def mark(name: str) -> SetHeader:
    """A distinguishable policy (equal policies would make the order checks ambiguous)."""
    return SetHeader(name="X-Step", value=name)


def names(policies: Any) -> list[str]:
    return [p.value for p in policies]


def build(
    product: list[Any] | None = None,
    api: list[Any] | None = None,
    *,
    product_inherits: bool = True,
    api_inherits: bool = True,
) -> tuple[Config, ApiConfig, ProductConfig]:
    config = Config(
        gateway=GatewayConfig(policies=[mark("g1"), SkippedPolicy("cors"), mark("g2")]),
        products=[
            ProductConfig(
                id="p",
                policies=product if product is not None else [mark("p1")],
                inherit_policies=product_inherits,
            )
        ],
        apis=[
            ApiConfig(
                name="a",
                path="a",
                service_url="ws://h/",
                products=["p"],
                policies=api if api is not None else [mark("a1")],
                inherit_policies=api_inherits,
            )
        ],
    )
    return config, config.apis[0], config.products[0]


@pytest.mark.parametrize(
    ("kwargs", "with_product", "without_product"),
    [
        ({}, ["g1", "g2", "p1", "a1"], ["g1", "g2", "a1"]),
        (
            {"product": [mark("p1"), BASE, mark("p2")]},
            ["p1", "g1", "g2", "p2", "a1"],
            ["g1", "g2", "a1"],
        ),
        (
            {"api": [mark("a1"), BASE, mark("a2")]},
            ["a1", "g1", "g2", "p1", "a2"],
            ["a1", "g1", "g2", "a2"],
        ),
        ({"api": [mark("a1"), BASE]}, ["a1", "g1", "g2", "p1"], ["a1", "g1", "g2"]),
        ({"api_inherits": False}, ["a1"], ["a1"]),
        ({"api": [BASE, mark("a1")], "api_inherits": False}, ["a1"], ["a1"]),
        ({"product_inherits": False}, ["p1", "a1"], ["g1", "g2", "a1"]),
        (
            {"product": [SkippedPolicy("jsonp"), BASE], "product_inherits": False},
            ["a1"],
            ["g1", "g2", "a1"],
        ),
        ({"api": []}, ["g1", "g2", "p1"], ["g1", "g2"]),
    ],
)
def test_pipeline_order(
    kwargs: dict[str, Any], with_product: list[str], without_product: list[str]
) -> None:
    config, api, product = build(**kwargs)
    assert names(pipeline(config, api, product)) == with_product
    assert names(pipeline(config, api, None)) == without_product


def test_pipeline_is_cached_per_config() -> None:
    config, api, product = build()
    first = pipeline(config, api, product)
    assert pipeline(config, api, product) is first
    assert pipeline(config, api, None) is not first
    # An API object that is not the config's own is not served from the cache.
    other = attrs.evolve(api, policies=[mark("x")])
    assert names(pipeline(config, other, product)) == ["g1", "g2", "p1", "x"]
    assert pipeline(config, api, product) is first

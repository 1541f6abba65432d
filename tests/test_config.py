"""Tests for wsgate.config: the config classes, their validators and the TOML reader."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest

from wsgate.config import (
    _SPECS,
    ApiConfig,
    BackendURL,
    Config,
    GatewayConfig,
    KeyedValueError,
    Listen,
    ProductConfig,
    TLSConfig,
    load_config,
    parse_config,
)
from wsgate.errors import ConfigError, WsgateError

DEMO = Path(__file__).resolve().parent.parent / "wsgate" / "demo.toml"

API = """
[[apis]]
name = "echo"
path = "echo"
service_url = "ws://127.0.0.1:9000/echo"
"""


def write(tmp_path: Path, text: str, name: str = "gw.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    """Load ``text`` as gw.toml, expect failure, return the problems without the file prefix."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    prefix = f"{path}: "
    assert all(p.startswith(prefix) for p in info.value.problems), info.value.problems
    assert str(info.value) == "\n".join(info.value.problems)
    return [p.removeprefix(prefix) for p in info.value.problems]


def one_problem(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


# --- good files -------------------------------------------------------------------------


def test_full_file(tmp_path: Path) -> None:
    for name in ("gw.pem", "gw-key.pem", "certs/ca.pem"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    path = write(
        tmp_path,
        """
        [gateway]
        listen = "0.0.0.0:9443"
        max_connections = 5
        handshake_timeout = 2       # an int is fine for a float field
        backend_connect_timeout = 3.5
        close_timeout = 1.0
        drain_timeout = 0
        [gateway.tls]
        certificate = "gw.pem"
        private_key = "gw-key.pem"

        [[apis]]
        name = "chat-1"
        display_name = "Chat"
        path = "/v1/chat/"
        service_url = "wss://Backend.example:8443/ws?v=2"
        max_message_size = 0
        idle_timeout = 1.5
        backend_ca_file = "certs/ca.pem"
        products = ["gold", "silver"]

        [[apis]]
        name = "root"
        path = ""
        service_url = "ws://[::1]"

        [[products]]
        id = "gold"

        [[products]]
        id = "silver"
        subscription_required = false
        """,
    )
    config = load_config(path)
    assert config.source == path
    assert config.gateway == GatewayConfig(
        listen=Listen(host="0.0.0.0", port=9443),
        max_connections=5,
        handshake_timeout=2.0,
        backend_connect_timeout=3.5,
        close_timeout=1.0,
        drain_timeout=0.0,
        tls=TLSConfig(certificate=tmp_path / "gw.pem", private_key=tmp_path / "gw-key.pem"),
    )
    assert isinstance(config.gateway.handshake_timeout, float)
    chat, root = config.apis
    assert chat == ApiConfig(
        name="chat-1",
        display_name="Chat",
        path="v1/chat",
        service_url="wss://Backend.example:8443/ws?v=2",
        max_message_size=0,
        idle_timeout=1.5,
        backend_ca_file=tmp_path / "certs" / "ca.pem",
        products=("gold", "silver"),
        subscription_required=True,  # resolved from its products by Config
    )
    assert chat.backend == BackendURL(
        secure=True, host="backend.example", port=8443, path="/ws", query="v=2"
    )
    assert root.path == ""
    assert root.display_name == "root"
    assert root.backend == BackendURL(secure=False, host="::1", port=80, path="/", query="")


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, API))
    gateway = config.gateway
    assert gateway == GatewayConfig()
    assert str(gateway.listen) == "127.0.0.1:8080"
    assert (gateway.max_connections, gateway.handshake_timeout) == (200, 10.0)
    assert (gateway.backend_connect_timeout, gateway.close_timeout) == (10.0, 5.0)
    assert (gateway.drain_timeout, gateway.tls) == (30.0, None)
    assert gateway.keepalive == (60, 10, 6)  # on by default: half-open peers get dropped
    (api,) = config.apis
    assert api.display_name == "echo"
    assert api.max_message_size == 16 * 1024 * 1024
    assert api.idle_timeout == 0.0
    assert api.backend_ca_file is None
    assert api.products == ()


def test_empty_file_is_a_gateway_without_apis(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config == Config(source=tmp_path / "gw.toml")
    assert load_config(write(tmp_path, "apis = []")).apis == ()


def test_ipv6_listen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[gateway]\nlisten = "[::1]:0"\n'))
    assert config.gateway.listen == Listen(host="::1", port=0)
    assert str(config.gateway.listen) == "[::1]:0"


def test_relative_source_path_keeps_label_and_resolves_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "ca.pem").write_text("x")
    write(
        tmp_path,
        API.replace("ws://", "wss://") + 'backend_ca_file = "ca.pem"\n',
        name="conf/gw.toml",
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("conf/gw.toml")
    assert config.apis[0].backend_ca_file == tmp_path / "conf" / "ca.pem"
    assert config.source == tmp_path / "conf" / "gw.toml"
    with pytest.raises(ConfigError) as info:
        load_config("conf/missing.toml")
    assert info.value.problems[0].startswith("conf/missing.toml: ")


def test_demo_example_loads() -> None:
    config = load_config(DEMO)
    assert config.gateway.listen == Listen(host="127.0.0.1", port=8080)
    (api,) = config.apis
    assert (api.name, api.display_name, api.path) == ("echo", "Echo service", "echo")
    assert api.service_url == "ws://127.0.0.1:9000/echo"


def test_parse_config_from_dict(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    data = {
        "apis": [{"name": "a", "path": "a", "service_url": "wss://h/", "backend_ca_file": "ca.pem"}]
    }
    config = parse_config(data, base_dir=tmp_path)
    assert config.apis[0].backend_ca_file == tmp_path / "ca.pem"
    assert config.source is None
    with pytest.raises(ConfigError) as info:
        parse_config({"apis": [{"name": "a"}]}, source="api.json")
    assert info.value.problems == [
        "api.json: apis[0].path: missing required key",
        "api.json: apis[0].service_url: missing required key",
    ]
    with pytest.raises(ConfigError) as info:
        parse_config({"gateway": {"listne": 1}})
    assert info.value.problems == ["<config>: gateway.listne: unknown key (did you mean 'listen'?)"]


def test_parse_config_rejects_non_table_document() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config([], source="x.json")  # type: ignore[arg-type]
    assert info.value.problems == ["x.json: expected a table, got an empty array"]


# --- errors in files --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # difflib finds 'cluster' the nearest top-level key
        ("listne = 1", "listne: unknown key (did you mean 'cluster'?)"),
        ("gateways = 1", "gateways: unknown key (did you mean 'gateway'?)"),
        ('[gateway]\nlistne = "x"', "gateway.listne: unknown key (did you mean 'listen'?)"),
        (
            '[gateway.tls]\ncertificate = "a"\nprivate_key = "b"\nca = "c"',
            "gateway.tls.ca: unknown key",
        ),
        (API + "colour = 1", "apis[0].colour: unknown key"),
        (API + '"odd key" = 1', 'apis[0]."odd key": unknown key'),
    ],
)
def test_unknown_keys(tmp_path: Path, text: str, expected: str) -> None:
    for name in ("a", "b"):
        (tmp_path / name).write_text("x")
    assert one_problem(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[gateway]\nlisten = 8080",
            "gateway.listen: expected a string 'host:port', got an integer",
        ),
        (
            "[gateway]\nmax_connections = true",
            "gateway.max_connections: expected an integer, got a boolean",
        ),
        (
            "[gateway]\nmax_connections = 2.0",
            "gateway.max_connections: expected an integer, got a float",
        ),
        (
            "[gateway]\nclose_timeout = false",
            "gateway.close_timeout: expected a number, got a boolean",
        ),
        (
            '[gateway]\ndrain_timeout = "30s"',
            "gateway.drain_timeout: expected a number, got a string",
        ),
        (
            "[gateway]\nhandshake_timeout = 1979-05-27",
            "gateway.handshake_timeout: expected a number, got a date/time",
        ),
        ('gateway = "x"', "gateway: expected a table, got a string"),
        ("[gateway]\ntls = 1", "gateway.tls: expected a table, got an integer"),
        ("[apis]\nname = 'x'", "apis: expected an array of tables, got a table"),
        ('apis = ["echo"]', "apis[0]: expected a table, got a string"),
        (API.replace('"echo"', "1", 1), "apis[0].name: expected a string, got an integer"),
        (
            API + "products = [1, 'a']",
            "apis[0].products: expected an array of strings, got an array with a string"
            " and an integer",
        ),
        (API + "products = 'gold'", "apis[0].products: expected an array of strings, got a string"),
        (
            API + "max_message_size = true",
            "apis[0].max_message_size: expected an integer, got a boolean",
        ),
        (API + "idle_timeout = true", "apis[0].idle_timeout: expected a number, got a boolean"),
        (
            API + "backend_ca_file = 1",
            "apis[0].backend_ca_file: expected a string (file path), got an integer",
        ),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, expected: str) -> None:
    assert one_problem(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[gateway]\nmax_connections = 0", "gateway.max_connections: must be >= 1, got 0"),
        ("[gateway]\nhandshake_timeout = 0", "gateway.handshake_timeout: must be > 0, got 0.0"),
        (
            "[gateway]\nbackend_connect_timeout = -1",
            "gateway.backend_connect_timeout: must be > 0, got -1.0",
        ),
        ("[gateway]\nclose_timeout = 0.0", "gateway.close_timeout: must be > 0, got 0.0"),
        ("[gateway]\ndrain_timeout = -0.5", "gateway.drain_timeout: must be >= 0, got -0.5"),
        ("[gateway]\ntcp_keepalive = -1", "gateway.tcp_keepalive: must be >= 0, got -1"),
        (
            '[gateway]\nredact_query_parameters = ["ok", "a=b"]',
            "gateway.redact_query_parameters: invalid query parameter name 'a=b': must be "
            "non-empty, without spaces, control characters or any of & = # % +",
        ),
        (
            "[gateway]\ntcp_keepalive = 40000",
            "gateway.tcp_keepalive: must be <= 32767, got 40000",
        ),
        (
            "[gateway]\ntcp_keepalive = 1.5",
            "gateway.tcp_keepalive: expected an integer, got a float",
        ),
        (
            "[gateway]\ntcp_keepalive_interval = 0",
            "gateway.tcp_keepalive_interval: must be >= 1, got 0",
        ),
        (
            "[gateway]\ntcp_keepalive_probes = 128",
            "gateway.tcp_keepalive_probes: must be <= 127, got 128",
        ),
        (
            "[gateway]\nclose_timeout = inf",
            "gateway.close_timeout: must be a finite number, got inf",
        ),
        (
            "[gateway]\ndrain_timeout = nan",
            "gateway.drain_timeout: must be a finite number, got nan",
        ),
        (
            '[gateway]\nlisten = "127.0.0.1:65536"',
            "gateway.listen: port must be an integer 0-65535, got 65536",
        ),
        (
            '[gateway]\nlisten = "::1:80"',
            "gateway.listen: IPv6 addresses need brackets, e.g. '[::1]:8080', got '::1:80'",
        ),
        (
            '[gateway]\nlisten = "localhost"',
            "gateway.listen: expected 'host:port' (e.g. '127.0.0.1:8080' or '[::1]:8080'),"
            " got 'localhost'",
        ),
        (API + "max_message_size = -1", "apis[0].max_message_size: must be >= 0, got -1"),
        (API + "idle_timeout = -1", "apis[0].idle_timeout: must be >= 0, got -1.0"),
        (API + 'display_name = " "', "apis[0].display_name: must not be empty"),
    ],
)
def test_out_of_range(tmp_path: Path, text: str, expected: str) -> None:
    assert one_problem(tmp_path, text) == expected


@pytest.mark.parametrize(
    "name", ["Echo", "-echo", "echo_1", "", "ech o", "\u00e9ch\u043e", "echo\n"]
)
def test_bad_api_name(tmp_path: Path, name: str) -> None:
    problem = one_problem(tmp_path, API.replace('"echo"', repr(name).replace("'", '"'), 1))
    assert problem.startswith(f"apis[0].name: invalid name {name!r}: use lowercase letters")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("a//b", "empty segment ('//')"),
        ("a/../b", "'.' and '..' segments are not allowed"),
        ("./a", "'.' and '..' segments are not allowed"),
        ("a?b=1", "must not contain '?' or '#'"),
        ("a#b", "must not contain '?' or '#'"),
        ("a b", "must not contain whitespace or control characters"),
        ("a\\tb", "must not contain whitespace or control characters"),
    ],
)
def test_bad_api_path(tmp_path: Path, path: str, reason: str) -> None:
    problem = one_problem(tmp_path, API.replace('path = "echo"', f'path = "{path}"'))
    assert problem.startswith("apis[0].path: invalid path ")
    assert problem.endswith(f": {reason}")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/echo", "scheme must be ws or wss, got 'http'"),
        ("127.0.0.1:9000", "expected a ws:// or wss:// URL, got '127.0.0.1:9000'"),
        ("localhost:9000/echo", "expected a ws:// or wss:// URL, got 'localhost:9000/echo'"),
        ("ws:///echo", "URL has no host: 'ws:///echo'"),
        ("ws://h/echo#frag", "must not have a fragment ('#...')"),
        ("ws://user:pw@h/echo", "must not contain userinfo (user:password@)"),
        ("ws://h:99999/", "invalid URL 'ws://h:99999/': Port out of range 0-65535"),
        ("ws://h:0/", "port must be an integer 1-65535, got 0"),
        ("ws://h/a b", "must not contain whitespace or control characters"),
    ],
)
def test_bad_service_url(tmp_path: Path, url: str, reason: str) -> None:
    text = API.replace('"ws://127.0.0.1:9000/echo"', f'"{url}"')
    assert one_problem(tmp_path, text) == f"apis[0].service_url: {reason}"


def test_duplicate_names_and_paths_name_both_indexes(tmp_path: Path) -> None:
    text = (
        API
        + API.replace('name = "echo"', 'name = "other"')
        + API.replace('path = "echo"', 'path = "/echo2/"')
        + API.replace('name = "echo"', 'name = "x"').replace('path = "echo"', 'path = "echo2"')
    )
    assert problems(tmp_path, text) == [
        "apis[2].name: duplicate name 'echo' (also apis[0].name)",
        "apis[1].path: duplicate path 'echo' (also apis[0].path)",
        "apis[3].path: duplicate path 'echo2' (also apis[2].path)",
    ]


def test_missing_required_keys(tmp_path: Path) -> None:
    assert problems(tmp_path, "[[apis]]\n") == [
        "apis[0].name: missing required key",
        "apis[0].path: missing required key",
        "apis[0].service_url: missing required key",
    ]
    assert one_problem(tmp_path, '[gateway.tls]\ncertificate = "gw.toml"\n') == (
        "gateway.tls.private_key: missing required key"
    )


def test_missing_files(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    text = (
        """
        [gateway.tls]
        certificate = "nope.pem"
        private_key = "dir"
        """
        + API.replace("ws://", "wss://")
        + 'backend_ca_file = "sub/ca.pem"\n'
    )
    assert problems(tmp_path, text) == [
        f"gateway.tls.certificate: file not found: {tmp_path / 'nope.pem'}",
        f"gateway.tls.private_key: not a file: {tmp_path / 'dir'}",
        f"apis[0].backend_ca_file: file not found: {tmp_path / 'sub' / 'ca.pem'}",
    ]


def test_ca_file_with_plain_ws(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    assert one_problem(tmp_path, API + 'backend_ca_file = "ca.pem"') == (
        "apis[0].backend_ca_file: only allowed with a wss:// service_url, not ws://"
    )


def test_invalid_toml(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, '[gateway]\nlisten = "127.0.0.1:80"\nmax_connections = \n')
    assert problem.startswith("invalid TOML: ")
    assert "line 3" in problem


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_bytes(b'[gateway]\nlisten = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith(f"{path}: not valid UTF-8")


def test_missing_and_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "gw.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.problems == [f"{missing}: cannot read config file: No such file or directory"]
    assert isinstance(info.value, WsgateError)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems[0].startswith(f"{tmp_path}: cannot read config file: ")


def test_every_error_is_reported_together(tmp_path: Path) -> None:
    text = """
        [gateway]
        listne = "127.0.0.1:80"
        max_connections = true
        handshake_timeout = 0

        [[apis]]
        name = "Echo"
        path = "a/../b"
        service_url = "http://x"
        colour = "red"

        [[apis]]
        name = "chat"
        path = "chat"
        service_url = "ws://h/"
        products = [1]

        [[apis]]
        name = "chat"
        path = "other"
        """
    assert problems(tmp_path, text) == [
        "gateway.listne: unknown key (did you mean 'listen'?)",
        "gateway.max_connections: expected an integer, got a boolean",
        "gateway.handshake_timeout: must be > 0, got 0.0",
        "apis[0].name: invalid name 'Echo': use lowercase letters, digits and '-',"
        " starting with a letter or digit",
        "apis[0].path: invalid path 'a/../b': '.' and '..' segments are not allowed",
        "apis[0].service_url: scheme must be ws or wss, got 'http'",
        "apis[0].colour: unknown key",
        "apis[1].products: expected an array of strings, got an array with an integer",
        "apis[2].service_url: missing required key",
        # Reported although apis[1] and apis[2] are invalid themselves.
        "apis[2].name: duplicate name 'chat' (also apis[1].name)",
    ]


# --- configs built in code --------------------------------------------------------------


def test_code_built_configs_are_validated(tmp_path: Path) -> None:
    good: dict[str, Any] = {"name": "echo", "path": "echo", "service_url": "ws://h/echo"}
    with pytest.raises(ValueError, match="invalid name 'Bad Name'"):
        ApiConfig(**{**good, "name": "Bad Name"})
    with pytest.raises(ValueError, match="scheme must be ws or wss"):
        ApiConfig(**{**good, "service_url": "https://h/"})
    with pytest.raises(ValueError, match="empty segment"):
        ApiConfig(**{**good, "path": "a//b"})
    with pytest.raises(ValueError, match="must be >= 0"):
        ApiConfig(**{**good, "max_message_size": -1})
    with pytest.raises(ValueError, match="file not found"):
        ApiConfig(**{**good, "backend_ca_file": tmp_path / "ca.pem"})
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(KeyedValueError, match="backend_ca_file: only allowed with a wss://"):
        ApiConfig(**{**good, "backend_ca_file": tmp_path / "ca.pem"})
    with pytest.raises(ValueError, match="must be >= 1"):
        GatewayConfig(max_connections=0)
    with pytest.raises(ValueError, match="must be an integer"):
        GatewayConfig(max_connections=True)
    with pytest.raises(ValueError, match="must be > 0"):
        GatewayConfig(close_timeout=0)
    with pytest.raises(ValueError, match="file not found"):
        TLSConfig(certificate=tmp_path / "x.pem", private_key=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="port must be an integer 0-65535"):
        Listen(host="h", port=-1)
    with pytest.raises(ValueError, match="invalid IPv6 address"):
        Listen(host="1:2:x", port=1)
    with pytest.raises(ValueError, match="port must be an integer 1-65535"):
        BackendURL(secure=False, host="h", port=0)
    api = ApiConfig(**good)
    with pytest.raises(KeyedValueError) as info:
        Config(apis=[api, attrs.evolve(api, name="other"), attrs.evolve(api, path="b")])
    assert info.value.problems == [
        ("apis[2].name", "duplicate name 'echo' (also apis[0].name)"),
        ("apis[1].path", "duplicate path 'echo' (also apis[0].path)"),
    ]


def test_code_built_config_normalizes() -> None:
    api = ApiConfig(name="echo", path="/echo/", service_url="wss://h/", products=["p"])
    assert api.path == "echo"
    assert api.products == ("p",)
    assert api.display_name == "echo"
    assert api.backend == BackendURL(secure=True, host="h", port=443, path="/", query="")
    config = Config(apis=[api], products=[ProductConfig(id="p", subscription_required=False)])
    assert config.apis == (attrs.evolve(api, subscription_required=False),)
    assert config.products[0].display_name == "p"
    with pytest.raises(KeyedValueError, match=r"apis\[0\]\.products\[0\]: unknown product 'p'"):
        Config(apis=[api])
    with pytest.raises(ValueError, match="not the string 'gold'"):
        ApiConfig(name="echo", path="", service_url="ws://h/", products="gold")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        api.name = "x"  # type: ignore[misc]


def test_specs_name_real_fields() -> None:
    for cls, spec in _SPECS.items():
        init_fields = {field.name for field in attrs.fields(cls) if field.init}
        assert set(spec) <= init_fields, cls


# --- Listen and BackendURL --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("localhost:0", "localhost", 0),
        ("[::1]:8080", "::1", 8080),
        ("[::]:443", "::", 443),
    ],
)
def test_listen_parse_roundtrip(text: str, host: str, port: int) -> None:
    listen = Listen.parse(text)
    assert listen == Listen(host=host, port=port)
    assert str(listen) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "expected 'host:port'"),
        (":80", "expected 'host:port'"),
        ("host", "expected 'host:port'"),
        ("host:", "expected 'host:port'"),
        ("host:http", "expected 'host:port'"),
        ("h:-1", "expected 'host:port'"),
        ("h:123456", "expected 'host:port'"),
        ("[::1]", "expected 'host:port'"),
        ("[::1:80", "expected 'host:port'"),
        ("[]:80", "brackets are only for IPv6"),
        ("[127.0.0.1]:80", "brackets are only for IPv6"),
        ("::1:80", "IPv6 addresses need brackets"),
        ("[1:x]:80", "invalid IPv6 address"),
        ("a b:80", "invalid host"),
    ],
)
def test_listen_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        Listen.parse(text)


@pytest.mark.parametrize(
    ("url", "expected", "host_header", "normal"),
    [
        (
            "ws://127.0.0.1:9000/echo",
            BackendURL(secure=False, host="127.0.0.1", port=9000, path="/echo", query=""),
            "127.0.0.1:9000",
            "ws://127.0.0.1:9000/echo",
        ),
        (
            "ws://example.com",
            BackendURL(secure=False, host="example.com", port=80, path="/", query=""),
            "example.com",
            "ws://example.com/",
        ),
        (
            "WSS://Example.COM:443/a/b/?x=1&y",
            BackendURL(secure=True, host="example.com", port=443, path="/a/b/", query="x=1&y"),
            "example.com",
            "wss://example.com/a/b/?x=1&y",
        ),
        (
            "wss://example.com:80/",
            BackendURL(secure=True, host="example.com", port=80, path="/", query=""),
            "example.com:80",
            "wss://example.com:80/",
        ),
        (
            "ws://[::1]/",
            BackendURL(secure=False, host="::1", port=80, path="/", query=""),
            "[::1]",
            "ws://[::1]/",
        ),
        (
            "wss://[2001:db8::1]:8443/ws?v=2",
            BackendURL(secure=True, host="2001:db8::1", port=8443, path="/ws", query="v=2"),
            "[2001:db8::1]:8443",
            "wss://[2001:db8::1]:8443/ws?v=2",
        ),
    ],
)
def test_backend_url_parse(url: str, expected: BackendURL, host_header: str, normal: str) -> None:
    backend = BackendURL.parse(url)
    assert backend == expected
    assert backend.host_header == host_header
    assert backend.url == normal
    assert BackendURL.parse(backend.url) == backend


@pytest.mark.parametrize(
    "url", ["http://h/", "ws://", "ws://h/#", "ws://u@h/", "ws://[::1/", "ws://h:x/", "ws ://h/"]
)
def test_backend_url_parse_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        BackendURL.parse(url)


@pytest.mark.parametrize(
    ("url", "rest", "client_query", "target"),
    [
        ("ws://h/echo?v=2", "/room/1", "a=b", "/echo/room/1?v=2&a=b"),
        ("ws://h/echo", "", "", "/echo"),
        ("ws://h/echo", "/", "", "/echo/"),
        ("ws://h/echo/", "/room", "", "/echo/room"),
        ("ws://h/echo/", "", "a=b", "/echo/?a=b"),
        ("ws://h", "/room", "", "/room"),
        ("ws://h/", "", "", "/"),
        ("ws://h/echo", "room", "", "/echo/room"),
        ("ws://h/echo?v=2", "", "", "/echo?v=2"),
        ("ws://h/echo", "", "a=b&c", "/echo?a=b&c"),
    ],
)
def test_backend_target(url: str, rest: str, client_query: str, target: str) -> None:
    assert BackendURL.parse(url).target(rest, client_query) == target

"""[gateway] trusted_proxies, proxy_protocol and forwarded_header: validation and `wsgate check`."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from wsgate.config import GatewayConfig, KeyedValueError, parse_config
from wsgate.errors import ConfigError

from .test_cli import run_wsgate


def test_defaults_trust_nobody() -> None:
    gateway = parse_config({}).gateway
    assert (gateway.trusted_proxies, gateway.proxy_protocol) == ((), False)
    assert not gateway.trusted
    assert gateway.forwarded_header == "x-forwarded-for"


def test_trusted_proxies_are_parsed_once() -> None:
    gateway = parse_config({"gateway": {"trusted_proxies": ["10.0.0.0/8", "::1"]}}).gateway
    assert gateway.trusted.trusts("10.9.8.7") and gateway.trusted.trusts("::1")
    assert not gateway.trusted.trusts("192.0.2.1")
    # evolve (reload, --listen) re-derives it.
    evolved = attrs.evolve(gateway, trusted_proxies=("192.0.2.0/24",))
    assert evolved.trusted.trusts("192.0.2.1") and not evolved.trusted.trusts("10.9.8.7")


def test_proxy_protocol_without_trusted_proxies_says_why() -> None:
    with pytest.raises(KeyedValueError, match="proxy_protocol: needs trusted_proxies"):
        GatewayConfig(proxy_protocol=True)


async def check(path: Path) -> tuple[int, str]:
    # A process, as a user runs it: `wsgate check` configures logging for itself.
    done = await run_wsgate("check", str(path))
    return done.returncode, done.stderr.decode()


async def test_check_reports_every_problem_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        "[gateway]\n"
        'trusted_proxies = ["10.0.0.1/8", "balancer.internal", 7]\n'
        'forwarded_header = "X-Real-IP"\n'
        'proxy_protocol = "yes"\n'
    )
    status, err = await check(path)
    assert status == 1
    assert "gateway.trusted_proxies: expected an array of strings" in err
    assert "gateway.forwarded_header: must be one of 'x-forwarded-for', 'forwarded'" in err
    assert "gateway.proxy_protocol: expected a boolean" in err
    path.write_text('[gateway]\ntrusted_proxies = ["10.0.0.1/8", "balancer.internal"]\n')
    status, err = await check(path)
    assert status == 1
    assert (
        "gateway.trusted_proxies[0]: '10.0.0.1/8' has host bits set (did you mean '10.0.0.0/8'?)"
        in err
    )
    assert "gateway.trusted_proxies[1]: invalid IP address or CIDR range 'balancer.internal'" in err


async def test_check_refuses_proxy_protocol_alone(tmp_path: Path) -> None:
    path = tmp_path / "pp.toml"
    path.write_text("[gateway]\nproxy_protocol = true\n")
    status, err = await check(path)
    assert status == 1
    assert f"{path}: gateway.proxy_protocol: needs trusted_proxies" in err
    path.write_text('[gateway]\nproxy_protocol = true\ntrusted_proxies = ["10.0.0.0/8"]\n')
    assert (await check(path))[0] == 0


def test_load_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.proxy_protocol"):
        parse_config({"gateway": {"proxy_protocol": True}})

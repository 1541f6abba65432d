"""The management API over real HTTP: auth, CRUD semantics, live changes, connections, reload."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from trio_websocket import open_websocket_url

import wsgate
from wsgate.admin import reload_on_sighup
from wsgate.admin.openapi import openapi_document

from .helpers import RawClient, make_config, wait_until
from .test_admin_harness import TOKEN, api_body, start_admin, write_config

KEY1 = "key-one-0123456789-abcd"
KEY2 = "key-two-0123456789-wxyz"


def echo_config(echo_url: str, **gateway: Any) -> wsgate.Config:
    return make_config([{"name": "echo", "path": "echo", "service_url": echo_url}], **gateway)


async def too_large_status(url: str) -> int:
    """PUT with a 2 MiB Content-Length (only the head is sent): the admin's status code."""
    port = int(url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        head = (
            f"PUT /apis/big HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {2 * 1024 * 1024}\r\n\r\n"
        )
        await stream.send_all(head.encode())
        response = await stream.receive_some(65536)
    return int(response.split(b" ", 2)[1])


async def status_of(port: int, target: str) -> int:
    client = await RawClient.connect(port, target)
    await client.aclose()
    assert client.response is not None
    return client.response.status


# -- probes and auth -----------------------------------------------------------------


async def test_probes_are_open(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    async with admin.client(token=None) as http:
        health = await http.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "wsgate_connections_active" in metrics.text
        assert (await http.get("/openapi.json")).json()["openapi"].startswith("3.")


PROTECTED = [
    ("GET", "/apis"),
    ("POST", "/apis"),
    ("GET", "/apis/echo"),
    ("PUT", "/apis/echo"),
    ("PATCH", "/apis/echo"),
    ("DELETE", "/apis/echo"),
    ("GET", "/products"),
    ("PUT", "/products/gold"),
    ("DELETE", "/products/gold"),
    ("GET", "/subscriptions"),
    ("GET", "/subscriptions/s1"),
    ("PATCH", "/subscriptions/s1"),
    ("GET", "/connections"),
    ("GET", "/connections/some-id"),
    ("DELETE", "/connections/some-id"),
    ("POST", "/reload"),
]


async def test_management_needs_the_bearer_token(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    async with admin.client(token=None) as anonymous, admin.client(token="x" * 28) as wrong:
        for method, path in PROTECTED:
            body = {"path": "hijack", "service_url": echo_url}
            missing = await anonymous.request(method, path, json=body)
            assert missing.status_code == 401, (method, path)
            assert missing.headers["www-authenticate"].startswith("Bearer")
            assert missing.json()["errors"][0]["message"].startswith("missing bearer token")
            bad = await wrong.request(method, path, json=body)
            assert bad.status_code == 401, (method, path)
            assert bad.json() == {"errors": [{"field": None, "message": "invalid token"}]}
            basic = await anonymous.request(
                method, path, headers={"Authorization": f"Basic {TOKEN}"}
            )
            assert basic.status_code == 401
    async with admin.client() as http:
        response = await http.get("/apis/echo")  # nothing was changed by the refused calls
        assert response.status_code == 200 and response.json()["path"] == "echo"


async def test_no_token_configured_disables_management(
    nursery: trio.Nursery, echo_url: str
) -> None:
    admin = await start_admin(nursery, echo_config(echo_url), token=None)
    async with admin.client(token=TOKEN) as http:
        for method, path in PROTECTED:
            response = await http.request(method, path)
            assert response.status_code == 403, (method, path)
            message = response.json()["errors"][0]["message"]
            assert "WSGATE_ADMIN_TOKEN" in message and "[admin]" in message
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200


# -- APIs ----------------------------------------------------------------------------


async def test_get_list_and_404(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    async with admin.client() as http:
        listing = (await http.get("/apis")).json()
        assert [api["name"] for api in listing["apis"]] == ["echo"]
        echo = (await http.get("/apis/echo")).json()
        assert echo == listing["apis"][0]
        assert echo["service_url"] == echo_url and echo["display_name"] == "echo"
        missing = await http.get("/apis/nope")
        assert missing.status_code == 404
        assert missing.json() == {"errors": [{"field": None, "message": "no API 'nope'"}]}
        unknown = await http.get("/no/such/endpoint")
        assert unknown.status_code == 404 and "errors" in unknown.json()
        wrong_method = await http.post("/apis/echo")
        assert wrong_method.status_code == 405


async def test_put_creates_with_201_then_replaces_with_200(
    nursery: trio.Nursery, echo_url: str
) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    async with admin.client() as http:
        created = await http.put("/apis/chat", json=api_body(echo_url, "chat"))
        assert created.status_code == 201
        assert created.headers["location"] == "/apis/chat"
        assert created.json()["name"] == "chat"  # taken from the URL
        replaced = await http.put(
            "/apis/chat", json=api_body(echo_url, "talk", name="chat", idle_timeout=5)
        )
        assert replaced.status_code == 200
        assert replaced.json()["path"] == "talk" and replaced.json()["idle_timeout"] == 5
        assert await status_of(admin.port, "/talk") == 101
        assert await status_of(admin.port, "/chat") == 404
        posted = await http.post("/apis", json=api_body(echo_url, "third", name="third"))
        assert posted.status_code == 201 and posted.headers["location"] == "/apis/third"
        names = [api["name"] for api in (await http.get("/apis")).json()["apis"]]
        assert names == ["echo", "chat", "third"]


async def test_validation_errors_name_each_field(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    async with admin.client() as http:
        bad = await http.put(
            "/apis/bad",
            json={
                "path": "b",
                "service_url": "http://not-websocket",
                "max_message_size": -1,
                "idle_timeout": "soon",
                "colour": "red",
            },
        )
        assert bad.status_code == 400
        fields = {error["field"] for error in bad.json()["errors"]}
        assert fields == {"service_url", "max_message_size", "idle_timeout", "colour"}
        missing = await http.put("/apis/bad", json={"path": "b"})
        assert missing.status_code == 400
        assert {e["field"] for e in missing.json()["errors"]} == {"service_url"}
        name = await http.put("/apis/Bad_Name", json=api_body(echo_url, "b"))
        assert name.status_code == 400 and name.json()["errors"][0]["field"] == "name"
        renamed = await http.put("/apis/echo", json=api_body(echo_url, "echo", name="other"))
        assert renamed.status_code == 400 and renamed.json()["errors"][0]["field"] == "name"
        policy = await http.put(
            "/apis/limited",
            json=api_body(echo_url, "limited", policies=[{"policy": "rate-limit", "calls": 0}]),
        )
        assert policy.status_code == 400
        assert {e["field"] for e in policy.json()["errors"]} >= {"policies[0].calls"}
        for raw in (b"[1, 2]", b"{not json", b""):
            response = await http.put(
                "/apis/bad", content=raw, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 400, raw
            assert response.json()["errors"][0]["field"] is None
        posted = await http.post("/apis", json={"path": "x", "service_url": echo_url})
        assert posted.status_code == 400 and posted.json()["errors"][0]["field"] == "name"
        assert await too_large_status(admin.url) == 413
        # Nothing was applied.
        assert [api["name"] for api in (await http.get("/apis")).json()["apis"]] == ["echo"]


async def test_duplicate_path_or_name_is_409(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    async with admin.client() as http:
        same_path = await http.put("/apis/chat", json=api_body(echo_url, "/echo/"))
        assert same_path.status_code == 409
        assert same_path.json()["errors"] == [
            {"field": "path", "message": "path 'echo' is used by API 'echo'"}
        ]
        same_name = await http.post("/apis", json=api_body(echo_url, "x", name="echo"))
        assert same_name.status_code == 409
        assert same_name.json()["errors"][0]["field"] == "name"
        assert (await http.put("/products/gold", json={})).status_code == 201
        clash = await http.put("/apis/gold", json=api_body(echo_url, "gold"))
        assert clash.status_code == 409 and clash.json()["errors"][0]["field"] == "name"
        clash = await http.put("/products/echo", json={})
        assert clash.status_code == 409 and clash.json()["errors"][0]["field"] == "id"
        again = await http.post("/products", json={"id": "gold"})
        assert again.status_code == 409


async def test_patch_merges_fields(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    async with admin.client() as http:
        patched = await http.patch("/apis/echo", json={"display_name": "Echo!", "idle_timeout": 3})
        assert patched.status_code == 200
        body = patched.json()
        assert (body["display_name"], body["idle_timeout"], body["path"]) == ("Echo!", 3, "echo")
        assert admin.gateway.config.apis[0].idle_timeout == 3
        reset = await http.patch("/apis/echo", json={"display_name": None})
        assert reset.json()["display_name"] == "echo"  # back to its default
        invalid = await http.patch("/apis/echo", json={"idle_timeout": -1})
        assert invalid.status_code == 400
        assert invalid.json()["errors"][0]["field"] == "idle_timeout"
        assert (await http.patch("/apis/nope", json={})).status_code == 404
        assert (await http.patch("/apis/echo", json={"name": "x"})).status_code == 400


async def test_get_output_round_trips_through_put(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    policies = [
        {"policy": "rate-limit", "calls": 5, "renewal_period": 60},
        {"policy": "check-header", "name": "X-Tenant", "values": ["a", "b"]},
    ]
    async with admin.client() as http:
        created = await http.put(
            "/apis/limited", json=api_body(echo_url, "limited", policies=policies)
        )
        assert created.status_code == 201, created.text
        table = created.json()
        assert table["policies"][0] == {"policy": "rate-limit", "calls": 5, "renewal_period": 60}
        assert table["policies"][1]["values"] == ["a", "b"]
        before = admin.gateway.config.apis[1]
        again = await http.put("/apis/limited", json=table)
        assert again.status_code == 200 and again.json() == table
        # An unchanged API keeps its objects (and the policy state the gateway keeps for them).
        assert admin.gateway.config.apis[1] is before


async def test_live_change_next_handshake_while_open_pair_flows(
    nursery: trio.Nursery, echo_url: str
) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    gw = admin.gateway
    async with admin.client() as http, open_websocket_url(f"{gw.url}/echo") as old_pair:
        await old_pair.send_message("before")
        assert await old_pair.get_message() == "before"
        moved = await http.patch("/apis/echo", json={"path": "moved"})
        assert moved.status_code == 200
        async with open_websocket_url(f"{gw.url}/moved") as new_pair:
            await new_pair.send_message("new path")
            assert await new_pair.get_message() == "new path"
        assert await status_of(admin.port, "/echo") == 404
        await old_pair.send_message("still flowing")
        assert await old_pair.get_message() == "still flowing"
        deleted = await http.delete("/apis/echo")
        assert deleted.json() == {"deleted": "echo", "terminated": 0}
        assert await status_of(admin.port, "/moved") == 404
        await old_pair.send_message("flowing after delete")
        assert await old_pair.get_message() == "flowing after delete"


async def test_delete_with_terminate_closes_pairs_with_1001(
    nursery: trio.Nursery, echo_url: str
) -> None:
    config = make_config(
        [
            {"name": "echo", "path": "echo", "service_url": echo_url},
            {"name": "other", "path": "other", "service_url": echo_url},
        ]
    )
    admin = await start_admin(nursery, config)
    victims = [await RawClient.connect(admin.port, "/echo") for _ in range(2)]
    bystander = await RawClient.connect(admin.port, "/other")
    async with admin.client() as http:
        bad = await http.delete("/apis/echo?terminate=maybe")
        assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "terminate"
        response = await http.delete("/apis/echo?terminate=true")
        assert response.json() == {"deleted": "echo", "terminated": 2}
        for victim in victims:
            assert await victim.receive_close() == (1001, "API removed")
            await victim.aclose()
        assert (await http.delete("/apis/echo")).status_code == 404
    assert await status_of(admin.port, "/echo") == 404
    await bystander.send_text("alive")
    (frame,) = await bystander.receive_frames(1)
    assert frame.payload == "alive"
    await bystander.aclose()


# -- products and subscriptions ------------------------------------------------------


async def test_products_and_subscriptions(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    async with admin.client() as http:
        gold = await http.put("/products/gold", json={"display_name": "Gold"})
        assert gold.status_code == 201
        assert gold.json() == {
            "id": "gold",
            "display_name": "Gold",
            "subscription_required": True,
            "policies": [],
            "inherit_policies": True,
        }
        echo = await http.patch("/apis/echo", json={"products": ["gold"]})
        assert echo.json()["subscription_required"] is True  # resolved from its product
        created = await http.put("/subscriptions/s1", json={"scope": "gold", "primary_key": KEY1})
        assert created.status_code == 201
        assert created.json()["primary_key"] == "****" + KEY1[-4:]
        shared = await http.put("/subscriptions/s2", json={"scope": "gold", "primary_key": KEY1})
        assert shared.status_code == 409
        assert shared.json()["errors"][0]["field"] == "primary_key"
        unknown = await http.put("/subscriptions/s3", json={"scope": "nope", "primary_key": KEY2})
        assert unknown.status_code == 400
        assert unknown.json()["errors"][0]["field"] == "scope"
        short = await http.put("/subscriptions/s3", json={"scope": "all", "primary_key": "tiny-kz"})
        assert short.status_code == 400 and "tiny-kz" not in short.text
        suspended = await http.patch("/subscriptions/s1", json={"state": "suspended"})
        assert suspended.status_code == 200
        assert admin.gateway.config.subscriptions[0].primary_key == KEY1  # kept by PATCH
        in_use = await http.delete("/products/gold")
        assert in_use.status_code == 409
        fields = {e["field"] for e in in_use.json()["errors"]}
        assert {"apis.echo.products[0]", "subscriptions.s1.scope"} <= fields
        listing = await http.get("/subscriptions")
        everything = listing.text + (await http.get("/subscriptions/s1")).text
        assert KEY1 not in everything and KEY1[-4:] in everything
        assert (await http.delete("/subscriptions/s1")).json() == {"deleted": "s1"}
        assert (await http.patch("/apis/echo", json={"products": []})).status_code == 200
        assert (await http.delete("/products/gold")).status_code == 200
        assert (await http.get("/products")).json() == {"products": []}


# -- connections ---------------------------------------------------------------------


def _parse_time(text: str) -> datetime.datetime:
    assert text.endswith("Z")
    return datetime.datetime.fromisoformat(text[:-1] + "+00:00")


async def test_connections_are_listed_and_terminated(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    first = await RawClient.connect(admin.port)
    await first.send_text("hi")
    assert [f.payload for f in await first.receive_frames(1)] == ["hi"]
    second = await RawClient.connect(admin.port)
    async with admin.client() as http:
        listing = (await http.get("/connections")).json()["connections"]
        assert len(listing) == 2
        assert set(admin.gateway.pairs) == {c["id"] for c in listing}
        one = next(c for c in listing if c["messages_from_client"] == 1)
        assert one["api"] == "echo" and one["caller_ip"] == "127.0.0.1"
        assert one["messages_from_backend"] == 1
        assert one["bytes_from_client"] == 8  # 2-byte header, 4-byte mask, "hi"
        assert one["bytes_from_backend"] == 4
        since, last = _parse_time(one["connected_since"]), _parse_time(one["last_activity"])
        now = datetime.datetime.now(datetime.UTC)
        assert since <= last + datetime.timedelta(milliseconds=5)
        assert now - since < datetime.timedelta(seconds=10)
        assert (await http.get(f"/connections/{one['id']}")).json()["id"] == one["id"]
        assert (await http.get("/connections?api=nope")).json() == {"connections": []}
        terminated = await http.request(
            "DELETE", f"/connections/{one['id']}", json={"reason": "maintenance"}
        )
        assert terminated.json() == {"terminated": one["id"], "code": 1008, "reason": "maintenance"}
        assert await first.receive_close() == (1008, "maintenance")
        other = next(c for c in listing if c["id"] != one["id"])
        assert (await http.delete(f"/connections/{other['id']}")).status_code == 200
        assert await second.receive_close() == (1008, "terminated by operator")
        missing = await http.delete("/connections/no-such-pair")
        assert missing.status_code == 404
        assert (await http.get("/connections/no-such-pair")).status_code == 404
        bad = await http.request("DELETE", "/connections/x", json={"reason": 7})
        assert bad.status_code == 400
    for client in (first, second):
        await client.aclose()


# -- readiness -----------------------------------------------------------------------


async def test_ready_is_503_while_draining(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    async with admin.client(token=None) as http:
        assert (await http.get("/ready")).status_code == 200
        client = await RawClient.connect(admin.port)
        async with trio.open_nursery() as inner:
            inner.start_soon(admin.gateway.drain)
            await wait_until(lambda: admin.gateway.stats().draining)
            during = await http.get("/ready")
            assert (during.status_code, during.json()) == (503, {"status": "draining"})
            assert await client.receive_close() == (1001, "gateway shutting down")
            await client.aclose()
        after = await http.get("/ready")
        assert after.status_code == 503
        assert (await http.get("/health")).status_code == 200


# -- reload --------------------------------------------------------------------------


async def test_reload_rereads_the_file_and_keeps_management_changes(
    nursery: trio.Nursery, echo_url: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "gw.toml", echo_url, "echo")
    admin = await start_admin(nursery, wsgate.load_config(path))
    async with admin.client() as http:
        assert (await http.put("/apis/managed", json=api_body(echo_url, "managed"))).is_success
        write_config(path, echo_url, "echo", "chat")
        reloaded = await http.post("/reload")
        assert reloaded.status_code == 200
        assert reloaded.json() == {
            "status": "reloaded",
            "apis": ["echo", "chat", "managed"],
            "warnings": [],
        }
        assert await status_of(admin.port, "/chat") == 101
        assert admin.gateway.config.source == path


async def test_reload_with_a_bad_file_keeps_the_running_config(
    nursery: trio.Nursery, echo_url: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "gw.toml", echo_url, "echo")
    admin = await start_admin(nursery, wsgate.load_config(path))
    running = admin.gateway.config
    async with admin.client() as http:
        write_config(path, "http://not-a-websocket", "echo", extra='\n[[apis]]\nname = "echo"\n')
        with structlog.testing.capture_logs() as logs:
            refused = await http.post("/reload")
        assert refused.status_code == 400
        errors = refused.json()["errors"]
        bad_url = {
            "field": "apis[0].service_url",
            "message": "scheme must be ws or wss, got 'http'",
        }
        assert bad_url in errors
        assert any(e["field"] == "apis[1].path" for e in errors)
        assert [log["event"] for log in logs] == ["config_reload_failed"]
        assert logs[0]["errors"] == errors
        path.write_text("[gateway\n")
        broken = await http.post("/reload")
        assert broken.status_code == 400 and "invalid TOML" in broken.json()["errors"][0]["message"]
        assert admin.gateway.config is running
        assert await status_of(admin.port, "/echo") == 101


async def test_reload_without_a_file_is_400(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    async with admin.client() as http:
        response = await http.post("/reload")
        assert response.status_code == 400
        assert "not started from a config file" in response.json()["errors"][0]["message"]


async def test_sighup_reloads(nursery: trio.Nursery, echo_url: str, tmp_path: Path) -> None:
    path = write_config(tmp_path / "gw.toml", echo_url, "echo")
    admin = await start_admin(nursery, wsgate.load_config(path))
    await nursery.start(reload_on_sighup, admin.gateway)
    write_config(path, echo_url, "echo", "chat")
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_until(lambda: len(admin.gateway.config.apis) == 2)
    path.write_text("[gateway\n")
    with structlog.testing.capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_until(lambda: bool(logs))
    assert logs[-1]["event"] == "config_reload_failed"
    assert [api.name for api in admin.gateway.config.apis] == ["echo", "chat"]


# -- OpenAPI -------------------------------------------------------------------------

EXPECTED_PATHS = {
    "/health",
    "/ready",
    "/metrics",
    "/openapi.json",
    "/apis",
    "/apis/{name}",
    "/products",
    "/products/{id}",
    "/subscriptions",
    "/subscriptions/{id}",
    "/connections",
    "/connections/{id}",
    "/units",
    "/reload",
}


async def test_openapi_document_is_valid(nursery: trio.Nursery, echo_url: str) -> None:
    admin = await start_admin(nursery, echo_config(echo_url))
    async with admin.client(token=None) as http:
        document = (await http.get("/openapi.json")).json()
    assert document == json.loads(json.dumps(openapi_document()))
    assert set(document["paths"]) == EXPECTED_PATHS
    try:
        from openapi_spec_validator import validate
    except ImportError:  # structural checks only
        assert document["openapi"] == "3.1.0"
        assert {"title", "version"} <= set(document["info"])
        for item in document["paths"].values():
            for method, operation in item.items():
                if method != "parameters":
                    assert operation["responses"] and operation["operationId"]
    else:
        validate(document)
    # Every $ref resolves.
    text = json.dumps(document)
    for name in document["components"]["schemas"]:
        assert f'"#/components/schemas/{name}"' in text or name == "Policy"


@pytest.mark.parametrize("collection", ["apis", "products", "subscriptions"])
def test_openapi_documents_every_method(collection: str) -> None:
    paths = openapi_document()["paths"]
    assert set(paths[f"/{collection}"]) == {"get", "post"}
    item = next(p for p in paths if p.startswith(f"/{collection}/"))
    assert set(paths[item]) == {"parameters", "get", "put", "patch", "delete"}


def test_docs_show_a_curl_example_for_every_endpoint() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "management-api.md").read_text()
    commands = [line for line in doc.replace("\\\n", " ").splitlines() if line.startswith("$ curl")]
    shown = set()
    for command in commands:
        method = re.search(r"-X (\w+)", command)
        target = re.search(r'\$ADMIN(/[^\s"?]*)', command)
        assert target, command
        path = re.sub(r"/(apis|products|subscriptions|connections)/[^/]+$", r"/\1/{}", target[1])
        shown.add((method[1] if method else "GET", path))
    for path, item in openapi_document()["paths"].items():
        for method in item:
            if method != "parameters":
                generic = re.sub(r"\{\w+\}", "{}", path)
                assert (method.upper(), generic) in shown, (method, path)


def test_admin_table_in_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGATE_ADMIN_TOKEN", "from-the-environment-123")
    config = wsgate.parse_config({"admin": {"state_file": "state.json"}}, base_dir=tmp_path)
    assert config.admin is not None
    assert str(config.admin.listen) == "127.0.0.1:8081"
    assert config.admin.token == "from-the-environment-123"
    assert config.admin.state_file == tmp_path / "state.json"
    assert "from-the-environment" not in repr(config.admin)
    explicit = wsgate.parse_config({"admin": {"token": {"env": "WSGATE_ADMIN_TOKEN"}}})
    assert explicit.admin is not None and explicit.admin.token == "from-the-environment-123"
    assert wsgate.parse_config({}).admin is None
    with pytest.raises(wsgate.ConfigError) as caught:
        wsgate.parse_config(
            {"admin": {"listen": "8081", "token": "short", "state_file": "/no/such/dir/s.json"}}
        )
    problems = "\n".join(caught.value.problems)
    assert "admin.listen: expected 'host:port'" in problems
    assert "admin.token: too short" in problems and "short'" not in problems
    assert "admin.state_file: directory not found: /no/such/dir" in problems

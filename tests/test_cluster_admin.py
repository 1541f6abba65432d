"""One management plane for many units ([cluster]): shared config, units, connections.

Units are Gateway objects with their own admin listener and cluster member (one
process, each with its own Redis connections), or ``wsgate serve`` processes,
all on one real redis-server. Time bounds are the issue's (1 s to apply a
change, lease_ttl for a dead unit, timeout + 100 ms for a 503), loose elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from wsgate.config import parse_config

from .helpers import RawClient
from .redis_server import RedisServer, free_port
from .test_admin_harness import AUTH, TOKEN, Admin, start_admin
from .test_workers import Lines


def document(backend_url: str, redis_url: str, *apis: str, **cluster: Any) -> dict[str, Any]:
    return {
        "gateway": {"listen": "127.0.0.1:0"},
        "cluster": {"redis_url": redis_url, **cluster},
        "apis": [{"name": name, "path": name, "service_url": backend_url} for name in apis],
    }


async def two_units(nursery: trio.Nursery, doc: dict[str, Any]) -> tuple[Admin, Admin]:
    first = await start_admin(nursery, parse_config(doc))
    second = await start_admin(nursery, parse_config(doc))
    return first, second


async def status(port: int, path: str) -> int:
    client = await RawClient.connect(port, f"/{path}")
    await client.aclose()
    assert client.response is not None
    return client.response.status


async def poll(check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    """Until ``check()`` is true, for at most ``seconds``."""
    with trio.fail_after(seconds):
        while not await check():  # noqa: ASYNC110
            await trio.sleep(0.05)


def version(response: httpx.Response) -> int:
    return int(response.headers["etag"].strip('"'))


async def test_a_change_on_one_unit_serves_on_the_other_within_a_second(
    nursery: trio.Nursery, echo_url: str, redis_url: str
) -> None:
    a, b = await two_units(nursery, document(echo_url, redis_url, "echo"))
    assert await status(b.port, "fresh") == 404
    async with a.client() as http:
        put = await http.put("/apis/fresh", json={"path": "fresh", "service_url": echo_url})
        assert put.status_code == 201
    with trio.fail_after(1.0):
        while await status(b.port, "fresh") != 101:  # noqa: ASYNC110
            await trio.sleep(0.02)
    async with b.client() as http:
        listed = await http.get("/apis")
        assert [api["name"] for api in listed.json()["apis"]] == ["echo", "fresh"]
        assert version(listed) == version(put) == 2  # 1: seeded from the file


async def test_stale_if_match_gets_409_with_the_current_version_and_nothing_is_lost(
    nursery: trio.Nursery, echo_url: str, redis_url: str
) -> None:
    a, b = await two_units(nursery, document(echo_url, redis_url, "echo"))
    async with a.client() as http_a, b.client() as http_b:
        seen = version(await http_a.get("/apis"))
        results: dict[str, httpx.Response] = {}

        async def put(http: httpx.AsyncClient, name: str) -> None:
            body = {"path": name, "service_url": echo_url}
            results[name] = await http.put(
                f"/apis/{name}", json=body, headers={"If-Match": f'"{seen}"'}
            )

        async with trio.open_nursery() as both:
            both.start_soon(put, http_a, "one")
            both.start_soon(put, http_b, "two")
        codes = sorted(r.status_code for r in results.values())
        assert codes == [201, 409], {n: r.text for n, r in results.items()}
        [(lost, refused)] = [(n, r) for n, r in results.items() if r.status_code == 409]
        assert refused.json()["version"] == seen + 1
        assert version(refused) == seen + 1
        assert "If-Match" in refused.json()["errors"][0]["message"]
        # The loser retries on the version it was given; both changes are kept.
        again = await (http_a if lost == "one" else http_b).put(
            f"/apis/{lost}",
            json={"path": lost, "service_url": echo_url},
            headers={"If-Match": str(refused.json()["version"])},
        )
        assert again.status_code == 201 and version(again) == seen + 2
        # Without If-Match, concurrent changes on two units are both applied.
        async with trio.open_nursery() as both:
            both.start_soon(put_any, http_a, "three", echo_url)
            both.start_soon(put_any, http_b, "four", echo_url)
        with trio.fail_after(5):
            for http in (http_a, http_b):
                while True:
                    names = [api["name"] for api in (await http.get("/apis")).json()["apis"]]
                    if names == ["echo", "one", "two", "three", "four"] or sorted(names) == sorted(
                        ["echo", "one", "two", "three", "four"]
                    ):
                        break
                    await trio.sleep(0.05)
        assert version(await http_a.get("/apis")) == version(await http_b.get("/apis")) == seen + 4
        bad = await http_a.delete("/apis/one", headers={"If-Match": "nope"})
        assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "If-Match"


async def put_any(http: httpx.AsyncClient, name: str, backend: str) -> None:
    response = await http.put(f"/apis/{name}", json={"path": name, "service_url": backend})
    assert response.status_code == 201, response.text


async def test_a_starting_unit_runs_the_shared_document_not_its_file(
    nursery: trio.Nursery, echo_url: str, redis_url: str
) -> None:
    a = await start_admin(nursery, parse_config(document(echo_url, redis_url, "echo")))
    async with a.client() as http:
        assert (await http.delete("/apis/echo")).status_code == 200
        assert (
            await http.put("/apis/chat", json={"path": "chat", "service_url": echo_url})
        ).status_code == 201
    # Its file has "other": the shared document (chat) wins; the file only seeds an empty Redis.
    b = await start_admin(nursery, parse_config(document(echo_url, redis_url, "other")))
    assert await status(b.port, "chat") == 101
    assert await status(b.port, "other") == 404
    assert await status(b.port, "echo") == 404
    async with b.client() as http:
        assert version(await http.get("/apis")) == 3


async def test_a_pair_on_one_unit_is_listed_and_closed_from_another(
    nursery: trio.Nursery, echo_url: str, redis_url: str
) -> None:
    a, b = await two_units(nursery, document(echo_url, redis_url, "echo"))
    async with a.client() as http:
        units = (await http.get("/units")).json()
        assert {u["id"] for u in units["units"]} == {
            member(a).unit_id,
            member(b).unit_id,
        }
        client = await RawClient.connect(b.port, "/echo")
        try:

            async def listed() -> bool:
                return bool((await http.get("/connections")).json()["connections"])

            await poll(listed, 5)
            [pair] = (await http.get("/connections")).json()["connections"]
            assert pair["unit_id"] == member(b).unit_id and pair["api"] == "echo"
            assert (await http.get(f"/connections/{pair['id']}")).json()["unit_id"] == member(
                b
            ).unit_id
            deleted = await http.request(
                "DELETE", f"/connections/{pair['id']}", json={"reason": "from unit a"}
            )
            assert deleted.status_code == 200
            assert deleted.json() == {
                "terminated": pair["id"],
                "code": 1008,
                "reason": "from unit a",
                "unit_id": member(b).unit_id,
            }
            with trio.fail_after(5):
                assert await client.receive_close() == (1008, "from unit a")
        finally:
            await client.aclose()
        assert (await http.delete("/connections/no-such-pair")).status_code == 404

        async def none_listed() -> bool:
            return not (await http.get("/connections")).json()["connections"]

        await poll(none_listed, 5)
        [unit_b] = [
            u for u in (await http.get("/units")).json()["units"] if u["id"] != units["unit_id"]
        ]
        assert unit_b["open_pairs"] == 0 and unit_b["config_version"] == 1


async def none(http: httpx.AsyncClient) -> bool:
    return not (await http.get("/connections")).json()["connections"]


def member(admin: Admin) -> Any:
    from wsgate.cluster.member import member_for

    found = member_for(admin.gateway)
    assert found is not None
    return found


async def test_redis_gone_data_plane_relays_management_writes_get_503(
    nursery: trio.Nursery, echo_url: str, own_redis: RedisServer
) -> None:
    timeout = 0.3
    a = await start_admin(
        nursery, parse_config(document(echo_url, own_redis.url, "echo", timeout=timeout))
    )
    async with a.client() as http, open_websocket_url(f"ws://127.0.0.1:{a.port}/echo") as ws:
        own_redis.kill()
        await ws.send_message("still here")
        assert await ws.get_message() == "still here"
        assert await status(a.port, "echo") == 101  # new pairs too, on the last config
        for _ in range(3):
            started = trio.current_time()
            put = await http.put("/apis/new", json={"path": "new", "service_url": echo_url})
            assert trio.current_time() - started < timeout + 0.1
            assert put.status_code == 503
            assert "Redis" in put.json()["errors"][0]["message"]
        listed = (await http.get("/connections")).json()
        assert len(listed["connections"]) == 1 and "Redis is unavailable" in listed["incomplete"]
        assert (await http.get("/units")).status_code == 503
        assert (await http.get("/apis")).status_code == 200  # reads of this unit's config
        await ws.send_message("and still")
        assert await ws.get_message() == "and still"


async def test_redis_paused_management_write_503_within_timeout(
    nursery: trio.Nursery, echo_url: str, own_redis: RedisServer
) -> None:
    timeout = 0.3
    a = await start_admin(
        nursery, parse_config(document(echo_url, own_redis.url, "echo", timeout=timeout))
    )
    async with a.client() as http:
        own_redis.pause()
        try:
            started = trio.current_time()
            put = await http.put("/apis/new", json={"path": "new", "service_url": echo_url})
            elapsed = trio.current_time() - started
        finally:
            own_redis.resume()
        assert put.status_code == 503
        assert elapsed < timeout + 0.1
        assert await status(a.port, "echo") == 101


# -- real processes ----------------------------------------------------------------------------


@attrs.define
class Unit:
    """A ``wsgate serve`` process with [admin] and [cluster]."""

    process: trio.Process
    lines: Lines
    port: int
    admin_port: int

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.admin_port}", headers=AUTH, timeout=10
        )

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.fail_after(20):
            await self.process.wait()
        assert self.process.stdout is not None
        await self.process.stdout.aclose()


def unit_file(
    path: Path, backend_url: str, redis_url: str, *apis: str, lease_ttl: float = 15
) -> Path:
    tables = "".join(
        f'\n[[apis]]\nname = "{n}"\npath = "{n}"\nservice_url = "{backend_url}"\n' for n in apis
    )
    path.write_text(
        f'[gateway]\nlisten = "127.0.0.1:{free_port()}"\n\n'
        f'[admin]\nlisten = "127.0.0.1:{free_port()}"\ntoken = "{TOKEN}"\n\n'
        f'[cluster]\nredis_url = "{redis_url}"\nlease_ttl = {lease_ttl}\n' + tables
    )
    return path


async def start_unit(path: Path, *args: str) -> Unit:
    command = [sys.executable, "-m", "wsgate", "serve", "--config", str(path), *args]
    process = await trio.lowlevel.open_process(command, stdout=-1)
    assert process.stdout is not None
    lines = Lines(process.stdout)
    try:
        with trio.fail_after(20):
            started = await lines.until(lambda r: r["event"] == "gateway_started")
            admin = await lines.until(lambda r: r["event"] == "admin_started")
    except BaseException:
        process.kill()
        raise
    port = int(started["addresses"][0].rsplit(":", 1)[1])
    return Unit(process, lines, port, int(admin["url"].rsplit(":", 1)[1]))


@pytest.mark.deadline(60)
async def test_a_restarted_unit_runs_the_current_config(
    echo_url: str, redis_url: str, tmp_path: Path
) -> None:
    path = unit_file(tmp_path / "a.toml", echo_url, redis_url, "echo")
    unit = await start_unit(path)
    try:
        async with unit.client() as http:
            put = await http.put("/apis/added", json={"path": "added", "service_url": echo_url})
            assert put.status_code == 201
        await unit.stop()
        unit = await start_unit(path)
        assert await status(unit.port, "added") == 101
        async with unit.client() as http:
            assert version(await http.get("/apis")) == version(put)
            units = (await http.get("/units")).json()["units"]
            assert len(units) == 1  # the stopped process left at once
    finally:
        await unit.stop(signal.SIGKILL)


@pytest.mark.deadline(60)
async def test_a_killed_units_pairs_leave_the_list_within_lease_ttl(
    nursery: trio.Nursery, echo_url: str, redis_url: str, tmp_path: Path
) -> None:
    lease_ttl = 2.0
    a = await start_admin(
        nursery, parse_config(document(echo_url, redis_url, "echo", lease_ttl=lease_ttl))
    )
    b = await start_unit(
        unit_file(tmp_path / "b.toml", echo_url, redis_url, "echo", lease_ttl=lease_ttl)
    )
    try:
        async with a.client() as http:
            client = await RawClient.connect(b.port, "/echo")
            assert client.response is not None and client.response.status == 101
            try:

                async def listed() -> bool:
                    return bool((await http.get("/connections")).json()["connections"])

                await poll(listed, 5)
                assert len((await http.get("/units")).json()["units"]) == 2
                b.process.kill()
                killed = trio.current_time()
                await poll(lambda: none(http), lease_ttl + 1.0)
                assert trio.current_time() - killed <= lease_ttl + 0.5
                assert len((await http.get("/units")).json()["units"]) == 1
            finally:
                await client.aclose()
    finally:
        await b.stop(signal.SIGKILL)


def test_workers_with_admin_without_cluster_refuse_naming_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsgate.cli import main

    path = tmp_path / "gw.toml"
    path.write_text(f'[admin]\ntoken = "{TOKEN}"\n')
    assert main(["serve", "--config", str(path), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "[admin] with --workers 2 needs a [cluster] table" in err and "--workers 1" in err


def attempts_total(text: str) -> float:
    """The sum of every wsgate_connection_attempts_total sample of an exposition."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("wsgate_connection_attempts_total{")
    )


@pytest.mark.deadline(90)
async def test_two_workers_serve_one_admin_port_and_metrics_for_the_machine(
    echo_url: str, redis_url: str, tmp_path: Path
) -> None:
    path = unit_file(tmp_path / "gw.toml", echo_url, redis_url, "echo")
    command = [sys.executable, "-m", "wsgate", "serve", "--config", str(path), "--workers", "2"]
    process = await trio.lowlevel.open_process(command, stdout=-1)
    assert process.stdout is not None
    lines = Lines(process.stdout)
    try:
        started = await lines.until(lambda r: r["event"] == "workers_started")
        port = int(started["address"].rsplit(":", 1)[1])
        admin_port = int(started["admin_address"].rsplit(":", 1)[1])
        for worker in (0, 1):
            await lines.until(
                lambda r, w=worker: r["event"] == "admin_started" and r.get("worker") == w
            )
            await lines.until(
                lambda r, w=worker: r["event"] == "gateway_started" and r.get("worker") == w
            )
        statuses = [await status(port, "echo") for _ in range(20)]
        assert statuses == [101] * 20
        await lines.until(lambda _: sum(r["event"] == "handshake" for r in lines.seen) >= 20)
        served = {r.get("worker") for r in lines.seen if r["event"] == "handshake"}
        assert served == {0, 1}, "SO_REUSEPORT spread the handshakes over both workers"
        base = f"http://127.0.0.1:{admin_port}"
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as http:
            scrapes = []
            for _ in range(10):
                # A new connection each time, so the kernel may pick either worker.
                async with httpx.AsyncClient(base_url=base, timeout=10) as fresh:
                    scrapes.append((await fresh.get("/metrics")).text)
            assert [attempts_total(text) for text in scrapes] == [20.0] * 10
            assert all(
                'wsgate_connection_attempts_total{api="echo",response_code="101"} 20.0' in text
                for text in scrapes
            )
            assert all("wsgate_connections_active{api=" in text for text in scrapes)
            # Any worker answers the management API the same way.
            put = await http.put("/apis/more", json={"path": "more", "service_url": echo_url})
            assert put.status_code == 201
            with trio.fail_after(5):
                while True:
                    versions = set()
                    for _ in range(6):
                        async with httpx.AsyncClient(base_url=base, headers=AUTH) as fresh:
                            versions.add(version(await fresh.get("/apis")))
                    if versions == {2}:
                        break
            assert [await status(port, "more") for _ in range(6)] == [101] * 6

            async def units_at_version_2() -> bool:
                units = (await http.get("/units")).json()["units"]
                assert len(units) == 2
                return {u["config_version"] for u in units} == {2}

            await poll(units_at_version_2, 5)  # as each worker last published itself

            async def both_at_version_2() -> bool:
                text = (await http.get("/metrics")).text
                return "wsgate_cluster_config_version 2.0" in text  # livemin: every worker

            await poll(both_at_version_2, 5)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            for record in lines.seen:  # workers run in sessions of their own
                if record["event"] == "worker_started":
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(record["pid"], signal.SIGKILL)
        await process.wait()
        await process.stdout.aclose()


async def test_if_match_on_patch_and_delete_and_without_cluster(
    nursery: trio.Nursery, echo_url: str, redis_url: str
) -> None:
    clustered = await start_admin(nursery, parse_config(document(echo_url, redis_url, "a", "b")))
    single = await start_admin(
        nursery,
        parse_config(
            {
                "gateway": {"listen": "127.0.0.1:0"},
                "apis": [{"name": "a", "path": "a", "service_url": echo_url}],
            }
        ),
    )
    for admin in (clustered, single):
        async with admin.client() as http:
            current = version(await http.get("/apis/a"))
            patched = await http.patch(
                "/apis/a", json={"idle_timeout": 30}, headers={"If-Match": f'"{current}"'}
            )
            assert patched.status_code == 200 and version(patched) == current + 1
            stale = await http.patch(
                "/apis/a", json={"idle_timeout": 40}, headers={"If-Match": f'W/"{current}"'}
            )
            assert stale.status_code == 409 and stale.json()["version"] == current + 1
            gone = await http.delete("/apis/a", headers={"If-Match": str(current)})
            assert gone.status_code == 409
            assert (await http.get("/apis/a")).json()["idle_timeout"] == 30
            deleted = await http.delete("/apis/a", headers={"If-Match": str(current + 1)})
            assert deleted.status_code == 200 and version(deleted) == current + 2
    async with single.client() as http:
        assert (await http.get("/units")).status_code == 404


async def test_single_process_metrics_show_the_cluster_gauges(
    nursery: trio.Nursery, echo_url: str, redis_url: str
) -> None:
    a, b = await two_units(nursery, document(echo_url, redis_url, "echo"))
    async with a.client() as http:
        put = await http.put("/apis/x", json={"path": "x", "service_url": echo_url})
        assert put.status_code == 201

        async def gauges() -> bool:
            text = (await http.get("/metrics")).text
            return "wsgate_cluster_config_version 2.0" in text and "wsgate_cluster_units " in text

        await poll(gauges, 5)
    async with b.client() as http:
        text = (await http.get("/metrics")).text
        assert "wsgate_cluster_config_version 2.0" in text
        [units] = [line for line in text.splitlines() if line.startswith("wsgate_cluster_units ")]
        assert float(units.split()[1]) in (1.0, 2.0)  # as last listed: 2 once both published


SILENT_WRITE = """
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'document', ARGV[2])
return 1
"""


async def test_a_unit_that_missed_the_announcement_catches_up_by_polling(
    nursery: trio.Nursery, echo_url: str, redis_url: str
) -> None:
    from wsgate.cluster.configdoc import POLL_INTERVAL
    from wsgate.cluster.redis import RedisClient
    from wsgate.cluster.settings import ClusterConfig

    a = await start_admin(nursery, parse_config(document(echo_url, redis_url, "echo")))
    client = await nursery.start(RedisClient(ClusterConfig(redis_url=redis_url, timeout=5)).run)
    tables = {
        "apis": [{"name": "quiet", "path": "quiet", "service_url": echo_url}],
        "products": [],
        "subscriptions": [],
    }
    # Stored without a pub/sub announcement, as if this unit had missed it.
    await client.script(SILENT_WRITE, ["wsgate:config"], [7, json.dumps(tables)])
    with trio.fail_after(POLL_INTERVAL + 2):
        while await status(a.port, "quiet") != 101:  # noqa: ASYNC110
            await trio.sleep(0.1)
    assert await status(a.port, "echo") == 404
    assert member(a).manager.version == 7


async def test_redis_restarted_empty_gets_the_running_document_back(
    nursery: trio.Nursery, echo_url: str, own_redis: RedisServer
) -> None:
    from wsgate.cluster.configdoc import POLL_INTERVAL

    a = await start_admin(
        nursery, parse_config(document(echo_url, own_redis.url, "echo", timeout=0.5))
    )
    async with a.client() as http:
        assert (
            await http.put("/apis/kept", json={"path": "kept", "service_url": echo_url})
        ).status_code == 201
    own_redis.kill()
    own_redis.start()  # empty: it keeps nothing on disk

    async def reseeded() -> bool:
        return own_redis.call("HGET", "wsgate:config", "version").startswith(b"$1\r\n2")

    await poll(reseeded, POLL_INTERVAL + 3)
    # A unit starting now runs that document, not its own file.
    b = await start_admin(
        nursery, parse_config(document(echo_url, own_redis.url, "other", timeout=0.5))
    )
    assert await status(b.port, "kept") == 101
    assert await status(b.port, "other") == 404


async def test_a_unit_started_while_redis_is_down_serves_its_file_then_joins(
    nursery: trio.Nursery, echo_url: str, own_redis: RedisServer
) -> None:
    from wsgate.cluster.configdoc import POLL_INTERVAL

    own_redis.kill()
    a = await start_admin(
        nursery, parse_config(document(echo_url, own_redis.url, "echo", timeout=0.3))
    )
    assert await status(a.port, "echo") == 101  # its file, while Redis is gone
    async with a.client() as http:
        put = await http.put("/apis/later", json={"path": "later", "service_url": echo_url})
        assert put.status_code == 503
        own_redis.start()

        async def joined() -> bool:
            return own_redis.call("HGET", "wsgate:config", "version").startswith(b"$1\r\n1")

        await poll(joined, POLL_INTERVAL + 3)  # it seeded the empty Redis with its file
        put = await http.put("/apis/later", json={"path": "later", "service_url": echo_url})
        assert put.status_code == 201 and version(put) == 2


async def test_reload_under_cluster_rereads_the_file_and_keeps_the_shared_document(
    nursery: trio.Nursery, echo_url: str, redis_url: str, tmp_path: Path
) -> None:
    """POST /reload re-reads [gateway] and the rest; APIs, products, subscriptions stay shared."""
    from wsgate import load_config

    from .test_admin_harness import write_config

    cluster = f'\n[cluster]\nredis_url = "{redis_url}"\ntimeout = 5.0\n'
    path = write_config(tmp_path / "gw.toml", echo_url, "echo", extra=cluster)
    a = await start_admin(nursery, load_config(path))
    b = await start_admin(nursery, load_config(path))
    async with a.client() as http:
        put = await http.put("/apis/fresh", json={"path": "fresh", "service_url": echo_url})
        assert put.status_code == 201
        # The file now names another API and a smaller connection limit.
        write_config(path, echo_url, "echo", "fromfile", extra=cluster)
        text = path.read_text().replace(
            'listen = "127.0.0.1:0"\n', 'listen = "127.0.0.1:0"\nmax_connections = 7\n', 1
        )
        path.write_text(text)
        reloaded = await http.post("/reload")
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["apis"] == ["echo", "fresh"]
        listed = await http.get("/apis")
        assert version(listed) == version(put)  # a reload is no management change
    assert a.gateway.config.gateway.max_connections == 7
    assert b.gateway.config.gateway.max_connections == 200  # b's file was not re-read
    assert await status(a.port, "fresh") == 101
    assert await status(a.port, "fromfile") == 404
    assert await status(b.port, "fresh") == 101

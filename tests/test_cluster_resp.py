"""The lean RESP connection the cluster's scripts use, against a real redis-server."""

from __future__ import annotations

import pytest
import trio

from wsgate.cluster.redis import RedisClient
from wsgate.cluster.resp import RedisReplyError, RespConnection, encode
from wsgate.cluster.settings import ClusterConfig
from wsgate.errors import ClusterUnavailable

from .redis_server import RedisServer, command


def test_commands_are_resp_arrays_of_bulk_strings() -> None:
    assert encode(("EVALSHA", "ab", 1, "k", "é")) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n"
    )


async def test_replies_of_every_type_and_error_replies(redis_url: str) -> None:
    conn = await RespConnection.open(redis_url)
    try:
        assert await conn.call("SET", "k", "v" * 100_000) == "OK"
        assert await conn.call("GET", "k") == "v" * 100_000  # read in several chunks
        assert await conn.call("INCR", "n") == 1
        assert await conn.call("GET", "missing") is None
        assert await conn.call("EVAL", "return {1, 'a', {2}}", 0) == [1, "a", [2]]
        with pytest.raises(RedisReplyError, match="NOSCRIPT"):
            await conn.call("EVALSHA", "0" * 40, 0)
        assert await conn.call("PING") == "PONG"  # an error reply leaves it usable
    finally:
        await conn.aclose()


async def test_password_user_and_database_from_the_url(own_redis: RedisServer) -> None:
    assert command(own_redis.port, "ACL", "SETUSER", "gw", "on", ">s3cret", "~*", "+@all")
    assert command(own_redis.port, "CONFIG", "SET", "requirepass", "top").startswith(b"+OK")
    base = f"127.0.0.1:{own_redis.port}"
    conn = await RespConnection.open(f"redis://gw:s3cret@{base}/3")
    try:
        await conn.call("SET", "where", "db3")
    finally:
        await conn.aclose()
    conn = await RespConnection.open(f"redis://:top@{base}/0?db=3")
    try:
        assert await conn.call("GET", "where") == "db3"
    finally:
        await conn.aclose()
    with pytest.raises(RedisReplyError):
        await RespConnection.open(f"redis://:wrong@{base}/0")


async def test_a_wrong_password_is_cluster_unavailable_not_a_crash(
    nursery: trio.Nursery, own_redis: RedisServer
) -> None:
    assert command(own_redis.port, "CONFIG", "SET", "requirepass", "top").startswith(b"+OK")
    config = ClusterConfig(redis_url=f"redis://:wrong@127.0.0.1:{own_redis.port}/0", timeout=2.0)
    client = await nursery.start(RedisClient(config).run)
    with pytest.raises(ClusterUnavailable):
        await client.script("return 1", [], [])
    assert client.errors == 1 and not client.available

"""Shared fixtures. Every async test runs under a trio.fail_after guard."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import structlog.testing
import trio
from hypothesis import HealthCheck, settings

from wsgate.echo import serve_echo

from . import helpers
from .redis_server import RedisServer

# Hypothesis's timing checks (a per-example deadline, "input generation is slow")
# fail on a busy 2-core machine without any defect: speed lives in benchmarks.
settings.register_profile("wsgate", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("wsgate")

#: Seconds an async test may take unless marked ``@pytest.mark.deadline(N)``.
DEFAULT_DEADLINE = 30.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "deadline(seconds): fail the test after this long")
    # Every record of the suite passes the secret scan, captured ones included.
    capture = structlog.testing.LogCapture.__call__

    def scan_and_capture(self: Any, logger: Any, name: str, event: Any) -> Any:
        helpers.scan_record(event)
        return capture(self, logger, name, event)

    structlog.testing.LogCapture.__call__ = scan_and_capture  # type: ignore[method-assign]


def _scan(_logger: Any, _name: str, event: Any) -> Any:
    helpers.scan_record(event)
    return event


@pytest.fixture(autouse=True)
def _scan_every_log_record() -> None:
    """(Re)install the scan: a test may have configured structlog (the CLI does)."""
    # All of it: the CLI's logger factory (bound to that test's captured stdout) and
    # its cache_logger_on_first_use would otherwise outlive the test that ran main().
    structlog.reset_defaults()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _scan,
            structlog.dev.ConsoleRenderer(colors=False),
        ]
    )


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_call(item: pytest.Function) -> Iterator[None]:
    test = item.obj
    if inspect.iscoroutinefunction(test):
        marker = item.get_closest_marker("deadline")
        limit = marker.args[0] if marker else DEFAULT_DEADLINE

        @functools.wraps(test)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            with trio.fail_after(limit):
                return await test(*args, **kwargs)

        item.obj = guarded
    yield


@pytest.fixture(params=["tasks", "reactor"])
def relay_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per relay engine (tests use it via ``pytestmark``)."""
    monkeypatch.setattr(helpers, "RELAY_ENGINE", request.param)
    return str(request.param)


@pytest.fixture
async def echo_url(nursery: trio.Nursery) -> str:
    """A trio-websocket echo backend on 127.0.0.1 (any path)."""
    port = await nursery.start(serve_echo, "127.0.0.1", 0)
    return f"ws://127.0.0.1:{port}/echo"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session (see tests/redis_server.py)."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that stop, pause or restart it."""
    server = RedisServer()
    server.start()
    yield server
    server.close()

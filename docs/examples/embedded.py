"""Embed wsgate in a Trio program: an echo backend, a gateway in front of it, one client.

Run it with ``.venv/bin/python docs/examples/embedded.py``; it exits 0 when done.
docs/embedding.md walks through it, and tests/test_embedding.py runs it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
import trio
from trio_websocket import open_websocket_url

import wsgate
from wsgate.echo import serve_echo
from wsgate.logs import utc_now


def add_timestamp(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    # The handshake and disconnect records carry their own "timestamp"; keep it.
    event.setdefault("timestamp", utc_now())
    return event


def configure_logging() -> None:
    """wsgate only logs; the application decides where records go (here: JSON on stderr)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            add_timestamp,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


async def main() -> None:
    configure_logging()
    async with trio.open_nursery() as nursery:
        # A backend to front: trio-websocket echo server on any free port.
        echo_port = await nursery.start(serve_echo, "127.0.0.1", 0)

        # The same document a TOML file would hold, validated the same way.
        config = wsgate.parse_config(
            {
                "gateway": {"listen": "127.0.0.1:0", "drain_timeout": 5},
                "apis": [
                    {
                        "name": "echo",
                        "path": "echo",
                        "service_url": f"ws://127.0.0.1:{echo_port}/echo",
                    }
                ],
            }
        )

        # run() binds, then hands back the gateway: its url has the real port.
        gateway: wsgate.Gateway = await nursery.start(wsgate.Gateway(config).run)
        print(f"gateway listening on {gateway.url}")

        async with open_websocket_url(f"{gateway.url}/echo") as ws:
            await ws.send_message("hello through wsgate")
            reply = await ws.get_message()
            assert isinstance(reply, str)  # text in, text out
            print(f"echo: {reply}")
            print(f"stats: {gateway.stats()}")

        # Stop accepting, close any pair left with 1001, and wait for run() to return.
        await gateway.drain()
        print(f"drained: {gateway.stats()}")
        nursery.cancel_scope.cancel()  # stops the echo backend


if __name__ == "__main__":
    trio.run(main)

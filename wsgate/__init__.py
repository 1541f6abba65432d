"""wsgate: a WebSocket API gateway on Trio.

The embedding API in one screen (docs/embedding.md has a complete program)::

    import trio, wsgate

    async def main():
        config = wsgate.load_config("gateway.toml")
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(wsgate.Gateway(config).run)
            print("serving on", gateway.url)
            ...
            await gateway.drain()
"""

from .config import (
    ApiConfig,
    BackendURL,
    Config,
    GatewayConfig,
    Listen,
    TLSConfig,
    load_config,
    parse_config,
)
from .errors import (
    BackendError,
    ConfigError,
    HandshakeRejected,
    MessageTooBig,
    ProtocolError,
    WsgateError,
)
from .gateway import Gateway, GatewayStats, Observer
from .policy import HandshakeContext, Policy

__version__ = "0.1.0"

__all__ = [
    "ApiConfig",
    "BackendError",
    "BackendURL",
    "Config",
    "ConfigError",
    "Gateway",
    "GatewayConfig",
    "GatewayStats",
    "HandshakeContext",
    "HandshakeRejected",
    "Listen",
    "MessageTooBig",
    "Observer",
    "Policy",
    "ProtocolError",
    "TLSConfig",
    "WsgateError",
    "load_config",
    "parse_config",
]

"""`python -m runplane_gateway`: settings, the bus, the gateway, its HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
import uvicorn

from runplane_bus import Bus
from runplane_service import logs
from runplane_service.env import bus_settings
from runplane_service.lifecycle import run_service, serve_http
from runplane_gateway.app import Gateway
from runplane_gateway.settings import load_settings

log = structlog.get_logger("runplane.gateway")

# How long requests in flight (a /runsync wait, a webhook) may take to finish at shutdown.
SHUTDOWN_GRACE_S = 10.0


async def serve(stack: contextlib.AsyncExitStack, stop: asyncio.Event) -> None:
    settings = load_settings()
    if settings.api_key_generated:
        log.warning("RP_API_KEY is not set: generated an admin API key for this run",
                    api_key=settings.api_key)
    bus = await Bus.connect(bus_settings("gateway"))
    stack.push_async_callback(bus.close)
    gateway = await Gateway.start(bus, settings)
    stack.push_async_callback(gateway.stop)
    server = await serve_http(gateway.app, settings.http_host, settings.http_port, stop)
    log.info("listening", url=f"http://{settings.http_host}:{settings.http_port}")
    await stop.wait()
    await _drained(server)


async def _drained(server: uvicorn.Server) -> None:
    """Wait (bounded) until uvicorn has closed its connections, so no request loses the bus."""
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    await asyncio.sleep(0)
    while time.monotonic() < deadline and (server.server_state.connections or server.server_state.tasks):
        await asyncio.sleep(0.05)


def main() -> None:
    logs.configure("gateway")
    run_service("gateway", serve)


if __name__ == "__main__":
    main()

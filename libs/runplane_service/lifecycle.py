"""`run_service`: uvloop, signals, an exit stack, an optional HTTP server, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import uvicorn
import uvloop

from runplane_service.http_protocol import HttpProtocol

log = structlog.get_logger("runplane.service")

Main = Callable[[contextlib.AsyncExitStack, asyncio.Event], Awaitable[None]]


async def serve_http(app: Any, host: str, port: int, stop: asyncio.Event) -> uvicorn.Server:
    """Start uvicorn inside the current loop; returns once it listens. It stops when `stop` is set."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off", loop="none", http=HttpProtocol, timeout_keep_alive=120,
                            proxy_headers=False, server_header=False, date_header=False)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"HTTP server on {host}:{port} did not start")
        await asyncio.sleep(0.01)

    async def stop_when_asked() -> None:
        await stop.wait()
        server.should_exit = True
        await task

    asyncio.ensure_future(stop_when_asked())
    return server


def bound_port(server: uvicorn.Server) -> int:
    for s in server.servers:
        for sock in s.sockets:
            return sock.getsockname()[1]
    raise RuntimeError("server has no socket")


def run_service(name: str, main: Main) -> None:
    """Run `main(stack, stop)` until SIGINT/SIGTERM; `main` returns when `stop` is set or fails."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with contextlib.AsyncExitStack() as stack:
            log.info("starting", service=name)
            await main(stack, stop)
            log.info("stopping", service=name)
        log.info("stopped", service=name)

    uvloop.run(runner())

"""`python -m runplane_autoscaler`: connect, serve /metrics and /healthz, run the loop."""

from __future__ import annotations

import asyncio
import contextlib

from runplane_autoscaler.loop import Autoscaler
from runplane_autoscaler.settings import load_settings
from runplane_bus import Bus
from runplane_service import logs
from runplane_service.env import bus_settings
from runplane_service.lifecycle import bound_port, run_service, serve_http
from runplane_service.metrics import metrics_app


def main() -> None:
    settings = load_settings()
    log = logs.configure("autoscaler")

    async def service(stack: contextlib.AsyncExitStack, stop: asyncio.Event) -> None:
        bus = await Bus.connect(bus_settings("autoscaler"))
        stack.push_async_callback(bus.close)
        server = await serve_http(metrics_app(), settings.metrics_host, settings.metrics_port, stop)
        log.info("metrics listening", url=f"http://{settings.metrics_host}:{bound_port(server)}/metrics")
        await Autoscaler(bus, settings).run(stop)

    run_service("autoscaler", service)


if __name__ == "__main__":
    main()

"""`python -m runplane_autoscaler`: connect, serve /metrics and /healthz, run the loop."""

from __future__ import annotations

import asyncio
import contextlib

from runplane_autoscaler.loop import Autoscaler
from runplane_autoscaler.settings import load_settings
from runplane_bus import Bus
from runplane_bus.leases import open_lease
from runplane_service import logs
from runplane_service.env import bus_settings
from runplane_service.lifecycle import run_service
from runplane_service.metrics import serve_metrics


def main() -> None:
    settings = load_settings()
    logs.configure("autoscaler")

    async def service(stack: contextlib.AsyncExitStack, stop: asyncio.Event) -> None:
        bus = await Bus.connect(bus_settings("autoscaler"))
        stack.push_async_callback(bus.close)
        lease = open_lease(bus, "autoscaler")
        stack.push_async_callback(lease.release)
        await serve_metrics(settings.metrics_host, settings.metrics_port, stop)
        await Autoscaler(bus, settings, lease=lease).run(stop)

    run_service("autoscaler", service)


if __name__ == "__main__":
    main()

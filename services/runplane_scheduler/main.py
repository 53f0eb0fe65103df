"""`python -m runplane_scheduler`: connect, serve /metrics and /healthz, run placement and the janitor."""

from __future__ import annotations

import asyncio
import contextlib

from runplane_bus import Bus
from runplane_bus.leases import open_lease
from runplane_scheduler.janitor import Janitor
from runplane_scheduler.janitor_rules import Retention
from runplane_scheduler.loop import Scheduler
from runplane_scheduler.settings import load_settings
from runplane_service import logs
from runplane_service.env import bus_settings
from runplane_service.lifecycle import run_service
from runplane_service.metrics import serve_metrics


def main() -> None:
    settings = load_settings()
    logs.configure("scheduler")

    async def service(stack: contextlib.AsyncExitStack, stop: asyncio.Event) -> None:
        bus = await Bus.connect(bus_settings("scheduler"))
        stack.push_async_callback(bus.close)
        lease = open_lease(bus, "scheduler")
        stack.push_async_callback(lease.release)
        await serve_metrics(settings.metrics_host, settings.metrics_port, stop)
        retention = Retention(result_ms=int(settings.result_retention_s * 1000),
                              sync_result_ms=int(settings.sync_result_retention_s * 1000))
        await asyncio.gather(
            Scheduler(bus, settings, lease=lease).run(stop),
            Janitor(bus, retention, interval_s=settings.janitor_interval_s,
                    is_leader=lambda: lease.leading).run(stop),
        )

    run_service("scheduler", service)


if __name__ == "__main__":
    main()

"""Node agent wiring: `python -m runplane_node_agent`."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass

import structlog
import uvicorn
from msgspec.structs import replace
from prometheus_client import REGISTRY
from runplane_bus import Bus
from runplane_proto import subjects as s
from runplane_proto.endpoints import EndpointSpec
from runplane_service import logs
from runplane_service.clock import Clock
from runplane_service.env import SettingsError, bus_settings
from runplane_service.lifecycle import bound_port, run_service, serve_http
from runplane_service.metrics import METRICS_ROUTES
from starlette.applications import Starlette

from runplane_node_agent import metrics, runtimes, worker_api
from runplane_node_agent.commands import Commands
from runplane_node_agent.flash.boot import FlashBoot
from runplane_node_agent.inventory.host import GpuInventory, HostInventory
from runplane_node_agent.jobs import Jobs
from runplane_node_agent.node_metrics import NodeCollector
from runplane_node_agent.node_status import StatusPublisher
from runplane_node_agent.settings import ANY_HOST, AgentSettings, from_env
from runplane_node_agent.supervisor import Supervisor
from runplane_node_agent.worker_api import WorkerApi
from runplane_node_agent.worker_logs import WorkerLogs

log = structlog.get_logger("runplane.node_agent")

_TICK_S = 0.1
_SWEEP_S = 60.0


@dataclass
class NodeAgent:
    settings: AgentSettings
    bus: Bus
    supervisor: Supervisor
    jobs: Jobs
    status: StatusPublisher
    server: uvicorn.Server
    http_stop: asyncio.Event
    url: str
    status_task: asyncio.Task
    housekeeping_task: asyncio.Task
    # Also serving the worker API where the runtime's workers are (a container bridge).
    worker_server: uvicorn.Server | None = None

    async def shutdown(self) -> None:
        """Stop taking work, let held jobs finish within the grace period, give the rest
        back, stop the workers, leave."""
        log.info("draining", node_id=self.settings.node_id, held=len(self.jobs.held))
        self.status.draining = True
        self.status.changed()
        self.jobs.begin_drain()
        await self.jobs.drain(self.settings.shutdown_grace_s)
        await self.supervisor.stop_all()
        self.status.close()
        self.housekeeping_task.cancel()
        await asyncio.gather(self.status_task, self.housekeeping_task, return_exceptions=True)
        await self.status.remove()
        self.http_stop.set()
        deadline = time.monotonic() + 5
        servers = [self.server] if self.worker_server is None else [self.server, self.worker_server]
        while time.monotonic() < deadline and any(_serving(server) for server in servers):
            await asyncio.sleep(0.02)


def _serving(server: uvicorn.Server) -> bool:
    return any(s.is_serving() for s in server.servers) or bool(server.server_state.tasks)


async def start_agent(settings: AgentSettings, stack: contextlib.AsyncExitStack, *,
                      gpus: GpuInventory | None = None, clock: Clock | None = None) -> NodeAgent:
    """Connect, start serving workers and commands; `shutdown()` undoes it."""
    clock = clock or Clock()
    bus = await Bus.connect(replace(bus_settings("node-agent"), url=settings.nats_url))
    stack.push_async_callback(bus.close)
    runtime = await runtimes.open_runtime(settings)
    stack.push_async_callback(runtime.close)
    inventory = HostInventory(gpus)
    stack.callback(inventory.close)

    flash = FlashBoot(runtime, settings, inventory.host.memory_total_mb, on_change=lambda: status.changed())
    supervisor = Supervisor(runtime, settings, clock, on_change=lambda: status.changed(),
                            gpu_names=lambda uuids: status.gpu_names(uuids),
                            base_env=None if runtime.inherits_host_env else {}, flash=flash)
    status = StatusPublisher(bus, settings, inventory, runtime, supervisor, clock)
    await status.read_gpus()
    jobs = Jobs(bus, settings, clock, supervisor, on_change=status.changed)
    supervisor.release_jobs = jobs.release_worker
    worker_logs = WorkerLogs(settings.node_id, clock)
    supervisor.worker_output = worker_logs.record
    collector = NodeCollector(settings.node_id, status, supervisor)
    REGISTRY.register(collector)
    stack.callback(REGISTRY.unregister, collector)

    app = Starlette(routes=WorkerApi(supervisor, jobs).routes() + list(METRICS_ROUTES),
                    exception_handlers=worker_api.EXCEPTION_HANDLERS)
    app.router.redirect_slashes = False  # worker URLs never end in "/": a 404, not a redirect
    http_stop = asyncio.Event()
    server = await serve_http(app, settings.host, settings.port, http_stop)
    port = bound_port(server)
    worker_server = None
    if runtime.worker_host and settings.host not in ANY_HOST:  # also where the workers are
        worker_server = await serve_http(app, runtime.worker_host, port, http_stop)
    supervisor.base_url = settings.worker_base_url(port, runtime.worker_host)
    await supervisor.adopt(lambda endpoint_id: _endpoint_spec(bus, endpoint_id))

    await Commands(bus, settings.node_id, supervisor, jobs).subscribe()
    await worker_logs.serve(bus)
    await status.write()  # visible to the scheduler before the first heartbeat
    status_task = asyncio.ensure_future(status.run())
    housekeeping_task = asyncio.ensure_future(_housekeeping(jobs, supervisor, bus, settings))
    log.info("node agent ready", node_id=settings.node_id, url=supervisor.base_url, runtime=runtime.name,
             gpus=len(status.gpus.gpus), park_memory_mb=flash.budget_mb)
    return NodeAgent(settings, bus, supervisor, jobs, status, server, http_stop, supervisor.base_url,
                     status_task, housekeeping_task, worker_server)


async def _endpoint_spec(bus: Bus, endpoint_id: str) -> EndpointSpec | None:
    entry = await bus.endpoints.get(s.endpoint_key(endpoint_id))
    return entry.value if entry is not None else None


async def _housekeeping(jobs: Jobs, supervisor: Supervisor, bus: Bus, settings: AgentSettings) -> None:
    """Timeouts, keep-alives, stop grace periods, silent workers, unused pulls, snapshots of
    deleted endpoints. Never dies."""
    swept_at = collected_at = time.monotonic()
    while True:
        now = time.monotonic()
        try:
            jobs.stops.tick(now)
            supervisor.tick(now)
            if now - swept_at > _SWEEP_S:
                swept_at = now
                await jobs.forget_idle_endpoints()
            if now - collected_at > settings.snapshot_gc_s:
                collected_at = now
                await supervisor.flash.collect_snapshots(set(await bus.endpoints.keys()))
        except Exception as exc:
            metrics.LOOP_ERRORS.labels(loop="housekeeping").inc()
            log.error("housekeeping failed", error=repr(exc))
        await asyncio.sleep(_TICK_S)


def main() -> None:
    logs.configure("node-agent")
    try:
        settings = from_env()
    except SettingsError as exc:
        print(f"node agent: {exc}", file=sys.stderr)
        sys.exit(2)
    structlog.contextvars.bind_contextvars(node_id=settings.node_id)

    async def service(stack: contextlib.AsyncExitStack, stop: asyncio.Event) -> None:
        agent = await start_agent(settings, stack)
        await stop.wait()
        await agent.shutdown()

    run_service("node-agent", service)


if __name__ == "__main__":
    main()

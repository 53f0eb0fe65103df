"""NodeStatus in KV `rp-nodes`: written every RP_HEARTBEAT_S and soon after a change."""

from __future__ import annotations

import asyncio
import time

import structlog
from runplane_bus import Bus
from runplane_proto import subjects as s
from runplane_proto.nodes import NodeStatus
from runplane_service.clock import Clock

from runplane_node_agent import metrics
from runplane_node_agent.inventory.host import HostInventory, read_usage
from runplane_node_agent.inventory.nvml import GpuSnapshot
from runplane_node_agent.runtimes.base import Capability, Runtime
from runplane_node_agent.settings import AgentSettings
from runplane_node_agent.supervisor import Supervisor

log = structlog.get_logger("runplane.node_agent.status")

# Changes (a worker going idle/running) are coalesced: at most one write per this interval.
_MIN_WRITE_INTERVAL_S = 0.1


class StatusPublisher:
    def __init__(self, bus: Bus, settings: AgentSettings, inventory: HostInventory, runtime: Runtime,
                 supervisor: Supervisor, clock: Clock) -> None:
        self.bus = bus
        self.settings = settings
        self.inventory = inventory
        self.runtime = runtime
        self.supervisor = supervisor
        self.clock = clock
        self.started_at_ms = clock.now_ms()
        self.draining = False
        self.gpus = GpuSnapshot()
        self._gpus_read_at = 0.0
        self._changed = asyncio.Event()
        self._layout: tuple[list, list] | None = None
        self._layout_version = 0
        self._closed = False

    def changed(self) -> None:
        self._changed.set()

    async def read_gpus(self) -> GpuSnapshot:
        self.gpus = await asyncio.to_thread(self.inventory.read_gpus)
        self._gpus_read_at = time.monotonic()
        return self.gpus

    def gpu_names(self, uuids: tuple[str, ...]) -> list[str] | None:
        """Names of these GPUs of this node, None if one is unknown."""
        by_uuid = {g.uuid: g.name for g in self.gpus.gpus}
        if any(u not in by_uuid for u in uuids):
            return None
        return [by_uuid[u] for u in uuids]

    def snapshot(self) -> NodeStatus:
        host = self.inventory.host
        usage = read_usage(self.settings.disk_path)
        capabilities = sorted(c.value for c in self.runtime.capabilities
                              if c is not Capability.GPU or self.gpus.gpus)
        workers = [w.info() for w in self.supervisor.workers.values()]
        counts: dict[str, int] = {"starting": 0, "idle": 0, "running": 0, "stopping": 0, "parked": 0}
        for w in workers:
            counts[w.state] += 1
        for state, n in counts.items():
            metrics.WORKERS.labels(state=state).set(n)
        layout = (workers, [(g.index, g.uuid, g.name) for g in self.gpus.gpus])
        if layout != self._layout:
            self._layout, self._layout_version = layout, self._layout_version + 1
        return NodeStatus(
            node_id=self.settings.node_id, hostname=host.hostname, runtime=self.runtime.name,
            capabilities=capabilities, cpu_count=host.cpu_count, memory_total_mb=host.memory_total_mb,
            gpus=list(self.gpus.gpus), driver_version=self.gpus.driver_version,
            cuda_version=self.gpus.cuda_version, workers=workers, started_at_ms=self.started_at_ms,
            heartbeat_at_ms=self.clock.now_ms(), draining=self.draining,
            memory_available_mb=usage.memory_available_mb, disk_total_mb=usage.disk_total_mb,
            disk_free_mb=usage.disk_free_mb,
            park_budget_mb=self.supervisor.flash.budget_for_status(),
            parked_mb=self.supervisor.flash.parked_mb(), layout_version=self._layout_version,
        )

    async def write(self) -> None:
        await self.bus.nodes.put(s.node_key(self.settings.node_id), self.snapshot())
        metrics.STATUS_WRITES.inc()

    def close(self) -> None:
        """End `run()` (a flag, not a cancel: wait_for in 3.11 can swallow a cancellation)."""
        self._closed = True
        self._changed.set()

    async def run(self) -> None:
        """Write on every heartbeat and shortly after changes until closed. Never dies."""
        while not self._closed:
            try:
                if time.monotonic() - self._gpus_read_at >= self.settings.heartbeat_s and self.gpus.gpus:
                    await self.read_gpus()
                self._changed.clear()
                await self.write()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.LOOP_ERRORS.labels(loop="status").inc()
                log.warning("writing node status failed", error=repr(exc))
            if self._closed:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), self.settings.heartbeat_s)
                await asyncio.sleep(_MIN_WRITE_INTERVAL_S)
            except TimeoutError:
                pass

    async def remove(self) -> None:
        """A cleanly stopped node leaves no status behind (the scheduler need not wait for loss)."""
        try:
            await self.bus.nodes.delete(s.node_key(self.settings.node_id))
        except Exception as exc:
            log.warning("removing node status failed", error=repr(exc))

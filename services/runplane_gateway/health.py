"""The workers half of /health: counted from the node agents' status in KV `rp-nodes`, and
the scheduler's word on workers no node can take (KV `rp-placement`)."""

from __future__ import annotations

from runplane_bus import Bus
from runplane_gateway.wire import PlacementView, WorkerCounts
from runplane_proto import subjects


async def worker_counts(
    bus: Bus, endpoint_id: str, *, now_ms: int, node_loss_timeout_s: float,
) -> WorkerCounts:
    counts = WorkerCounts()
    lost_before_ms = now_ms - int(node_loss_timeout_s * 1000)
    async for _, node in bus.nodes.items():
        if node.heartbeat_at_ms and node.heartbeat_at_ms < lost_before_ms:
            continue  # a lost node's workers are gone (or about to be)
        for worker in node.workers:
            if worker.endpoint_id != endpoint_id:
                continue
            if worker.state == "idle":
                counts.idle += 1
            elif worker.state == "running":
                counts.running += 1
            elif worker.state == "starting":
                counts.initializing += 1
    return counts


async def pending_placement(bus: Bus, endpoint_id: str) -> PlacementView | None:
    entry = await bus.placement.get(subjects.placement_key(endpoint_id))
    if entry is None or entry.value.pending_workers <= 0:
        return None
    status = entry.value
    return PlacementView(pendingWorkers=status.pending_workers, reason=status.reason, sinceMs=status.since_ms)

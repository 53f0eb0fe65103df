"""The workers half of /health: counted from the node agents' status in KV `rp-nodes`."""

from __future__ import annotations

from runplane_bus import Bus
from runplane_gateway.wire import WorkerCounts


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

"""What the fleet looks like, from the node agents' status in KV `rp-nodes`: nodes with their
GPUs (free, or which worker holds them) and the workers of an endpoint with their state."""

from __future__ import annotations

from runplane_bus import Bus
from runplane_proto.nodes import NodeStatus, WorkerInfo
from runplane_gateway.wire import GpuView, NodeView, WorkerView

# The bus's "starting" is RunPod's "initializing".
_STATE_NAMES = {"starting": "initializing"}


def is_lost(node: NodeStatus, *, now_ms: int, node_loss_timeout_s: float) -> bool:
    return bool(node.heartbeat_at_ms) and node.heartbeat_at_ms < now_ms - int(node_loss_timeout_s * 1000)


def worker_view(node: NodeStatus, worker: WorkerInfo) -> WorkerView:
    names = {gpu.uuid: gpu.name for gpu in node.gpus}
    return WorkerView(
        id=worker.worker_id, endpointId=worker.endpoint_id, nodeId=node.node_id,
        state=_STATE_NAMES.get(worker.state, worker.state), startedAtMs=worker.started_at_ms,
        idleSinceMs=worker.idle_since_ms, jobs=list(worker.jobs), gpuUuids=list(worker.gpu_uuids),
        gpuNames=[names.get(uuid, uuid) for uuid in worker.gpu_uuids],
    )


def node_view(node: NodeStatus, *, lost: bool) -> NodeView:
    holder = {uuid: worker for worker in node.workers for uuid in worker.gpu_uuids}
    gpus = []
    for gpu in node.gpus:
        worker = holder.get(gpu.uuid)
        gpus.append(GpuView(
            index=gpu.index, uuid=gpu.uuid, name=gpu.name, memoryTotalMb=gpu.memory_total_mb,
            memoryUsedMb=gpu.memory_used_mb, utilizationPct=gpu.utilization_pct,
            workerId=worker.worker_id if worker else None, endpointId=worker.endpoint_id if worker else None,
        ))
    used = sum(1 for gpu in gpus if gpu.workerId is not None)
    return NodeView(
        id=node.node_id, hostname=node.hostname, runtime=node.runtime, capabilities=list(node.capabilities),
        cpuCount=node.cpu_count, memoryTotalMb=node.memory_total_mb, driverVersion=node.driver_version,
        cudaVersion=node.cuda_version, gpus=gpus, gpusFree=len(gpus) - used, gpusUsed=used,
        workers=[worker_view(node, w) for w in node.workers], startedAtMs=node.started_at_ms,
        heartbeatAtMs=node.heartbeat_at_ms, draining=node.draining, lost=lost,
    )


async def nodes(bus: Bus, *, now_ms: int, node_loss_timeout_s: float) -> list[NodeView]:
    found = [node_view(node, lost=is_lost(node, now_ms=now_ms, node_loss_timeout_s=node_loss_timeout_s))
             async for _, node in bus.nodes.items()]
    found.sort(key=lambda n: n.id)
    return found


async def live_nodes(bus: Bus, *, now_ms: int, node_loss_timeout_s: float) -> list[NodeStatus]:
    return [node async for _, node in bus.nodes.items()
            if not is_lost(node, now_ms=now_ms, node_loss_timeout_s=node_loss_timeout_s)]


async def workers(bus: Bus, endpoint_id: str, *, now_ms: int, node_loss_timeout_s: float) -> list[WorkerView]:
    """The endpoint's workers on live nodes (parked ones too: they hold its GPUs)."""
    found = [worker_view(node, worker)
             for node in await live_nodes(bus, now_ms=now_ms, node_loss_timeout_s=node_loss_timeout_s)
             for worker in node.workers if worker.endpoint_id == endpoint_id]
    found.sort(key=lambda w: (w.nodeId, w.startedAtMs, w.id))
    return found

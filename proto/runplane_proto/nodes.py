"""Nodes: status in KV `rp-nodes` (key = node id), commands on `rp.node.<node>.cmd`."""

from __future__ import annotations

from typing import Literal

import msgspec

from runplane_proto.endpoints import EndpointSpec
from runplane_proto.ids import EndpointId, JobId, NodeId, WorkerId

# "parked": an idle worker of a flash endpoint kept paused in the node's pool after the
# scheduler no longer needed it; not one of the endpoint's workers, but it holds its GPUs.
WorkerState = Literal["starting", "idle", "running", "stopping", "parked"]


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    index: int
    uuid: str
    name: str
    memory_total_mb: int
    memory_used_mb: int = 0
    utilization_pct: int = 0


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    worker_id: WorkerId
    endpoint_id: EndpointId
    state: WorkerState
    started_at_ms: int
    # When the worker last finished a job (or started, if it never ran one).
    idle_since_ms: int = 0
    jobs: list[JobId] = []
    gpu_uuids: list[str] = []
    # Those of `jobs` submitted with `policy.lowPriority` (the autoscaler counts them apart).
    low_priority_jobs: list[JobId] = []
    # `launch_key` of the spec the worker runs ("" from older agents).
    launch_key: str = ""


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Written by the node agent every heartbeat interval."""

    node_id: NodeId
    hostname: str
    runtime: str
    capabilities: list[str] = []
    cpu_count: int = 0
    memory_total_mb: int = 0
    gpus: list[GpuInfo] = []
    driver_version: str | None = None
    cuda_version: str | None = None
    workers: list[WorkerInfo] = []
    started_at_ms: int = 0
    heartbeat_at_ms: int = 0
    draining: bool = False
    # Memory the kernel says is available now, and the worker disk (`RP_DISK_PATH`, "/").
    memory_available_mb: int = 0
    disk_total_mb: int = 0
    disk_free_mb: int = 0
    # Flash boot's parking pool: its memory budget (0 = no parking here) and what parked
    # workers hold of it now.
    park_budget_mb: int = 0
    parked_mb: int = 0
    # Bumped by the agent whenever `workers` or its GPUs' identities (index, uuid, name)
    # change, so a reader can tell a mere heartbeat from a change without comparing the
    # lists (with `started_at_ms`: a restarted agent starts again at 1). 0 = not reported.
    layout_version: int = 0


class StartWorker(msgspec.Struct, frozen=True, kw_only=True, tag="start_worker"):
    """Start a worker of `spec` with this id. Idempotent: a known worker id is a no-op, except
    that a parked worker with this id is resumed (it becomes one of the endpoint's workers
    again). A parked worker holding any of `gpu_uuids` is evicted (stopped) first.

    With `park` (pre-warm) the new worker starts parked: once initialised it is paused into
    the node's pool, if it fits there without evicting anything (else it is stopped). A node
    without a pool for it refuses the command."""

    worker_id: WorkerId
    spec: EndpointSpec
    gpu_uuids: list[str] = []
    park: bool = False


class StopWorker(msgspec.Struct, frozen=True, kw_only=True, tag="stop_worker"):
    """Stop a worker. With `only_if_idle` a busy worker is left alone (ok=False). With `park`
    the node may instead pause it into its pool (flash endpoints, within the node's memory
    budget); a parked worker is evicted by a stop without `park`."""

    worker_id: WorkerId
    reason: str = ""
    only_if_idle: bool = True
    park: bool = False


NodeCommand = StartWorker | StopWorker


class CommandReply(msgspec.Struct, frozen=True, kw_only=True, tag="command_reply"):
    ok: bool
    error: str | None = None

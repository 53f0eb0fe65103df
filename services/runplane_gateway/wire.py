"""RunPod's HTTP JSON shapes, as msgspec Structs (separate from the bus types in proto/).

Inputs and outputs stay raw JSON bytes (`msgspec.Raw`): they are spliced into a body,
never decoded and re-encoded.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from runplane_proto.endpoints import WarmWindow

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS

ExecutionTimeoutMs = Annotated[int, msgspec.Meta(ge=5_000, le=WEEK_MS)]
TtlMs = Annotated[int, msgspec.Meta(ge=10_000, le=WEEK_MS)]
DEFAULT_TTL_MS = DAY_MS

# -- client API (/v2) ------------------------------------------------------------------------


class SubmitPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`policy` of a /run or /runsync body (RunPod's names, milliseconds)."""

    executionTimeout: ExecutionTimeoutMs | None = None
    ttl: TtlMs | None = None
    lowPriority: bool = False


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


StartKindName = Literal["cold", "snapshot", "flash", "warm"]


class JobTimingsView(msgspec.Struct, frozen=True):
    """Where the job's time went, in ms (an addition to RunPod's job object). The parts add up to
    `totalMs`; a part not reached yet is left out. README: Per-job timing breakdown."""

    totalMs: Annotated[int, _doc("submit until the end, or until now while the job is not over")]
    queuedMs: Annotated[int, _doc(
        "in the queue behind other jobs (and the dispatch), beyond waitingForCapacityMs and workerStartMs")]
    waitingForCapacityMs: Annotated[int, _doc(
        "before the process of the worker that took the job was started (no worker could take it)",
    )] | UnsetType = UNSET
    workerStartMs: Annotated[int, _doc(
        "the worker start the job waited through (workerStart)")] | UnsetType = UNSET
    workerStart: Annotated[StartKindName, _doc(
        "cold: a new worker process; snapshot: one started from the endpoint's snapshot image; "
        "flash: a paused or parked worker resumed; warm: a running worker")] | UnsetType = UNSET
    handlerMs: Annotated[int, _doc(
        "from the worker taking the job to its result reaching the node agent (so far, while it runs)"
    )] | UnsetType = UNSET
    resultUploadMs: Annotated[int, _doc(
        "from the result reaching the node agent to the final record being written (output stored)"
    )] | UnsetType = UNSET


class JobView(msgspec.Struct, frozen=True):
    """The job object: /status, a finished /runsync, the webhook body. Unset keys are left out."""

    id: str
    status: str
    delayTime: int | UnsetType = UNSET
    executionTime: int | UnsetType = UNSET
    output: Raw | UnsetType = UNSET
    error: str | UnsetType = UNSET
    workerId: str | UnsetType = UNSET
    retries: int | UnsetType = UNSET
    timings: JobTimingsView | UnsetType = UNSET
    queuePosition: Annotated[int, _doc(
        "a queued job: how many of the endpoint's jobs not yet taken were queued before it "
        "(README: Queue position and ETA)")] | UnsetType = UNSET
    etaMs: Annotated[int, _doc(
        "a queued job: estimated ms until a worker takes it, from the endpoint's end rate over the "
        "last minute; absent while nothing ended lately")] | UnsetType = UNSET


class JobRef(msgspec.Struct, frozen=True):
    """`{"id", "status"}`: /run, a /runsync whose wait ran out, /cancel, /retry."""

    id: str
    status: str


class StreamView(msgspec.Struct, frozen=True):
    id: str
    status: str
    stream: list[Raw]


class PurgeView(msgspec.Struct, frozen=True):
    removed: int
    status: str = "completed"


class JobCounts(msgspec.Struct):
    completed: int = 0
    failed: int = 0
    inProgress: int = 0
    inQueue: int = 0
    retried: int = 0
    queueDelayMs: Annotated[int, _doc(
        "how long the endpoint's oldest job not yet taken has waited (0: none waits); an addition to "
        "RunPod's /health")] = 0


class WorkerCounts(msgspec.Struct):
    idle: int = 0
    running: int = 0
    initializing: int = 0
    # Workers the endpoint wants that no node can take now (see `placement.reason`).
    throttled: int = 0


class PlacementView(msgspec.Struct):
    """Why wanted workers stay pending (an addition to RunPod's /health)."""

    pendingWorkers: int
    reason: str
    sinceMs: int


class HealthView(msgspec.Struct, omit_defaults=True):
    jobs: JobCounts
    workers: WorkerCounts
    placement: PlacementView | None = None


# -- management API (/v1) --------------------------------------------------------------------

ScalerType = Literal["QUEUE_DELAY", "REQUEST_COUNT"]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
WorkerCount = Annotated[int, msgspec.Meta(ge=0, le=10_000)]
IdleTimeoutS = Annotated[int, msgspec.Meta(ge=1, le=3600)]
ScalerValue = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
GpuCount = Annotated[int, msgspec.Meta(ge=0, le=64)]
Weight = Annotated[int, msgspec.Meta(ge=1, le=1000)]
GpuQuota = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class EndpointCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    imageName: str | None = None
    command: list[str] = []
    env: dict[str, str] = {}
    workersMin: WorkerCount = 0
    workersMax: WorkerCount = 3
    idleTimeout: IdleTimeoutS = 5
    scalerType: ScalerType = "QUEUE_DELAY"
    scalerValue: ScalerValue = 4
    flashboot: bool = True
    gpuCount: GpuCount = 0
    gpuTypeIds: list[str] = []
    executionTimeoutMs: ExecutionTimeoutMs = 600_000
    prewarmWorkers: WorkerCount = 0
    warmWindows: Annotated[list[WarmWindow], msgspec.Meta(max_length=16)] = []
    predictivePrewarm: bool = False
    weight: Weight = 1
    gpuQuota: GpuQuota = 0


class EndpointPatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """PATCH body: only the fields given change."""

    name: Name | UnsetType = UNSET
    imageName: str | None | UnsetType = UNSET
    command: list[str] | UnsetType = UNSET
    env: dict[str, str] | UnsetType = UNSET
    workersMin: WorkerCount | UnsetType = UNSET
    workersMax: WorkerCount | UnsetType = UNSET
    idleTimeout: IdleTimeoutS | UnsetType = UNSET
    scalerType: ScalerType | UnsetType = UNSET
    scalerValue: ScalerValue | UnsetType = UNSET
    flashboot: bool | UnsetType = UNSET
    gpuCount: GpuCount | UnsetType = UNSET
    gpuTypeIds: list[str] | UnsetType = UNSET
    executionTimeoutMs: ExecutionTimeoutMs | UnsetType = UNSET
    prewarmWorkers: WorkerCount | UnsetType = UNSET
    warmWindows: Annotated[list[WarmWindow], msgspec.Meta(max_length=16)] | UnsetType = UNSET
    predictivePrewarm: bool | UnsetType = UNSET
    weight: Weight | UnsetType = UNSET
    gpuQuota: GpuQuota | UnsetType = UNSET


ENDPOINT_FIELDS: frozenset[str] = frozenset(EndpointCreate.__struct_fields__)


class EndpointView(msgspec.Struct, frozen=True):
    id: str
    name: str
    imageName: str | None
    command: list[str]
    env: dict[str, str]
    workersMin: int
    workersMax: int
    idleTimeout: int
    scalerType: str
    scalerValue: int
    flashboot: bool
    gpuCount: int
    gpuTypeIds: list[str]
    executionTimeoutMs: int
    prewarmWorkers: int
    warmWindows: list[WarmWindow]
    predictivePrewarm: bool
    weight: int
    gpuQuota: int
    createdAtMs: int
    updatedAtMs: int


class Deleted(msgspec.Struct, frozen=True):
    id: str
    deleted: bool = True


class ErrorBody(msgspec.Struct, frozen=True):
    error: str


encoder = msgspec.json.Encoder()
# The top level of a body, each value kept as raw JSON; unknown keys are looked at, not lost.
body_decoder = msgspec.json.Decoder(dict[str, Raw])


# -- fleet views (/v1/nodes, /v1/endpoints/{id}/workers|jobs|logs) ------------------------------


class GpuView(msgspec.Struct, frozen=True):
    index: int
    uuid: str
    name: str
    memoryTotalMb: int
    memoryUsedMb: int
    utilizationPct: int
    # The worker holding it (parked ones included), None when free.
    workerId: str | None = None
    endpointId: str | None = None


class WorkerView(msgspec.Struct, frozen=True):
    id: str
    endpointId: str
    nodeId: str
    # initializing | idle | running | parked | stopping
    state: str
    startedAtMs: int
    idleSinceMs: int
    jobs: list[str]
    gpuUuids: list[str]
    gpuNames: list[str]


class NodeView(msgspec.Struct, frozen=True):
    id: str
    hostname: str
    runtime: str
    capabilities: list[str]
    cpuCount: int
    memoryTotalMb: int
    driverVersion: str | None
    cudaVersion: str | None
    gpus: list[GpuView]
    gpusFree: int
    gpusUsed: int
    workers: list[WorkerView]
    startedAtMs: int
    heartbeatAtMs: int
    draining: bool
    # Heartbeat older than RP_NODE_LOSS_TIMEOUT_S: the scheduler is about to drop it.
    lost: bool


class JobSummary(msgspec.Struct, frozen=True, omit_defaults=True):
    """One line of an endpoint's recent jobs (no input or output)."""

    id: str
    status: str
    submittedAtMs: int
    startedAtMs: int | None = None
    completedAtMs: int | None = None
    delayTime: int | None = None
    executionTime: int | None = None
    workerId: str | None = None
    nodeId: str | None = None
    attempts: int = 0
    retries: int = 0
    error: str | None = None
    lowPriority: bool = False
    sync: bool = False


class LogLineView(msgspec.Struct, frozen=True, omit_defaults=True):
    atMs: int
    nodeId: str
    workerId: str
    stream: str
    line: str
    jobId: str | None = None


class LogsView(msgspec.Struct, frozen=True):
    lines: list[LogLineView]
    # Give it back as `?after=` to get only newer lines.
    cursor: str
    # Nodes that did not answer (an agent without worker logs, or one that is down).
    unreachable: list[str] = []

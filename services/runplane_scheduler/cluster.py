"""The scheduler's view of the cluster: a snapshot for `place()`, and the starts and stops
it sent that the nodes have not reported yet. Pure: time is passed in."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from runplane_proto.endpoints import EndpointSpec
from runplane_proto.nodes import NodeStatus, WorkerInfo
from runplane_proto.scaling import ScaleTarget


class PendingStart(msgspec.Struct, frozen=True, kw_only=True):
    """A StartWorker sent to a node that the node has not reported in its status yet."""

    worker_id: str
    endpoint_id: str
    node_id: str
    gpu_uuids: list[str] = []
    sent_at_ms: int = 0
    # A pre-warm (StartWorker with `park`): the worker will be parked, not one of the endpoint's.
    park: bool = False


class PendingStop(msgspec.Struct, frozen=True, kw_only=True):
    """A StopWorker a node accepted while its status still lists the worker as running."""

    worker_id: str
    endpoint_id: str
    node_id: str
    sent_at_ms: int = 0
    # Sent with `park`: done once the node reports the worker parked.
    park: bool = False


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Everything placement looks at, read at one moment."""

    now_ms: int
    # Alive nodes only (fresh heartbeat), by node id.
    nodes: dict[str, NodeStatus] = {}
    endpoints: dict[str, EndpointSpec] = {}
    targets: dict[str, ScaleTarget] = {}
    pending_starts: list[PendingStart] = []
    pending_stops: list[PendingStop] = []
    # Nodes to leave alone for now (a command to them just failed), with the reason.
    backoff: dict[str, str] = {}
    # Endpoints whose pre-warming waits (a node just refused one for lack of pool room), why.
    prewarm_hold: dict[str, str] = {}


class _Beat(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of a `NodeStatus` the scheduler reads besides its workers and GPUs."""

    node_id: str = ""
    capabilities: list[str] = []
    cpu_count: int = 0
    started_at_ms: int = 0
    heartbeat_at_ms: int = 0
    draining: bool = False
    park_budget_mb: int = 0
    parked_mb: int = 0
    layout_version: int = 0


_BEAT = msgspec.msgpack.Decoder(_Beat)


def heartbeat(held: NodeStatus, data: bytes) -> NodeStatus | None:
    """`held` with the new heartbeat time, when `data` (a NodeStatus encoded) is a mere
    heartbeat of the same node: the same layout (the agent's word that its workers and GPUs
    are unchanged) and the same fields placement reads; else None (decode it whole). Spares
    decoding every worker and GPU of every node every second (what else changed, memory and
    disk use or GPU utilisation, the scheduler does not read)."""
    try:
        beat = _BEAT.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not beat.layout_version or beat.layout_version != held.layout_version or (
            beat.node_id, beat.started_at_ms, beat.draining, beat.cpu_count, beat.park_budget_mb,
            beat.parked_mb, beat.capabilities) != (
            held.node_id, held.started_at_ms, held.draining, held.cpu_count, held.park_budget_mb,
            held.parked_mb, held.capabilities):
        return None
    return msgspec.structs.replace(held, heartbeat_at_ms=beat.heartbeat_at_ms)


def split_nodes(nodes: Iterable[NodeStatus], now_ms: int, loss_timeout_ms: int
                ) -> tuple[dict[str, NodeStatus], list[NodeStatus]]:
    """(alive nodes by id, lost nodes): a node is lost when its heartbeat is older than the timeout."""
    alive: dict[str, NodeStatus] = {}
    lost: list[NodeStatus] = []
    for node in nodes:
        if now_ms - node.heartbeat_at_ms > loss_timeout_ms:
            lost.append(node)
        else:
            alive[node.node_id] = node
    return alive, lost


class Pending:
    """Commands in flight: remembered from the moment they are sent until a node's status
    shows their effect, they fail, or `timeout_ms` passes. Also nodes in back-off."""

    def __init__(self, *, timeout_ms: int, backoff_ms: int) -> None:
        self.timeout_ms = timeout_ms
        self.backoff_ms = backoff_ms
        self.starts: dict[str, PendingStart] = {}
        self.stops: dict[str, PendingStop] = {}
        self._backoff: dict[str, tuple[int, str]] = {}
        self._prewarm_hold: dict[str, tuple[int, str]] = {}

    def hold_prewarm(self, endpoint_id: str, reason: str, now_ms: int) -> None:
        """Pre-warm no more workers of this endpoint for one back-off period."""
        self._prewarm_hold[endpoint_id] = (now_ms + self.backoff_ms, reason)

    def start_sent(self, start: PendingStart) -> None:
        self.starts[start.worker_id] = start

    def stop_sent(self, stop: PendingStop) -> None:
        self.stops[stop.worker_id] = stop

    def failed(self, worker_id: str, node_id: str, reason: str, now_ms: int, *, node_fault: bool) -> None:
        """A command was refused or not answered: forget it; back off from the node if it is at fault."""
        self.starts.pop(worker_id, None)
        self.stops.pop(worker_id, None)
        if node_fault:
            self._backoff[node_id] = (now_ms + self.backoff_ms, reason)

    def backoff(self, now_ms: int) -> dict[str, str]:
        self._backoff = {n: v for n, v in self._backoff.items() if v[0] > now_ms}
        return {n: reason for n, (_, reason) in self._backoff.items()}

    def reconcile(self, alive: Mapping[str, NodeStatus], now_ms: int) -> list[PendingStart]:
        """Forget what the nodes now report (or what can no longer happen); return the starts
        that timed out without the node ever reporting the worker."""
        def reported(node_id: str, worker_id: str) -> WorkerInfo | None:
            """The worker in its node's status, None if the node does not report it."""
            node = alive.get(node_id)
            for w in node.workers if node is not None else ():
                if w.worker_id == worker_id:
                    return w
            return None

        expired: list[PendingStart] = []
        for worker_id, start in list(self.starts.items()):
            worker = reported(start.node_id, worker_id) if start.node_id in alive else None
            # A start naming a parked worker (a resume) is done once it is no longer parked; a
            # pre-warm once the node reports its new (parked) worker.
            done = worker is not None and (start.park or worker.state != "parked")
            if start.node_id not in alive or done:
                del self.starts[worker_id]
            elif now_ms - start.sent_at_ms > self.timeout_ms:
                del self.starts[worker_id]
                expired.append(start)
        for worker_id, stop in list(self.stops.items()):
            worker = reported(stop.node_id, worker_id)
            # Done: gone, stopping, parked (for a stop with `park`), or busy (it took a job meanwhile:
            # the node refused the stop, or a parked worker woke for the job).
            if worker is None or worker.state == "stopping" or (stop.park and worker.state == "parked") \
                    or worker.jobs or now_ms - stop.sent_at_ms > self.timeout_ms:
                del self.stops[worker_id]
        return expired

    def snapshot(self, now_ms: int, *, nodes: dict[str, NodeStatus], endpoints: dict[str, EndpointSpec],
                 targets: dict[str, ScaleTarget]) -> Snapshot:
        return Snapshot(
            now_ms=now_ms, nodes=nodes, endpoints=endpoints, targets=targets,
            pending_starts=sorted(self.starts.values(), key=lambda p: p.worker_id),
            pending_stops=sorted(self.stops.values(), key=lambda p: p.worker_id),
            backoff=self.backoff(now_ms), prewarm_hold=self._held(now_ms),
        )

    def _held(self, now_ms: int) -> dict[str, str]:
        self._prewarm_hold = {e: v for e, v in self._prewarm_hold.items() if v[0] > now_ms}
        return {e: reason for e, (_, reason) in self._prewarm_hold.items()}

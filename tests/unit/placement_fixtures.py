"""Builders shared by the placement tests: ids, endpoints, nodes and snapshots."""

from __future__ import annotations

import itertools

from runplane_proto.endpoints import EndpointSpec
from runplane_proto.nodes import GpuInfo, NodeStatus, StopWorker, WorkerInfo
from runplane_proto.scaling import ScaleTarget
from runplane_scheduler.cluster import Snapshot
from runplane_scheduler.placement import Chooser, Option, Plan, ledger, place, select

NOW = 1_700_000_000_000


def ids(prefix: str = "w"):
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter)}"


def ep(endpoint_id: str = "ep1", **kw: object) -> EndpointSpec:
    return EndpointSpec(id=endpoint_id, name=endpoint_id, **kw)  # type: ignore[arg-type]


def node(node_id: str, *, cpus: int = 4, gpus: list[GpuInfo] | None = None,
         workers: list[WorkerInfo] | None = None, draining: bool = False) -> NodeStatus:
    return NodeStatus(node_id=node_id, hostname=node_id, runtime="process", cpu_count=cpus, gpus=gpus or [],
                      workers=workers or [], heartbeat_at_ms=NOW, draining=draining)


def snap(nodes: list[NodeStatus], endpoints: list[EndpointSpec], targets: dict[str, int] | None = None,
         **kw: object) -> Snapshot:
    return Snapshot(
        now_ms=NOW, nodes={n.node_id: n for n in nodes}, endpoints={e.id: e for e in endpoints},
        targets={k: ScaleTarget(endpoint_id=k, desired_workers=v) for k, v in (targets or {}).items()},
        **kw,  # type: ignore[arg-type]
    )


def assert_heaps_choose_what_a_scan_chooses(snapshot: Snapshot, turns: list[str]) -> None:
    """Chooser (heaps per endpoint shape) against `select` (every node, every time), over a
    sequence of endpoints taking turns."""
    fast, slow = ledger(snapshot), ledger(snapshot)
    chooser = Chooser(fast, workers_per_cpu=1, backoff=snapshot.backoff)
    for endpoint_id in turns:
        spec = snapshot.endpoints.get(endpoint_id)
        if spec is None:
            continue
        chosen = chooser.best(spec)
        assert chosen == select(spec, slow, workers_per_cpu=1, backoff=snapshot.backoff)
        if isinstance(chosen, Option):
            chooser.assign(chosen)
            slow[chosen.node_id].assign(chosen.gpu_uuids)


def assert_same_snapshot_same_plan(snapshot: Snapshot) -> None:
    assert place(snapshot, NOW, ids()) == place(snapshot, NOW, ids())


def without_fair_share_stops(plan: Plan, snapshot: Snapshot) -> Plan:
    """The plan without the stops fair share makes (an idle worker giving way to a GPU
    endpoint that finds no capacity: test_placement_fair_share.py), after checking that each
    is of an idle worker holding no job, only-if-idle, while some GPU endpoint is unplaced."""
    workers = {w.worker_id: w for n in snapshot.nodes.values() for w in n.workers}
    unplaced = {u.endpoint_id for u in plan.unplaced}
    fair = [c for c in plan.commands
            if isinstance(c.message, StopWorker) and c.message.reason.startswith("fair share")]
    for command in fair:
        info = workers[command.message.worker_id]
        assert info.state == "idle" and not info.jobs and command.message.only_if_idle
        assert any(snapshot.endpoints[e].gpu_count > 0 for e in unplaced if e in snapshot.endpoints)
    return Plan(commands=[c for c in plan.commands if c not in fair], unplaced=plan.unplaced)

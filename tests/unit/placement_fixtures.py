"""Builders shared by the placement tests: ids, endpoints, nodes and snapshots."""

from __future__ import annotations

import itertools

from runplane_proto.endpoints import EndpointSpec
from runplane_proto.nodes import GpuInfo, NodeStatus, WorkerInfo
from runplane_proto.scaling import ScaleTarget
from runplane_scheduler.cluster import Snapshot
from runplane_scheduler.placement import Chooser, Option, ledger, place, select

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

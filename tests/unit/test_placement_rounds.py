"""Placement over rounds: what the scheduler carries from round to round (`NodeViews`: node
views, live workers per endpoint, chooser heaps per shape) never changes a plan.

The clusters here evolve the way a fleet does between rounds: most nodes only heartbeat
(a new status object, the same layout), some change their workers, join or leave; worker
ids are drawn from a small pool, so a worker is sometimes listed by two nodes, or twice by
one; starts and stops are in flight, nodes back off."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane_proto.nodes import GpuInfo, NodeStatus, WorkerInfo
from runplane_scheduler.cluster import PendingStart, PendingStop, Snapshot, heartbeat
from runplane_scheduler.placement import NodeViews, place

from placement_fixtures import NOW, ep, ids, snap

GPU_NAMES = ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"]
ENDPOINTS = ["e1", "e2", "e3", "e4"]
WORKER_IDS = [f"x{i}" for i in range(10)]
STATES = ["starting", "idle", "idle", "running", "stopping", "parked"]


def gpu(index: int, node_id: str, name: str) -> GpuInfo:
    return GpuInfo(index=index, uuid=f"GPU-{node_id}-{index}", name=name, memory_total_mb=81920)


@st.composite
def node_statuses(draw, node_id: str, version: int) -> NodeStatus:
    gpus = [gpu(j, node_id, draw(st.sampled_from(GPU_NAMES))) for j in range(draw(st.integers(0, 4)))]
    free = [g.uuid for g in gpus]
    workers = []
    for _ in range(draw(st.integers(0, 4))):
        take = draw(st.integers(0, min(2, len(free))))
        held, free = free[:take], free[take:]
        state = draw(st.sampled_from(STATES))
        workers.append(WorkerInfo(
            worker_id=draw(st.sampled_from(WORKER_IDS)), endpoint_id=draw(st.sampled_from([*ENDPOINTS, "gone"])),
            state=state, started_at_ms=NOW - 60_000, idle_since_ms=draw(st.integers(NOW - 100_000, NOW)),
            jobs=["j"] if state == "running" else [], gpu_uuids=held))
    return NodeStatus(node_id=node_id, hostname=node_id, runtime="process", cpu_count=draw(st.integers(1, 3)),
                      gpus=gpus, workers=workers, heartbeat_at_ms=NOW, started_at_ms=NOW - 100_000,
                      draining=draw(st.integers(0, 5)) == 0, layout_version=version,
                      capabilities=["pause"], park_budget_mb=draw(st.sampled_from([0, 1000])))


@st.composite
def rounds(draw) -> list[Snapshot]:
    endpoints = [ep(e, workers_min=draw(st.integers(0, 3)), workers_max=6, flashboot=draw(st.booleans()),
                    gpu_count=draw(st.sampled_from([0, 0, 1, 2])),
                    gpu_type_ids=draw(st.lists(st.sampled_from(["H100", "A100"]), unique=True, max_size=2)))
                 for e in ENDPOINTS]
    nodes: dict[str, NodeStatus] = {}
    snapshots = []
    for r in range(draw(st.integers(2, 6))):
        for i in range(5):
            node_id = f"n{i}"
            held = nodes.get(node_id)
            what = draw(st.sampled_from(["keep", "beat", "beat", "change", "leave"] if held else ["join", "away"]))
            if what == "beat":  # a new object, the same layout
                assert held is not None
                nodes[node_id] = msgspec.convert(msgspec.to_builtins(held), NodeStatus)
            elif what in ("change", "join"):
                nodes[node_id] = draw(node_statuses(node_id, version=(held.layout_version + 1) if held else 1))
            elif what == "leave":
                del nodes[node_id]
        reported = [(n.node_id, w) for n in nodes.values() for w in n.workers]
        starts, stops = [], []
        for node_id, w in reported:
            pick = draw(st.integers(0, 7))
            if pick == 0:
                starts.append(PendingStart(worker_id=w.worker_id, endpoint_id=w.endpoint_id, node_id=node_id,
                                           gpu_uuids=list(w.gpu_uuids), park=draw(st.booleans())))
            elif pick == 1:
                stops.append(PendingStop(worker_id=w.worker_id, endpoint_id=w.endpoint_id, node_id=node_id,
                                         park=draw(st.booleans())))
        for node_id in nodes:
            if draw(st.integers(0, 3)) == 0:
                starts.append(PendingStart(worker_id=f"p{r}{node_id}", endpoint_id=draw(st.sampled_from(ENDPOINTS)),
                                           node_id=node_id, park=draw(st.booleans())))
        backoff = {n: "refused" for n in nodes if draw(st.integers(0, 4)) == 0}
        targets = {e: draw(st.integers(0, 6)) for e in ENDPOINTS if draw(st.booleans())}
        snapshots.append(snap(list(nodes.values()), endpoints, targets, pending_starts=starts,
                              pending_stops=stops, backoff=backoff,
                              prewarm_hold={}))
    return snapshots


@settings(max_examples=200, deadline=None)
@given(rounds())
def test_what_is_carried_between_rounds_of_an_evolving_fleet_never_changes_a_plan(snapshots):
    views = NodeViews()
    for snapshot in snapshots:
        fresh = place(snapshot, NOW, ids(), workers_per_cpu=1)
        assert place(snapshot, NOW, ids(), workers_per_cpu=1, views=views) == fresh
        assert place(snapshot, NOW, ids(), workers_per_cpu=1, views=views) == fresh


def test_the_memo_drops_its_log_and_heaps_rather_than_grow_without_bound():
    views = NodeViews()
    spec = ep("e1", workers_min=1, gpu_count=1)
    for r in range(300):
        nodes = [NodeStatus(node_id=f"n{i}", hostname="h", runtime="process", cpu_count=1,
                            gpus=[gpu(0, f"n{i}", GPU_NAMES[0])], layout_version=r + 1, started_at_ms=NOW,
                            workers=[WorkerInfo(worker_id=f"w{r}", endpoint_id="other", state="idle",
                                                started_at_ms=NOW)] if i == r % 8 else [])
                 for i in range(8)]
        snapshot = snap(nodes, [spec])
        assert place(snapshot, NOW, ids(), views=views) == place(snapshot, NOW, ids())
        assert len(views.changes) <= 4 * 8 + 1024
        assert all(len(heap) <= 2 * 8 + 64 + 8 for heap, _ in views.heaps.values())


# -- heartbeats: the scheduler's node mirror decodes a mere heartbeat without its workers ---------


def _status(**kw: object) -> NodeStatus:
    base = dict(node_id="n1", hostname="n1", runtime="process", cpu_count=4, started_at_ms=NOW, heartbeat_at_ms=NOW,
                gpus=[gpu(0, "n1", GPU_NAMES[0])], layout_version=3, capabilities=["pause"],
                workers=[WorkerInfo(worker_id="w1", endpoint_id="e1", state="idle", started_at_ms=NOW)])
    return NodeStatus(**{**base, **kw})  # type: ignore[arg-type]


def test_a_mere_heartbeat_moves_only_the_heartbeat_time_of_the_status_held():
    held = _status()
    beat = msgspec.msgpack.encode(_status(heartbeat_at_ms=NOW + 1000, memory_available_mb=5))
    refreshed = heartbeat(held, beat)
    assert refreshed is not None and refreshed.heartbeat_at_ms == NOW + 1000
    assert refreshed.workers is held.workers and refreshed.gpus is held.gpus


def test_anything_placement_reads_that_changed_makes_the_status_decode_in_full():
    held = _status()
    for changed in [dict(layout_version=4), dict(layout_version=0), dict(started_at_ms=NOW + 1), dict(draining=True),
                    dict(cpu_count=8), dict(park_budget_mb=100), dict(parked_mb=10), dict(capabilities=[]),
                    dict(node_id="n2")]:
        assert heartbeat(held, msgspec.msgpack.encode(_status(heartbeat_at_ms=NOW + 1, **changed))) is None, changed
    assert heartbeat(_status(layout_version=0), msgspec.msgpack.encode(_status(layout_version=0))) is None
    assert heartbeat(held, b"\xc1garbage") is None

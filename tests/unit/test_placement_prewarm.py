"""Placement of pre-warmed workers: a flash endpoint keeps `prewarm_workers` live and parked
together at any worker count; the missing ones start parked on nodes whose pool has room,
on free capacity only; a refused pre-warm holds the endpoint back instead of looping."""

from __future__ import annotations

import msgspec

from runplane_proto.nodes import GpuInfo, NodeStatus, StartWorker, StopWorker, WorkerInfo
from runplane_proto.scaling import ScaleTarget
from runplane_scheduler.cluster import Pending, PendingStart
from runplane_scheduler.placement import ledger, live_workers, place

from placement_fixtures import NOW, ep, ids, node, snap


def poolnode(node_id: str, *, budget: int = 1000, used: int = 0, caps: tuple[str, ...] = ("pause",),
             **kw: object) -> NodeStatus:
    return msgspec.structs.replace(node(node_id, **kw), capabilities=list(caps),  # type: ignore[arg-type]
                                   park_budget_mb=budget, parked_mb=used)


def prewarm_snap(nodes, endpoints, desired: dict[str, int], prewarm: dict[str, int], **kw):
    snapshot = snap(nodes, endpoints, **kw)
    targets = {e: ScaleTarget(endpoint_id=e, desired_workers=desired.get(e, 0), prewarm_workers=prewarm.get(e, 0))
               for e in set(desired) | set(prewarm)}
    return msgspec.structs.replace(snapshot, targets=targets)


def gpu(index: int, node_id: str) -> GpuInfo:
    return GpuInfo(index=index, uuid=f"GPU-{node_id}-{index}", name="NVIDIA H100 80GB HBM3", memory_total_mb=81920)


def w(worker_id: str, state: str = "idle", endpoint_id: str = "ep1", gpus: list[str] | None = None) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, endpoint_id=endpoint_id, state=state,  # type: ignore[arg-type]
                      started_at_ms=NOW - 1000, idle_since_ms=NOW - 1000, gpu_uuids=gpus or [])


def prewarms(plan) -> list[tuple[str, str, str, list[str]]]:
    return [(c.node_id, c.endpoint_id, c.message.worker_id, c.message.gpu_uuids) for c in plan.commands
            if isinstance(c.message, StartWorker) and c.message.park]


def test_a_flash_endpoint_at_zero_gets_its_prewarmed_workers_started_parked():
    plan = place(prewarm_snap([poolnode("n1")], [ep(workers_max=3)], {}, {"ep1": 2}), NOW, ids())
    assert prewarms(plan) == [("n1", "ep1", "w1", []), ("n1", "ep1", "w2", [])]
    assert all(c.message.park for c in plan.commands)  # nothing but the pre-warms


def test_no_prewarm_without_a_target_for_non_flash_endpoints_or_at_enough_workers():
    nodes = [poolnode("n1")]
    assert prewarms(place(prewarm_snap(nodes, [ep()], {}, {}), NOW, ids())) == []
    assert prewarms(place(prewarm_snap(nodes, [ep(flashboot=False)], {}, {"ep1": 1}), NOW, ids())) == []
    # Live and parked workers count, as do pre-warms in flight: none is started twice.
    held = [poolnode("n1", workers=[w("live"), w("p", "parked")])]
    assert prewarms(place(prewarm_snap(held, [ep()], {"ep1": 1}, {"ep1": 2}), NOW, ids())) == []
    in_flight = prewarm_snap(nodes, [ep()], {}, {"ep1": 1}, pending_starts=[
        PendingStart(worker_id="pw", endpoint_id="ep1", node_id="n1", park=True)])
    assert place(in_flight, NOW, ids()).commands == []


def test_a_pending_prewarm_is_not_a_live_worker_and_takes_no_slot():
    snapshot = prewarm_snap([poolnode("n1", cpus=1)], [ep()], {"ep1": 1}, {"ep1": 1}, pending_starts=[
        PendingStart(worker_id="pw", endpoint_id="ep1", node_id="n1", park=True)])
    assert live_workers(snapshot) == {}
    assert ledger(snapshot)["n1"].workers == 0
    # The endpoint's one wanted worker is started besides it (pre-warm counts live + parked).
    plan = place(snapshot, NOW, ids(), workers_per_cpu=1)
    assert [(c.message.worker_id, c.message.park) for c in plan.commands] == [("w1", False)]


def test_prewarms_go_only_to_nodes_that_can_park_with_room_and_never_evict():
    nodes = [poolnode("full", budget=500, used=500), poolnode("nopause", caps=()),
             poolnode("off", budget=0), poolnode("draining", draining=True)]
    assert prewarms(place(prewarm_snap(nodes, [ep()], {}, {"ep1": 1}), NOW, ids())) == []
    plan = place(prewarm_snap([*nodes, poolnode("room", budget=500, used=100)], [ep()], {}, {"ep1": 1}),
                 NOW, ids())
    assert prewarms(plan) == [("room", "ep1", "w1", [])]
    # GPU endpoints: free GPUs only, never a GPU held by another endpoint's parked worker.
    gpu_node = poolnode("g", gpus=[gpu(0, "g")], workers=[w("other", "parked", "ep2", ["GPU-g-0"])])
    gpu_ep = ep(gpu_count=1)
    assert prewarms(place(prewarm_snap([gpu_node], [gpu_ep, ep("ep2")], {}, {"ep1": 1}), NOW, ids())) == []
    free = poolnode("g2", gpus=[gpu(0, "g2"), gpu(1, "g2")])
    plan = place(prewarm_snap([gpu_node, free], [gpu_ep, ep("ep2")], {}, {"ep1": 1}), NOW, ids())
    assert prewarms(plan) == [("g2", "ep1", "w1", ["GPU-g2-0"])]
    assert not any(isinstance(c.message, StopWorker) for c in plan.commands)


def test_prewarm_is_capped_by_workers_max_and_held_after_a_refusal():
    nodes = [poolnode("n1")]
    assert len(prewarms(place(prewarm_snap(nodes, [ep(workers_max=1)], {}, {"ep1": 5}), NOW, ids()))) == 1
    held = prewarm_snap(nodes, [ep()], {}, {"ep1": 1}, prewarm_hold={"ep1": "n1: the pool is full"})
    assert place(held, NOW, ids()).commands == []


def test_a_refused_prewarm_holds_the_endpoint_for_one_backoff_not_the_node():
    pending = Pending(timeout_ms=30_000, backoff_ms=5_000)
    pending.hold_prewarm("ep1", "n1: pool full", NOW)
    snapshot = pending.snapshot(NOW + 1, nodes={}, endpoints={}, targets={})
    assert snapshot.prewarm_hold == {"ep1": "n1: pool full"} and snapshot.backoff == {}
    assert pending.snapshot(NOW + 5_001, nodes={}, endpoints={}, targets={}).prewarm_hold == {}


def test_a_pending_prewarm_ends_once_reported_parked():
    pending = Pending(timeout_ms=30_000, backoff_ms=5_000)
    pending.start_sent(PendingStart(worker_id="pw", endpoint_id="ep1", node_id="n1", sent_at_ms=NOW, park=True))
    pending.reconcile({"n1": node("n1")}, NOW + 1)
    assert list(pending.starts) == ["pw"]
    pending.reconcile({"n1": node("n1", workers=[w("pw", "parked")])}, NOW + 2)
    assert pending.starts == {}


def test_when_work_comes_the_prewarmed_worker_is_resumed_not_a_cold_start():
    nodes = [poolnode("n1", workers=[w("pw", "parked")])]
    plan = place(prewarm_snap(nodes, [ep()], {"ep1": 1}, {"ep1": 1}), NOW, ids())
    assert [(c.message.worker_id, c.message.park) for c in plan.commands] == [("pw", False)]

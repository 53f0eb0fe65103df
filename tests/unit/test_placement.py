"""Placement: tables of cluster situations, then properties over random clusters."""

from __future__ import annotations

import itertools
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane_proto.nodes import GpuInfo, NodeStatus, StartWorker, StopWorker, WorkerInfo
from runplane_proto.scaling import ScaleTarget
from runplane_scheduler.cluster import Pending, PendingStart, PendingStop, Snapshot, split_nodes
from runplane_scheduler.placement import (NodeViews, desired_workers, gpu_matches, live_workers, place)

from placement_fixtures import (NOW, assert_heaps_choose_what_a_scan_chooses, assert_same_snapshot_same_plan,
                                ep, ids, node, snap, without_fair_share_stops)


def gpu(index: int, name: str = "NVIDIA H100 80GB HBM3", node: str = "n") -> GpuInfo:
    return GpuInfo(index=index, uuid=f"GPU-{node}-{index}", name=name, memory_total_mb=81920)


def worker(worker_id: str, endpoint_id: str = "ep1", state: str = "idle", *, idle_since_ms: int = NOW,
           jobs: list[str] | None = None, gpus: list[str] | None = None) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, endpoint_id=endpoint_id, state=state,  # type: ignore[arg-type]
                      started_at_ms=NOW - 60_000, idle_since_ms=idle_since_ms, jobs=jobs or [],
                      gpu_uuids=gpus or [])


def starts(plan) -> list[tuple[str, str, list[str]]]:
    return [(c.node_id, c.message.spec.id, c.message.gpu_uuids) for c in plan.commands
            if isinstance(c.message, StartWorker)]


def stops(plan) -> list[str]:
    return [c.message.worker_id for c in plan.commands if isinstance(c.message, StopWorker)]


# -- desired count -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lo,hi,target,expected", [
    (0, 3, None, 0), (2, 3, None, 2), (0, 3, 2, 2), (1, 3, 0, 1), (0, 3, 9, 3), (2, 1, None, 2),
])
def test_desired_is_the_target_within_bounds(lo, hi, target, expected):
    t = None if target is None else ScaleTarget(endpoint_id="ep1", desired_workers=target)
    assert desired_workers(ep(workers_min=lo, workers_max=hi), t) == expected


# -- tables --------------------------------------------------------------------------------------------


def test_no_nodes_leaves_the_workers_unplaced_with_a_reason():
    plan = place(snap([], [ep(workers_min=2)]), NOW, ids())
    assert plan.commands == []
    assert [(u.endpoint_id, u.missing, u.reason) for u in plan.unplaced] == [("ep1", 2, "no alive nodes")]


def test_starts_workers_min_with_ids_from_the_factory():
    plan = place(snap([node("n1")], [ep(workers_min=2)]), NOW, ids())
    assert starts(plan) == [("n1", "ep1", []), ("n1", "ep1", [])]
    assert [c.message.worker_id for c in plan.commands] == ["w1", "w2"]
    assert plan.unplaced == []


def test_the_scale_target_decides_within_bounds():
    plan = place(snap([node("n1")], [ep(workers_min=1, workers_max=3)], {"ep1": 9}), NOW, ids())
    assert len(starts(plan)) == 3


def test_reported_and_pending_workers_count():
    nodes = [node("n1", workers=[worker("a"), worker("b", state="starting")])]
    pending = [PendingStart(worker_id="c", endpoint_id="ep1", node_id="n1")]
    assert place(snap(nodes, [ep(workers_min=3)], pending_starts=pending), NOW, ids()).commands == []


def test_stopping_workers_and_lost_pending_starts_do_not_count():
    nodes = [node("n1", workers=[worker("a", state="stopping")])]
    pending = [PendingStart(worker_id="c", endpoint_id="ep1", node_id="gone")]
    plan = place(snap(nodes, [ep(workers_min=2)], pending_starts=pending), NOW, ids())
    assert len(starts(plan)) == 2


def test_a_worker_being_stopped_does_not_count():
    nodes = [node("n1", workers=[worker("a"), worker("b")])]
    plan = place(snap(nodes, [ep(workers_min=2)], pending_stops=[
        PendingStop(worker_id="a", endpoint_id="ep1", node_id="n1")]), NOW, ids())
    assert len(starts(plan)) == 1 and stops(plan) == []


def test_surplus_idle_workers_stop_longest_idle_first():
    nodes = [node("n1", workers=[worker("a", idle_since_ms=NOW - 30), worker("b", idle_since_ms=NOW - 10),
                                 worker("c", idle_since_ms=NOW - 20)])]
    plan = place(snap(nodes, [ep(workers_min=0)], {"ep1": 1}), NOW, ids())
    assert stops(plan) == ["a", "c"]
    assert all(c.message.only_if_idle for c in plan.commands)


def test_busy_workers_are_never_stopped():
    nodes = [node("n1", workers=[worker("a", state="running", jobs=["j1"]), worker("b", jobs=["j2"]),
                                 worker("c"), worker("d", state="starting")])]
    plan = place(snap(nodes, [ep(workers_min=0)], {"ep1": 0}), NOW, ids())
    assert stops(plan) == ["c"]


def test_idle_workers_of_a_deleted_endpoint_are_stopped():
    nodes = [node("n1", workers=[worker("a", "old"), worker("b", "old", state="running", jobs=["j"])])]
    plan = place(snap(nodes, []), NOW, ids())
    assert stops(plan) == ["a"]
    assert plan.commands[0].message.reason == "endpoint deleted"


def test_gpu_types_are_tried_in_order():
    h100 = node("h", gpus=[gpu(0, node="h")])
    a100 = node("a", gpus=[gpu(0, "NVIDIA A100-SXM4-80GB", node="a")])
    spec = ep(workers_min=1, gpu_count=1, gpu_type_ids=["NVIDIA H100 80GB HBM3", "A100"])
    assert starts(place(snap([a100, h100], [spec]), NOW, ids())) == [("h", "ep1", ["GPU-h-0"])]
    busy_h100 = node("h", gpus=[gpu(0, node="h")], workers=[worker("x", "other", gpus=["GPU-h-0"])])
    assert starts(place(snap([a100, busy_h100], [spec, ep("other")]), NOW, ids())) == [
        ("a", "ep1", ["GPU-a-0"])]


def test_gpus_are_never_handed_out_twice():
    n = node("n", gpus=[gpu(0), gpu(1)], workers=[worker("x", gpus=["GPU-n-0"])])
    pending = [PendingStart(worker_id="y", endpoint_id="ep1", node_id="n", gpu_uuids=["GPU-n-1"])]
    plan = place(snap([n], [ep(workers_min=3, gpu_count=1)], pending_starts=pending), NOW, ids())
    assert plan.commands == []
    assert plan.unplaced[0].missing == 1
    assert "no node has 1 free GPU(s) of any type: n: 0 of 2 GPUs free" in plan.unplaced[0].reason


def test_a_stopping_worker_still_holds_its_gpu():
    n = node("n", gpus=[gpu(0)], workers=[worker("x", state="stopping", gpus=["GPU-n-0"])])
    plan = place(snap([n], [ep(workers_min=1, gpu_count=1)]), NOW, ids())
    assert plan.commands == [] and plan.unplaced[0].missing == 1


def test_multi_gpu_workers_get_gpus_of_one_type():
    mixed = node("m", gpus=[gpu(0, node="m"), gpu(1, "NVIDIA A100", node="m")])
    plan = place(snap([mixed], [ep(workers_min=1, gpu_count=2)]), NOW, ids())
    assert plan.commands == [] and "1 free GPU" not in plan.unplaced[0].reason
    two = node("t", gpus=[gpu(0, node="t"), gpu(1, "NVIDIA A100", node="t"), gpu(2, node="t")])
    assert starts(place(snap([two], [ep(workers_min=1, gpu_count=2)]), NOW, ids())) == [
        ("t", "ep1", ["GPU-t-0", "GPU-t-2"])]


def test_bin_packing_prefers_partly_used_nodes():
    nodes = [node("n1"), node("n2", workers=[worker("a", "other")])]
    assert starts(place(snap(nodes, [ep(workers_min=1), ep("other")]), NOW, ids())) == [("n2", "ep1", [])]


def test_gpu_bin_packing_takes_the_tightest_fit():
    roomy = node("r", gpus=[gpu(i, node="r") for i in range(4)])
    tight = node("t", gpus=[gpu(i, node="t") for i in range(2)])
    assert starts(place(snap([roomy, tight], [ep(workers_min=1, gpu_count=1)]), NOW, ids())) == [
        ("t", "ep1", ["GPU-t-0"])]


def test_cpu_workers_keep_off_gpu_nodes_when_they_can():
    nodes = [node("g", gpus=[gpu(0, node="g")], workers=[worker("a", "other")]), node("c")]
    assert starts(place(snap(nodes, [ep(workers_min=1), ep("other")]), NOW, ids())) == [("c", "ep1", [])]


def test_cpu_slots_limit_workers_per_node():
    plan = place(snap([node("n1", cpus=1)], [ep(workers_min=3)]), NOW, ids(), workers_per_cpu=2)
    assert len(starts(plan)) == 2
    assert plan.unplaced[0].missing == 1 and "all 2 worker slots used" in plan.unplaced[0].reason


def test_draining_and_backed_off_nodes_get_nothing():
    nodes = [node("d", draining=True), node("b")]
    plan = place(snap(nodes, [ep(workers_min=1)], backoff={"b": "start refused"}), NOW, ids())
    assert plan.commands == []
    assert plan.unplaced[0].reason == ("no node has a free worker slot: b: backing off (start refused); "
                                       "d: draining")


def test_endpoints_take_turns_for_scarce_gpus():
    n = node("n", gpus=[gpu(0), gpu(1)])
    plan = place(snap([n], [ep("a", workers_min=2, gpu_count=1), ep("b", workers_min=2, gpu_count=1)]),
                 NOW, ids())
    assert sorted(e for _, e, _ in starts(plan)) == ["a", "b"]
    assert sorted((u.endpoint_id, u.missing) for u in plan.unplaced) == [("a", 1), ("b", 1)]


@pytest.mark.parametrize("type_id,name,match", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", True),
    ("H100", "NVIDIA H100 80GB HBM3", True),
    ("nvidia  h100", "NVIDIA H100 PCIe", True),
    ("A10", "NVIDIA A100-SXM4-80GB", False),
    ("A100", "NVIDIA A100-SXM4-80GB", True),
    ("RTX 4090", "NVIDIA GeForce RTX 4090", True),
    ("4090 RTX", "NVIDIA GeForce RTX 4090", False),
    ("", "NVIDIA H100", False),
])
def test_gpu_type_matching(type_id, name, match):
    assert gpu_matches(type_id, name) is match


# -- the pending tracker (pure, time passed in) ----------------------------------------------------


def test_pending_starts_end_when_reported_failed_or_timed_out():
    pending = Pending(timeout_ms=30_000, backoff_ms=5_000)
    for wid in ("a", "b", "c", "d"):
        pending.start_sent(PendingStart(worker_id=wid, endpoint_id="ep1", node_id="n1", sent_at_ms=NOW))
    pending.start_sent(PendingStart(worker_id="e", endpoint_id="ep1", node_id="lost", sent_at_ms=NOW))
    pending.failed("b", "n1", "refused", NOW, node_fault=True)
    alive = {"n1": node("n1", workers=[worker("a")])}
    assert pending.reconcile(alive, NOW + 1_000) == []
    assert sorted(pending.starts) == ["c", "d"]
    assert pending.backoff(NOW + 1_000) == {"n1": "refused"}
    assert pending.backoff(NOW + 5_001) == {}
    expired = pending.reconcile(alive, NOW + 30_001)
    assert sorted(p.worker_id for p in expired) == ["c", "d"] and pending.starts == {}


def test_pending_stops_end_when_the_worker_goes_or_stops():
    pending = Pending(timeout_ms=30_000, backoff_ms=5_000)
    for wid in ("a", "b", "c"):
        pending.stop_sent(PendingStop(worker_id=wid, endpoint_id="ep1", node_id="n1", sent_at_ms=NOW))
    alive = {"n1": node("n1", workers=[worker("a"), worker("b", state="stopping")])}
    pending.reconcile(alive, NOW + 1)
    assert list(pending.stops) == ["a"]


def test_split_nodes_by_heartbeat_age():
    fresh = node("f")
    old = NodeStatus(node_id="o", hostname="o", runtime="process", heartbeat_at_ms=NOW - 10_001)
    alive, lost = split_nodes([fresh, old], NOW, 10_000)
    assert list(alive) == ["f"] and [n.node_id for n in lost] == ["o"]


# -- properties -------------------------------------------------------------------------------------

GPU_NAMES = ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"]
TYPE_IDS = ["H100", "A100", "RTX 4090", "L40S"]
ENDPOINTS = ["e1", "e2", "e3"]


@st.composite
def clusters(draw) -> Snapshot:
    endpoints = []
    for endpoint_id in draw(st.lists(st.sampled_from(ENDPOINTS), unique=True, max_size=3)):
        lo = draw(st.integers(0, 3))
        endpoints.append(ep(endpoint_id, workers_min=lo, workers_max=lo + draw(st.integers(0, 4)),
                            gpu_count=draw(st.sampled_from([0, 0, 1, 2])),
                            gpu_type_ids=draw(st.lists(st.sampled_from(TYPE_IDS), unique=True, max_size=2))))
    targets = {e.id: draw(st.integers(0, 8)) for e in endpoints if draw(st.booleans())}
    nodes, pending = [], []
    serial = itertools.count()
    for i in range(draw(st.integers(0, 4))):
        node_id = f"n{i}"
        gpus = [gpu(j, draw(st.sampled_from(GPU_NAMES)), node_id) for j in range(draw(st.integers(0, 4)))]
        free = [g.uuid for g in gpus]
        workers = []
        for _ in range(draw(st.integers(0, 4))):
            endpoint_id = draw(st.sampled_from([*ENDPOINTS, "deleted"]))
            take = draw(st.integers(0, min(2, len(free))))
            held, free = free[:take], free[take:]
            state = draw(st.sampled_from(["starting", "idle", "running", "stopping"]))
            workers.append(worker(f"x{next(serial)}", endpoint_id, state, gpus=held,
                                  idle_since_ms=draw(st.integers(NOW - 100_000, NOW)),
                                  jobs=["j"] if state == "running" or draw(st.booleans()) and state == "idle"
                                  else []))
        if free and draw(st.booleans()):
            pending.append(PendingStart(worker_id=f"p{next(serial)}", node_id=node_id, gpu_uuids=free[:1],
                                        endpoint_id=draw(st.sampled_from(ENDPOINTS))))
        nodes.append(node(node_id, cpus=draw(st.integers(1, 4)), gpus=gpus, workers=workers,
                          draining=draw(st.booleans()) and draw(st.booleans())))
    return snap(nodes, endpoints, targets, pending_starts=pending)


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_same_snapshot_same_plan(snapshot):
    assert_same_snapshot_same_plan(snapshot)


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_gpus_never_oversubscribed_and_starts_are_feasible(snapshot):
    plan = place(snapshot, NOW, ids(), workers_per_cpu=1)
    held = Counter(u for n in snapshot.nodes.values() for w in n.workers for u in w.gpu_uuids)
    held.update(u for p in snapshot.pending_starts for u in p.gpu_uuids)
    slots = Counter({n: len(s.workers) for n, s in snapshot.nodes.items()})
    slots.update(p.node_id for p in snapshot.pending_starts)
    for command in plan.commands:
        message = command.message
        if not isinstance(message, StartWorker):
            continue
        target = snapshot.nodes[command.node_id]
        assert not target.draining
        assert len(message.gpu_uuids) == message.spec.gpu_count
        by_uuid = {g.uuid: g for g in target.gpus}
        assert all(u in by_uuid for u in message.gpu_uuids)
        assert len({by_uuid[u].name for u in message.gpu_uuids}) <= 1
        if message.spec.gpu_type_ids and message.gpu_uuids:
            assert any(gpu_matches(t, by_uuid[message.gpu_uuids[0]].name) for t in message.spec.gpu_type_ids)
        held.update(message.gpu_uuids)
        if message.spec.gpu_count == 0:
            slots[command.node_id] += 1
            assert slots[command.node_id] <= max(1, target.cpu_count)
    assert all(n == 1 for n in held.values()), held


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_stops_only_idle_workers_and_counts_converge(snapshot):
    plan = without_fair_share_stops(place(snapshot, NOW, ids()), snapshot)
    workers = {w.worker_id: w for n in snapshot.nodes.values() for w in n.workers}
    for worker_id in stops(plan):
        assert workers[worker_id].state == "idle" and not workers[worker_id].jobs
    live = live_workers(snapshot)
    unplaced = {u.endpoint_id for u in plan.unplaced}
    for spec in snapshot.endpoints.values():
        want = desired_workers(spec, snapshot.targets.get(spec.id))
        mine = [c.message for c in plan.commands if c.endpoint_id == spec.id]
        started = sum(1 for m in mine if isinstance(m, StartWorker))
        stopped = sum(1 for m in mine if isinstance(m, StopWorker))
        after = len(live.get(spec.id, [])) + started - stopped
        assert not (started and stopped)
        if started:
            assert after <= want
        if spec.id not in unplaced:
            assert after >= want
        if after > want:  # only busy or not-yet-idle workers are left to stop
            assert all(w.info is None or w.info.state != "idle" or w.info.jobs
                       for w in live[spec.id] if w.worker_id not in stops(plan))


def test_the_reason_stays_short_on_a_large_fleet():
    nodes = [node(f"n{i:04d}", cpus=1) for i in range(200)] + [node("d1", draining=True), node("d2", draining=True)]
    plan = place(snap(nodes, [ep(workers_min=801)]), NOW, ids(), workers_per_cpu=4)
    reasons = {u.endpoint_id: u.reason for u in plan.unplaced}
    assert reasons["ep1"].startswith("no node has a free worker slot: 200 nodes (n0000, n0001, n0002, …): "
                                     "all 4 worker slots used; 2 nodes (d1, d2): draining")
    assert len(reasons["ep1"]) < 300


@settings(max_examples=300, deadline=None)
@given(clusters(), st.lists(st.sampled_from(ENDPOINTS), max_size=12))
def test_the_heaps_choose_exactly_what_a_scan_of_every_node_chooses(snapshot, turns):
    assert_heaps_choose_what_a_scan_chooses(snapshot, turns)


def test_a_large_fleet_is_placed_in_one_plan():
    """8,000 workers of three shapes over 1,000 nodes of 8 GPUs (`./scripts/bench scale` times it)."""
    nodes = [node(f"n{i:04d}", cpus=32, gpus=[gpu(j, GPU_NAMES[i % 2], f"n{i:04d}") for j in range(8)])
             for i in range(1000)]
    endpoints = ([ep(f"h{i}", workers_min=30, gpu_count=1, gpu_type_ids=["H100"]) for i in range(100)]
                 + [ep(f"a{i}", workers_min=20, gpu_count=2, gpu_type_ids=["A100"]) for i in range(50)]
                 + [ep(f"c{i}", workers_min=50, gpu_count=0) for i in range(80)])
    plan = place(snap(nodes, endpoints), NOW, ids(), workers_per_cpu=4)
    assert len(starts(plan)) == 3000 + 1000 + 4000 and plan.unplaced == []
    per_node = Counter(node_id for node_id, _, _ in starts(plan))
    assert max(per_node.values()) <= 32 * 4


@settings(max_examples=200, deadline=None)
@given(st.lists(clusters(), min_size=2, max_size=4))
def test_views_carried_over_between_rounds_never_change_a_plan(rounds):
    """The scheduler keeps NodeViews from round to round (node ids recur with other workers)."""
    views = NodeViews()
    for snapshot in rounds:
        fresh = place(snapshot, NOW, ids())
        assert place(snapshot, NOW, ids(), views=views) == fresh
        assert place(snapshot, NOW, ids(), views=views) == fresh  # from the cached heaps


def test_a_heartbeat_with_the_same_layout_version_reuses_the_view_and_a_new_version_rebuilds_it():
    views = NodeViews()
    worker = WorkerInfo(worker_id="w1", endpoint_id="ep1", state="idle", started_at_ms=NOW)
    first = msgspec.structs.replace(node("n1", workers=[worker]), layout_version=3, started_at_ms=NOW)
    view = views.of(first)
    generation = views.generation
    # A newer status of the same layout (new objects, as decoded from each heartbeat).
    beat = msgspec.structs.replace(first, workers=[msgspec.structs.replace(worker)], heartbeat_at_ms=NOW + 1000)
    assert views.of(beat) is view and views.generation == generation
    # A changed layout is a new view, found by the version alone.
    busy = msgspec.structs.replace(worker, state="running", jobs=["j1"])
    changed = msgspec.structs.replace(first, workers=[busy], layout_version=4)
    assert views.of(changed) is not view and views.generation == generation + 1
    assert live_workers(snap([changed], [ep()]), views)["ep1"][0].info.jobs == ["j1"]
    # A restarted agent counts from 1 again: its start time tells the layouts apart.
    restarted = msgspec.structs.replace(changed, workers=[], layout_version=4, started_at_ms=NOW + 5)
    assert views.of(restarted).workers == []


def test_fleet_capacity_counts_whole_workers_of_one_model_on_nodes_that_take_work():
    from runplane_proto.gpus import fleet_capacity
    h100 = [gpu(i, "NVIDIA H100 80GB HBM3", "a") for i in range(5)]
    mixed = [gpu(0, "NVIDIA H100 80GB HBM3", "b"), gpu(1, "NVIDIA A100-SXM4-80GB", "b"),
             gpu(2, "NVIDIA A100-SXM4-80GB", "b")]
    nodes = [node("a", gpus=h100), node("b", gpus=mixed), node("d", gpus=h100, draining=True), node("c")]
    assert fleet_capacity(nodes, 1, ["H100"]) == 6
    assert fleet_capacity(nodes, 2, ["H100"]) == 2  # 5 // 2 on a, 1 // 2 on b
    assert fleet_capacity(nodes, 2, []) == 3  # any model, but one model per worker
    assert fleet_capacity(nodes, 1, ["L40S"]) == 0

"""Placement with flash boot: parked workers (not their endpoint's, but holding their GPUs),
resumes before cold starts, GPUs of other endpoints' parked workers, evictions. Tables, then
properties over random clusters that hold parked workers."""

from __future__ import annotations

import itertools
from collections import Counter

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane_proto.endpoints import launch_key
from runplane_proto.nodes import GpuInfo, StartWorker, StopWorker, WorkerInfo
from runplane_scheduler.cluster import Pending, PendingStart, PendingStop, Snapshot
from runplane_scheduler.placement import desired_workers, ledger, live_workers, place

from placement_fixtures import (NOW, assert_heaps_choose_what_a_scan_chooses, assert_same_snapshot_same_plan,
                                ep, ids, node, snap, without_fair_share_stops)


def gpu(index: int, node: str = "n", name: str = "NVIDIA H100 80GB HBM3") -> GpuInfo:
    return GpuInfo(index=index, uuid=f"GPU-{node}-{index}", name=name, memory_total_mb=81920)


def worker(worker_id: str, endpoint_id: str = "ep1", state: str = "idle", *, used_ms: int = NOW,
           started_ms: int = NOW - 60_000, jobs: list[str] | None = None, gpus: list[str] | None = None
           ) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, endpoint_id=endpoint_id, state=state,  # type: ignore[arg-type]
                      started_at_ms=started_ms, idle_since_ms=used_ms, jobs=jobs or [], gpu_uuids=gpus or [])


def parked(worker_id: str, endpoint_id: str = "ep1", **kw: object) -> WorkerInfo:
    return worker(worker_id, endpoint_id, "parked", **kw)  # type: ignore[arg-type]


def starts(plan) -> list[tuple[str, str, str, list[str]]]:
    return [(c.node_id, c.message.spec.id, c.message.worker_id, c.message.gpu_uuids) for c in plan.commands
            if isinstance(c.message, StartWorker)]


def stops(plan) -> list[tuple[str, bool]]:
    return [(c.message.worker_id, c.message.park) for c in plan.commands if isinstance(c.message, StopWorker)]


# -- tables --------------------------------------------------------------------------------------------


def test_a_parked_worker_is_not_one_of_its_endpoints_workers_and_is_resumed_first():
    nodes = [node("n1", workers=[parked("old", used_ms=NOW - 50), parked("new", used_ms=NOW - 10)]),
             node("n2")]
    assert live_workers(snap(nodes, [ep()])) == {}
    plan = place(snap(nodes, [ep(workers_max=3)], {"ep1": 1}), NOW, ids())
    assert starts(plan) == [("n1", "ep1", "new", [])]  # the most recently used, under its own id
    plan = place(snap(nodes, [ep(workers_max=3)], {"ep1": 3}), NOW, ids())
    assert starts(plan) == [("n1", "ep1", "new", []), ("n1", "ep1", "old", []), ("n1", "ep1", "w1", [])]


def test_a_parked_gpu_worker_is_resumed_with_its_own_gpus():
    nodes = [node("n1", gpus=[gpu(0, "n1"), gpu(1, "n1")], workers=[parked("p", gpus=["GPU-n1-1"])])]
    plan = place(snap(nodes, [ep(gpu_count=1, workers_max=2)], {"ep1": 1}), NOW, ids())
    assert starts(plan) == [("n1", "ep1", "p", ["GPU-n1-1"])]


def test_parked_workers_on_draining_or_backed_off_nodes_are_not_resumed():
    nodes = [node("d", draining=True, workers=[parked("a")]), node("b", workers=[parked("c")]), node("n")]
    plan = place(snap(nodes, [ep(workers_max=5)], {"ep1": 1}, backoff={"b": "refused"}), NOW, ids())
    assert starts(plan) == [("n", "ep1", "w1", [])]


def test_a_cpu_worker_is_resumed_only_where_a_slot_is_free_and_parked_ones_take_no_slot():
    full = node("n1", cpus=1, workers=[worker(f"x{i}", "other") for i in range(4)] + [parked("p")])
    plan = place(snap([full, node("n2", cpus=1)], [ep(workers_max=3), ep("other", workers_min=4)],
                      {"ep1": 1}), NOW, ids(), workers_per_cpu=4)
    assert starts(plan) == [("n2", "ep1", "w1", [])]  # n1 is full: a cold start elsewhere
    roomy = node("n1", cpus=1, workers=[worker("x0", "other")] + [parked(f"p{i}", "third") for i in range(5)])
    plan = place(snap([roomy], [ep(workers_min=3), ep("other", workers_min=1), ep("third", workers_max=9)]),
                 NOW, ids(), workers_per_cpu=4)
    assert len(starts(plan)) == 3  # five parked workers of another endpoint take none of the 4 slots


def test_surplus_workers_of_a_flash_endpoint_are_stopped_with_park():
    nodes = [node("n1", workers=[worker("f", "flash"), worker("s", "slow")])]
    plan = place(snap(nodes, [ep("flash", flashboot=True), ep("slow", flashboot=False)],
                      {"flash": 0, "slow": 0}), NOW, ids())
    assert sorted(stops(plan)) == [("f", True), ("s", False)]


def test_parked_workers_of_a_deleted_or_changed_endpoint_are_evicted():
    nodes = [node("n1", workers=[parked("gone", "deleted"), parked("stale", started_ms=NOW - 60_000),
                                 parked("fresh", started_ms=NOW - 1_000)])]
    plan = place(snap(nodes, [ep(updated_at_ms=NOW - 5_000, workers_max=5)]), NOW, ids())
    assert sorted(stops(plan)) == [("gone", False), ("stale", False)]


def test_parked_workers_reporting_a_launch_key_are_evicted_only_when_what_runs_changed():
    spec = ep(command=["python", "h.py"], env={"A": "1"}, workers_max=5, updated_at_ms=NOW)
    same = launch_key(msgspec.structs.replace(spec, workers_max=9, idle_timeout_s=60))
    assert same == launch_key(spec)  # scaling fields are not part of it
    other = launch_key(msgspec.structs.replace(spec, env={"A": "2"}))
    gpus = launch_key(msgspec.structs.replace(spec, gpu_count=1))
    assert len({same, other, gpus}) == 3
    nodes = [node("n1", workers=[
        msgspec.structs.replace(parked("kept", started_ms=NOW - 60_000), launch_key=same),
        msgspec.structs.replace(parked("env", started_ms=NOW - 60_000), launch_key=other),
        msgspec.structs.replace(parked("gpu", started_ms=NOW - 60_000), launch_key=gpus)])]
    plan = place(snap(nodes, [spec]), NOW, ids())
    assert sorted(stops(plan)) == [("env", False), ("gpu", False)]


def test_live_and_parked_stay_within_workers_max_least_recently_used_evicted():
    nodes = [node("n1", workers=[worker("live1"), worker("live2", jobs=["j"], state="running"),
                                 parked("p1", used_ms=NOW - 30), parked("p2", used_ms=NOW - 10),
                                 parked("p3", used_ms=NOW - 20)])]
    plan = place(snap(nodes, [ep(workers_max=3)], {"ep1": 2}), NOW, ids())
    assert sorted(stops(plan)) == [("p1", False), ("p3", False)]


def test_a_pending_resume_counts_once_and_is_not_resumed_again():
    nodes = [node("n1", workers=[parked("p")])]
    resuming = [PendingStart(worker_id="p", endpoint_id="ep1", node_id="n1")]
    plan = place(snap(nodes, [ep(workers_max=2)], {"ep1": 1}, pending_starts=resuming), NOW, ids())
    assert plan.commands == []
    use = ledger(snap(nodes, [ep()], pending_starts=resuming))
    assert use["n1"].workers == 1  # it takes its slot again


def test_gpus_of_parked_workers_are_held_and_free_gpus_are_preferred():
    nodes = [node("a", gpus=[gpu(0, "a")], workers=[parked("pa", "other", gpus=["GPU-a-0"])]),
             node("b", gpus=[gpu(0, "b"), gpu(1, "b")], workers=[worker("x", "busy", gpus=["GPU-b-0"])])]
    endpoints = [ep(gpu_count=1), ep("other", gpu_count=1, workers_max=2), ep("busy", gpu_count=1, workers_min=1)]
    plan = place(snap(nodes, endpoints, {"ep1": 1}), NOW, ids())
    assert starts(plan) == [("b", "ep1", "w1", ["GPU-b-1"])]  # the free GPU, not the parked one


def test_a_gpu_held_only_by_another_endpoints_parked_worker_is_given_when_nothing_else_fits():
    nodes = [node("a", gpus=[gpu(0, "a"), gpu(1, "a")],
                  workers=[parked("pa", "other", gpus=["GPU-a-0", "GPU-a-1"])]),
             node("b", gpus=[gpu(0, "b")], workers=[worker("live", "busy", gpus=["GPU-b-0"])])]
    endpoints = [ep(gpu_count=1, workers_max=2), ep("other", gpu_count=2, workers_max=1),
                 ep("busy", gpu_count=1, workers_min=1)]
    plan = place(snap(nodes, endpoints, {"ep1": 2}), NOW, ids())
    # The first takes a parked GPU (the node evicts `pa`); its other GPU is not handed out
    # before the node reports it free, and a live worker's GPU never is.
    assert starts(plan) == [("a", "ep1", "w1", ["GPU-a-0"])]
    assert [(u.endpoint_id, u.missing) for u in plan.unplaced] == [("ep1", 1)]
    assert stops(plan) == []  # no StopWorker: the StartWorker makes the node evict it


def test_an_endpoints_own_parked_gpu_worker_is_resumed_not_evicted():
    nodes = [node("a", gpus=[gpu(0, "a")], workers=[parked("mine", gpus=["GPU-a-0"])])]
    plan = place(snap(nodes, [ep(gpu_count=1, workers_max=2)], {"ep1": 2}), NOW, ids())
    assert starts(plan) == [("a", "ep1", "mine", ["GPU-a-0"])]
    assert [(u.endpoint_id, u.missing) for u in plan.unplaced] == [("ep1", 1)]


def test_fewest_parked_workers_are_evicted():
    one = node("a", gpus=[gpu(0, "a"), gpu(1, "a")], workers=[parked("big", "o1", gpus=["GPU-a-0", "GPU-a-1"])])
    two = node("b", gpus=[gpu(0, "b"), gpu(1, "b")],
               workers=[parked("s1", "o2", gpus=["GPU-b-0"]), parked("s2", "o3", gpus=["GPU-b-1"])])
    endpoints = [ep(gpu_count=2), *(ep(o, gpu_count=1, workers_max=3) for o in ("o1", "o2", "o3"))]
    plan = place(snap([two, one], endpoints, {"ep1": 1}), NOW, ids())
    assert starts(plan) == [("a", "ep1", "w1", ["GPU-a-0", "GPU-a-1"])]


def test_pending_stops_with_park_end_when_parked_or_busy():
    pending = Pending(timeout_ms=30_000, backoff_ms=5_000)
    for wid, park in (("a", True), ("b", True), ("c", False), ("d", True)):
        pending.stop_sent(PendingStop(worker_id=wid, endpoint_id="ep1", node_id="n1", sent_at_ms=NOW, park=park))
    alive = {"n1": node("n1", workers=[parked("a"), worker("b"), parked("c"),
                                       worker("d", state="running", jobs=["j"])])}
    pending.reconcile(alive, NOW + 1)
    assert sorted(pending.stops) == ["b", "c"]  # an eviction of a parked worker waits for it to go


def test_a_pending_resume_ends_once_the_worker_is_no_longer_parked():
    pending = Pending(timeout_ms=30_000, backoff_ms=5_000)
    pending.start_sent(PendingStart(worker_id="p", endpoint_id="ep1", node_id="n1", sent_at_ms=NOW))
    pending.reconcile({"n1": node("n1", workers=[parked("p")])}, NOW + 1)
    assert list(pending.starts) == ["p"]
    pending.reconcile({"n1": node("n1", workers=[worker("p")])}, NOW + 2)
    assert pending.starts == {}


# -- properties -------------------------------------------------------------------------------------

GPU_NAMES = ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"]
TYPE_IDS = ["H100", "A100"]
ENDPOINTS = ["e1", "e2", "e3"]


@st.composite
def clusters(draw) -> Snapshot:
    endpoints = []
    for endpoint_id in draw(st.lists(st.sampled_from(ENDPOINTS), unique=True, max_size=3)):
        lo = draw(st.integers(0, 2))
        endpoints.append(ep(endpoint_id, workers_min=lo, workers_max=lo + draw(st.integers(0, 3)),
                            gpu_count=draw(st.sampled_from([0, 1, 1, 2])), flashboot=draw(st.booleans()),
                            gpu_type_ids=draw(st.lists(st.sampled_from(TYPE_IDS), unique=True, max_size=2)),
                            updated_at_ms=draw(st.sampled_from([0, NOW - 30_000]))))
    targets = {e.id: draw(st.integers(0, 6)) for e in endpoints if draw(st.booleans())}
    nodes, pending_starts, pending_stops = [], [], []
    serial = itertools.count()
    for i in range(draw(st.integers(0, 3))):
        node_id = f"n{i}"
        gpus = [gpu(j, node_id, draw(st.sampled_from(GPU_NAMES))) for j in range(draw(st.integers(0, 4)))]
        free = [g.uuid for g in gpus]
        workers = []
        for _ in range(draw(st.integers(0, 5))):
            endpoint_id = draw(st.sampled_from([*ENDPOINTS, "deleted"]))
            take = draw(st.integers(0, min(2, len(free))))
            held, free = free[:take], free[take:]
            state = draw(st.sampled_from(["starting", "idle", "running", "stopping", "parked", "parked"]))
            worker_id = f"x{next(serial)}"
            workers.append(worker(worker_id, endpoint_id, state, gpus=held,
                                  used_ms=draw(st.integers(NOW - 100_000, NOW)),
                                  started_ms=draw(st.sampled_from([NOW - 60_000, NOW - 1_000])),
                                  jobs=["j"] if state == "running" or draw(st.booleans()) and state == "idle"
                                  else []))
            if state == "parked" and draw(st.integers(0, 5)) == 0:
                if draw(st.booleans()):
                    pending_starts.append(PendingStart(worker_id=worker_id, endpoint_id=endpoint_id,
                                                       node_id=node_id, gpu_uuids=held))
                else:
                    pending_stops.append(PendingStop(worker_id=worker_id, endpoint_id=endpoint_id,
                                                     node_id=node_id))
        if free and draw(st.booleans()):
            pending_starts.append(PendingStart(worker_id=f"p{next(serial)}", node_id=node_id, gpu_uuids=free[:1],
                                               endpoint_id=draw(st.sampled_from(ENDPOINTS))))
        nodes.append(node(node_id, cpus=draw(st.integers(1, 3)), gpus=gpus, workers=workers,
                          draining=draw(st.booleans()) and draw(st.booleans())))
    return snap(nodes, endpoints, targets, pending_starts=pending_starts, pending_stops=pending_stops)


def _reported(snapshot: Snapshot) -> dict[str, tuple[str, WorkerInfo]]:
    return {w.worker_id: (n.node_id, w) for n in snapshot.nodes.values() for w in n.workers}


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_same_snapshot_same_plan(snapshot):
    assert_same_snapshot_same_plan(snapshot)


@settings(max_examples=400, deadline=None)
@given(clusters())
def test_gpus_never_oversubscribed_and_evictions_only_take_other_endpoints_parked_gpus(snapshot):
    plan = place(snapshot, NOW, ids(), workers_per_cpu=1)
    reported = _reported(snapshot)
    holder = {u: w for _, w in reported.values() for u in w.gpu_uuids}
    busy = {p.worker_id for p in [*snapshot.pending_starts, *snapshot.pending_stops]}
    held = Counter(list(holder))
    held.update(u for p in snapshot.pending_starts if p.worker_id not in reported for u in p.gpu_uuids)
    evicted: set[str] = set()
    for command in plan.commands:
        message = command.message
        if not isinstance(message, StartWorker):
            continue
        if message.worker_id in reported:  # a resume: the parked worker, where it is, with its GPUs
            node_id, info = reported[message.worker_id]
            assert info.state == "parked" and info.endpoint_id == message.spec.id
            assert command.node_id == node_id and message.gpu_uuids == info.gpu_uuids
            assert message.worker_id not in busy and message.worker_id not in evicted
            continue
        target = snapshot.nodes[command.node_id]
        assert not target.draining and len(message.gpu_uuids) == message.spec.gpu_count
        for u in message.gpu_uuids:
            if held[u]:  # only a GPU of another endpoint's parked worker, which the node evicts
                owner = holder[u]
                assert owner.state == "parked" and owner.endpoint_id != message.spec.id
                assert owner.worker_id not in busy and owner.worker_id not in evicted
                evicted.add(owner.worker_id)
                held.subtract(owner.gpu_uuids)
            held[u] += 1
    assert all(n <= 1 for n in held.values()), held
    # An evicted worker is neither resumed nor stopped by the same plan.
    assert not evicted & {c.message.worker_id for c in plan.commands if isinstance(c.message, StopWorker)}


@settings(max_examples=400, deadline=None)
@given(clusters())
def test_stops_and_counts_with_parked_workers(snapshot):
    plan = place(snapshot, NOW, ids())
    reported = _reported(snapshot)
    live = live_workers(snapshot)
    plan = without_fair_share_stops(plan, snapshot)
    unplaced = {u.endpoint_id for u in plan.unplaced}
    for command in plan.commands:
        message = command.message
        if isinstance(message, StopWorker):
            info = reported[message.worker_id][1]
            spec = snapshot.endpoints.get(info.endpoint_id)
            if info.state == "parked":  # an eviction
                assert not message.park
            else:  # a surplus idle worker, parked by the node if its endpoint is a flash one
                assert info.state == "idle" and not info.jobs
                assert message.park == (spec is not None and spec.flashboot)
    for spec in snapshot.endpoints.values():
        want = desired_workers(spec, snapshot.targets.get(spec.id))
        mine = [c.message for c in plan.commands if c.endpoint_id == spec.id]
        started = sum(1 for m in mine if isinstance(m, StartWorker))
        stopped = sum(1 for m in mine if isinstance(m, StopWorker) and reported[m.worker_id][1].state != "parked")
        after = len(live.get(spec.id, [])) + started - stopped
        assert not (started and stopped)
        if started:
            assert after <= want
        if spec.id not in unplaced:
            assert after >= want


@settings(max_examples=300, deadline=None)
@given(clusters(), st.lists(st.sampled_from(ENDPOINTS), max_size=10))
def test_the_heaps_choose_exactly_what_a_scan_chooses_with_parked_workers(snapshot, turns):
    assert_heaps_choose_what_a_scan_chooses(snapshot, turns)

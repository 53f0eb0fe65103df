"""Fair share: contended GPUs are divided by endpoint weight (counting what each holds),
no endpoint starves whatever the weights, and a GPU quota caps an endpoint."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from runplane_proto.nodes import GpuInfo, StartWorker, StopWorker, WorkerInfo
from runplane_scheduler.cluster import PendingStop
from runplane_scheduler.placement import place

from placement_fixtures import NOW, ep, ids, node, snap


def gpus(node_id: str, n: int) -> list[GpuInfo]:
    return [GpuInfo(index=i, uuid=f"GPU-{node_id}-{i}", name="NVIDIA H100 80GB HBM3", memory_total_mb=81920)
            for i in range(n)]


def started(plan) -> Counter:
    return Counter(c.endpoint_id for c in plan.commands if isinstance(c.message, StartWorker))


def test_contended_gpus_are_divided_by_weight():
    nodes = [node("n1", gpus=gpus("n1", 8)), node("n2", gpus=gpus("n2", 8))]
    endpoints = [ep("a", gpu_count=1, weight=1, workers_max=16), ep("b", gpu_count=1, weight=3, workers_max=16)]
    plan = place(snap(nodes, endpoints, {"a": 16, "b": 16}), NOW, ids())
    assert started(plan) == {"a": 4, "b": 12}
    assert {u.endpoint_id for u in plan.unplaced} == {"a", "b"}


def test_what_an_endpoint_already_holds_counts_toward_its_share():
    held = [WorkerInfo(worker_id=f"a{i}", endpoint_id="a", state="running", started_at_ms=NOW, jobs=["j"],
                       gpu_uuids=[f"GPU-n1-{i}"]) for i in range(4)]
    nodes = [node("n1", gpus=gpus("n1", 8), workers=held)]
    endpoints = [ep("a", gpu_count=1, workers_max=8), ep("b", gpu_count=1, workers_max=8)]
    assert started(place(snap(nodes, endpoints, {"a": 8, "b": 8}), NOW, ids())) == {"b": 4}


def test_no_endpoint_starves_whatever_the_weights():
    nodes = [node("n1", gpus=gpus("n1", 4))]
    endpoints = [ep("heavy", gpu_count=1, weight=1000, workers_max=8), ep("light", gpu_count=1, weight=1, workers_max=8)]
    assert started(place(snap(nodes, endpoints, {"heavy": 8, "light": 8}), NOW, ids())) == {"heavy": 3, "light": 1}


def test_weights_count_gpus_not_workers():
    nodes = [node("n1", gpus=gpus("n1", 8))]
    endpoints = [ep("big", gpu_count=2, workers_max=8), ep("small", gpu_count=1, workers_max=8)]
    assert started(place(snap(nodes, endpoints, {"big": 8, "small": 8}), NOW, ids())) == {"big": 2, "small": 4}


def test_a_gpu_quota_caps_the_endpoint_and_says_so():
    nodes = [node("n1", gpus=gpus("n1", 8))]
    plan = place(snap(nodes, [ep("q", gpu_count=2, gpu_quota=5, workers_max=8)], {"q": 4}), NOW, ids())
    assert started(plan) == {"q": 2}  # 5 GPUs of quota: two workers of 2 GPUs
    [unplaced] = plan.unplaced
    assert unplaced.missing == 2 and "GPU quota (5 GPUs)" in unplaced.reason


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=20), min_size=2, max_size=5),
       st.integers(min_value=4, max_value=48))
def test_under_contention_every_share_is_within_one_worker_of_its_weighted_part(weights, total):
    n_nodes = -(-total // 8)
    nodes = [node(f"n{i}", gpus=gpus(f"n{i}", min(8, total - 8 * i))) for i in range(n_nodes)]
    endpoints = [ep(f"e{i}", gpu_count=1, weight=w, workers_max=100) for i, w in enumerate(weights)]
    got = started(place(snap(nodes, endpoints, {e.id: 100 for e in endpoints}), NOW, ids()))
    assert sum(got.values()) == total  # everything is used
    if total >= len(weights):
        assert all(got[e.id] >= 1 for e in endpoints)  # nobody starves
    # Each endpoint's last worker went to the smallest weighted share at that moment: no
    # endpoint with more than its first worker is ahead of another by more than one worker.
    for a in endpoints:
        for b in endpoints:
            if got[a.id] > 1:
                assert got[a.id] / a.weight <= (got[b.id] + 1) / b.weight, (got, weights, total)


# -- fair share over time: idle workers of endpoints above their share give way --------------------


def idle(worker_id: str, endpoint_id: str, gpu: str, busy: bool = False) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, endpoint_id=endpoint_id, state="running" if busy else "idle",
                      started_at_ms=NOW - 1000, idle_since_ms=NOW - 1000, jobs=["j"] if busy else [],
                      gpu_uuids=[gpu])


def stops(plan) -> list[str]:
    return [c.message.worker_id for c in plan.commands if isinstance(c.message, StopWorker)]


def test_an_endpoint_that_came_late_gets_its_share_from_idle_workers_of_one_above_it():
    workers = [idle(f"a{i}", "a", f"GPU-n1-{i}") for i in range(8)]
    nodes = [node("n1", gpus=gpus("n1", 8), workers=workers)]
    endpoints = [ep("a", gpu_count=1, workers_max=8), ep("b", gpu_count=1, workers_max=8)]
    plan = place(snap(nodes, endpoints, {"a": 8, "b": 4}), NOW, ids())
    assert len(stops(plan)) == 1 and stops(plan)[0].startswith("a")
    [stop] = [c for c in plan.commands if isinstance(c.message, StopWorker)]
    assert stop.message.only_if_idle and "fair share" in stop.message.reason
    # Busy workers are never stopped for it; nor is a second stop sent while one is in flight.
    busy = [node("n1", gpus=gpus("n1", 8), workers=[idle(f"a{i}", "a", f"GPU-n1-{i}", busy=True) for i in range(8)])]
    assert stops(place(snap(busy, endpoints, {"a": 8, "b": 4}), NOW, ids())) == []
    in_flight = snap(nodes, endpoints, {"a": 8, "b": 4}, pending_stops=[
        PendingStop(worker_id="a0", endpoint_id="a", node_id="n1")])
    assert stops(place(in_flight, NOW, ids())) == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5), min_size=2, max_size=4),
       st.lists(st.integers(min_value=1, max_value=12), min_size=4, max_size=4))
def test_rounds_converge_to_the_weighted_parts_and_then_change_nothing(weights, wanted):
    """Endpoints arrive one after another on a full pool; rounds apply each plan (stops take
    effect, starts become idle workers) until nothing changes (no further round starts or
    stops anything): then the pool is used, none starves, and no endpoint holds more than
    one worker beyond the weighted share of one that still wants more."""
    pool = 12
    endpoints = [ep(f"e{i}", gpu_count=1, weight=w, workers_max=12) for i, w in enumerate(weights)]
    targets = {e.id: wanted[i] for i, e in enumerate(endpoints)}
    workers: dict[str, WorkerInfo] = {}
    new_id = ids()
    for arrived in range(1, len(endpoints) + 1):
        for _ in range(30):
            n = node("n1", gpus=gpus("n1", pool), workers=list(workers.values()))
            plan = place(snap([n], endpoints[:arrived], {e.id: targets[e.id] for e in endpoints[:arrived]}),
                         NOW, new_id)
            if not plan.commands:
                break
            for c in plan.commands:
                if isinstance(c.message, StopWorker):
                    workers.pop(c.message.worker_id, None)
                else:
                    workers[c.message.worker_id] = idle(c.message.worker_id, c.endpoint_id, c.message.gpu_uuids[0])
        else:
            raise AssertionError(f"no steady state: {plan.commands}")
    held = Counter(w.endpoint_id for w in workers.values())
    assert sum(held.values()) == min(pool, sum(targets.values()))  # the pool is used
    for a in endpoints:
        assert held[a.id] >= min(1, targets[a.id])  # none starves
        for b in endpoints:
            if held[b.id] < targets[b.id] and held[a.id] >= 2:
                # b still wants more: a holds at most one worker beyond b's weighted share.
                assert (held[a.id] - 1) / a.weight < (held[b.id] + 1) / b.weight, (held, targets, weights)

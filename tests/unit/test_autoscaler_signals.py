"""The sampler's arithmetic: workers and their low-priority jobs from node status, and one
endpoint's signals from what its consumer, its stream and the nodes say."""

from __future__ import annotations

from runplane_autoscaler.signals import QueueSample, WorkerCounts, signals_of, worker_counts
from runplane_proto.nodes import NodeStatus, WorkerInfo

NOW = 1_000_000_000


def node(node_id: str, heartbeat_at_ms: int, *workers: WorkerInfo) -> NodeStatus:
    return NodeStatus(node_id=node_id, hostname=node_id, runtime="process", heartbeat_at_ms=heartbeat_at_ms,
                      workers=list(workers))


def worker(worker_id: str, state: str, jobs: tuple[str, ...] = (), low: tuple[str, ...] = (),
           endpoint_id: str = "ep1") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, endpoint_id=endpoint_id, state=state, started_at_ms=0,  # type: ignore[arg-type]
                      jobs=list(jobs), low_priority_jobs=list(low))


def test_worker_counts_on_live_nodes_with_their_low_priority_jobs():
    counts = worker_counts([
        node("n1", NOW - 500, worker("w1", "running", ("a", "b"), ("b",)), worker("w2", "idle"),
             worker("w3", "starting"), worker("w4", "stopping", ("c",), ("c",)),
             worker("x1", "idle", endpoint_id="ep2")),
        node("n2", NOW - 60_000, worker("w5", "running", ("d",), ("d",))),  # lost: not counted
    ], NOW, node_loss_timeout_ms=10_000)
    # A stopping worker is no capacity, but the low-priority job it still holds is in progress.
    assert counts["ep1"] == WorkerCounts(total=3, busy=1, idle=1, low_priority_jobs=2)
    assert counts["ep2"] == WorkerCounts(total=1, busy=0, idle=1, low_priority_jobs=0)


def test_signals_of_one_sample():
    sample = QueueSample(pending=4, ack_pending=2, normal_unacked=3, oldest_queued_at_ms=NOW - 1_500)
    signals = signals_of(sample, WorkerCounts(total=2, busy=2, low_priority_jobs=1), NOW)
    assert (signals.in_queue, signals.in_progress, signals.low_in_queue, signals.low_in_progress) == (2, 1, 2, 1)
    assert signals.oldest_queued_age_ms == 1_500 and signals.workers_busy == 2


def test_only_low_priority_jobs_waiting_is_no_queue():
    sample = QueueSample(pending=5, ack_pending=0, normal_unacked=0, oldest_queued_at_ms=None)
    signals = signals_of(sample, WorkerCounts(), NOW)
    assert (signals.in_queue, signals.in_progress, signals.oldest_queued_age_ms) == (0, 0, 0)
    assert signals.low_in_queue == 5

"""Sample the world for the policy: queue depth and age from JetStream, workers from node status.

Per endpoint: the consumer's counts (both queues), the stream's count of the normal queue,
and the oldest normal message; low-priority jobs are the difference (see
`policy.split_by_priority`), so they never look like demand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nats.js.errors import NotFoundError

from runplane_autoscaler.policy import QueueCounts, Signals, split_by_priority
from runplane_bus import Bus
from runplane_bus.topology import job_consumer_outdated
from runplane_proto import subjects
from runplane_proto.nodes import NodeStatus


@dataclass(frozen=True)
class WorkerCounts:
    total: int = 0
    busy: int = 0
    idle: int = 0
    # Low-priority jobs the endpoint's workers hold.
    low_priority_jobs: int = 0


def worker_counts(nodes: Iterable[NodeStatus], now_ms: int,
                  node_loss_timeout_ms: int) -> dict[str, WorkerCounts]:
    """Workers per endpoint on nodes whose heartbeat is fresh.

    A stopping worker is not counted (its low-priority jobs are); a worker holding a job
    (or `running`) is busy.
    """
    counts: dict[str, list[int]] = {}
    for node in nodes:
        if now_ms - node.heartbeat_at_ms > node_loss_timeout_ms:
            continue
        for worker in node.workers:
            total_busy_idle_low = counts.setdefault(worker.endpoint_id, [0, 0, 0, 0])
            total_busy_idle_low[3] += len(worker.low_priority_jobs)
            if worker.state == "stopping":
                continue
            total_busy_idle_low[0] += 1
            if worker.state == "running" or worker.jobs:
                total_busy_idle_low[1] += 1
            elif worker.state == "idle":
                total_busy_idle_low[2] += 1
    return {ep: WorkerCounts(*c) for ep, c in counts.items()}


@dataclass(frozen=True)
class QueueSample:
    """What the endpoint's consumer and stream say, and when the oldest normal job was queued."""

    pending: int
    ack_pending: int
    normal_unacked: int
    oldest_queued_at_ms: int | None


async def normal_queue_counts(bus: Bus) -> dict[str, int]:
    """Messages on each endpoint's normal queue subject (jobs not finished yet), one request
    for the whole fleet."""
    stream = await bus.js.stream_info(subjects.STREAM_JOBS, subjects_filter=subjects.ALL_NORMAL_JOB_QUEUES)
    return dict(stream.state.subjects or {})


async def job_consumer_infos(bus: Bus) -> dict[str, Any]:
    """Every consumer of the jobs stream by name, a page (256) per request instead of one
    request per endpoint."""
    infos: dict[str, Any] = {}
    while True:
        page = await bus.js.consumers_info(subjects.STREAM_JOBS, offset=len(infos))
        infos.update((info.name, info) for info in page)
        if len(page) < CONSUMER_PAGE or not page:
            return infos


CONSUMER_PAGE = 256


async def sample_queue(bus: Bus, endpoint_id: str, *, ack_wait_s: float,
                       normal_counts: dict[str, int] | None = None, info: Any = None) -> QueueSample:
    """Read the endpoint's durable consumer (creating or updating it if needed), the number
    of messages on its normal queue, and the oldest normal message not delivered yet.
    `info`, when given, is the consumer's info read moments ago."""
    durable = subjects.job_consumer(endpoint_id)
    normal_queue = subjects.job_queue(endpoint_id)
    if info is None:
        try:
            info = await bus.js.consumer_info(subjects.STREAM_JOBS, durable)
        except NotFoundError:
            await bus.ensure_job_consumer(endpoint_id, ack_wait_s=ack_wait_s)
            info = await bus.js.consumer_info(subjects.STREAM_JOBS, durable)
    if job_consumer_outdated(info.config, endpoint_id):  # made by an older version
        await bus.ensure_job_consumer(endpoint_id, ack_wait_s=ack_wait_s)
    if normal_counts is None:
        normal_counts = (await bus.js.stream_info(subjects.STREAM_JOBS, subjects_filter=normal_queue)
                         ).state.subjects or {}
    pending = info.num_pending or 0
    normal_unacked = normal_counts.get(normal_queue, 0)
    oldest_at_ms: int | None = None
    if pending and normal_unacked:
        next_seq = (info.delivered.stream_seq if info.delivered else 0) + 1
        try:
            msg = await bus.js.get_msg(subjects.STREAM_JOBS, seq=next_seq, subject=normal_queue, next=True)
        except NotFoundError:  # only low-priority jobs wait, or the normal ones were taken meanwhile
            msg = None
        if msg is not None and msg.time is not None:
            oldest_at_ms = int(msg.time.timestamp() * 1000)
    return QueueSample(pending, info.num_ack_pending or 0, normal_unacked, oldest_at_ms)


def signals_of(queue: QueueSample, workers: WorkerCounts, now_ms: int) -> Signals:
    """The policy's view of one endpoint from one sample."""
    split = split_by_priority(QueueCounts(
        pending=queue.pending, ack_pending=queue.ack_pending, normal_unacked=queue.normal_unacked,
        normal_waiting=queue.oldest_queued_at_ms is not None, low_running_reported=workers.low_priority_jobs,
    ))
    age_ms = 0 if queue.oldest_queued_at_ms is None else max(0, now_ms - queue.oldest_queued_at_ms)
    return Signals(
        in_queue=split.in_queue, in_progress=split.in_progress, oldest_queued_age_ms=age_ms,
        workers_total=workers.total, workers_busy=workers.busy, workers_idle=workers.idle,
        low_in_queue=split.low_in_queue, low_in_progress=split.low_in_progress,
    )


async def sample(bus: Bus, endpoint_ids: Iterable[str], now_ms: int, *, ack_wait_s: float,
                 node_loss_timeout_ms: int, nodes: Iterable[NodeStatus] | None = None,
                 ) -> tuple[dict[str, Signals], dict[str, BaseException]]:
    """Signals for each endpoint; endpoints whose queue could not be read are returned as errors.
    `nodes` (e.g. from a mirror) saves reading every node's status."""
    if nodes is None:
        nodes = [status async for _, status in bus.nodes.items()]
    workers = worker_counts(nodes, now_ms, node_loss_timeout_ms)
    ids = list(endpoint_ids)
    # Read before the consumers: a job queued in between counts as low-priority for one round
    # (never the other way round).
    normal_counts = await normal_queue_counts(bus)
    infos = await job_consumer_infos(bus)
    results = await asyncio.gather(*(
        sample_queue(bus, ep, ack_wait_s=ack_wait_s, normal_counts=normal_counts,
                     info=infos.get(subjects.job_consumer(ep)))
        for ep in ids), return_exceptions=True)
    signals: dict[str, Signals] = {}
    errors: dict[str, BaseException] = {}
    for ep, result in zip(ids, results, strict=True):
        if isinstance(result, BaseException):
            errors[ep] = result
        else:
            signals[ep] = signals_of(result, workers.get(ep, WorkerCounts()), now_ms)
    return signals, errors

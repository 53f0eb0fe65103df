"""The scheduler against a real nats-server, with fake nodes made of the Bus."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from nats.aio.msg import Msg
from runplane_bus import Bus, BusSettings
from runplane_proto import subjects
from runplane_proto.codec import Codec, encode
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.ids import new_job_id
from runplane_proto.jobs import CancelJob, JobChanged, JobEvent, JobPolicy, JobRecord, WebhookDue
from runplane_proto.nodes import (
    CommandReply,
    GpuInfo,
    NodeCommand,
    NodeStatus,
    StartWorker,
    StopWorker,
    WorkerInfo,
)
from runplane_scheduler.janitor import Janitor
from runplane_scheduler.janitor_rules import Retention
from runplane_scheduler.loop import Scheduler
from runplane_scheduler.settings import SchedulerSettings
from runplane_testing.natsserver import env_with, free_port
from runplane_testing.waiting import async_wait_until

SETTINGS = SchedulerSettings(schedule_interval_s=0.1, node_loss_timeout_s=1.5, command_timeout_s=2.0)


def now_ms() -> int:
    return int(time.time() * 1000)


class FakeNode:
    """A node agent reduced to its bus contract: answers commands, reports its workers."""

    def __init__(self, bus: Bus, node_id: str, *, cpus: int = 4, gpus: list[GpuInfo] | None = None) -> None:
        self.bus = bus
        self.node_id = node_id
        self.cpus = cpus
        self.gpus = gpus or []
        self.workers: dict[str, WorkerInfo] = {}
        self.started: list[StartWorker] = []
        self._task: asyncio.Task[None] | None = None
        self._sub = None

    async def start(self) -> FakeNode:
        self._sub = await self.bus.subscribe(subjects.node_cmd(self.node_id), Codec(NodeCommand),
                                             self._on_command)
        await self.report()
        self._task = asyncio.create_task(self._heartbeat())
        return self

    async def _on_command(self, command: StartWorker | StopWorker, msg) -> None:
        if isinstance(command, StartWorker):
            self.started.append(command)
            self.workers.setdefault(command.worker_id, WorkerInfo(
                worker_id=command.worker_id, endpoint_id=command.spec.id, state="idle",
                started_at_ms=now_ms(), idle_since_ms=now_ms(), gpu_uuids=command.gpu_uuids))
        else:
            self.workers.pop(command.worker_id, None)
        await msg.respond(encode(CommandReply(ok=True)))
        await self.report()

    async def report(self) -> None:
        await self.bus.nodes.put(subjects.node_key(self.node_id), NodeStatus(
            node_id=self.node_id, hostname=self.node_id, runtime="fake", cpu_count=self.cpus, gpus=self.gpus,
            workers=list(self.workers.values()), heartbeat_at_ms=now_ms()))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            await self.report()

    async def die(self) -> None:
        """Stop answering and heartbeating, as a crashed host would (its status stays in KV)."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub:
            await self._sub.unsubscribe()

    def of(self, endpoint_id: str) -> list[str]:
        return sorted(w.worker_id for w in self.workers.values() if w.endpoint_id == endpoint_id)


@contextlib.asynccontextmanager
async def running(nats_url: str, *loops) -> AsyncIterator[Bus]:
    """A bus for the test, and each `loop(bus) -> coroutine(stop)` running until the block ends."""
    bus = await Bus.connect(BusSettings(url=nats_url, name="test"))
    service_bus = await Bus.connect(BusSettings(url=nats_url, name="scheduler"))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(make(service_bus).run(stop)) for make in loops]
    try:
        yield bus
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await service_bus.close()
        await bus.close()


async def test_starts_workers_min_and_replaces_a_worker_that_disappears(nats_server):
    schedulers: list[Scheduler] = []

    def scheduler(bus: Bus) -> Scheduler:
        schedulers.append(Scheduler(bus, SETTINGS))
        return schedulers[-1]

    async with running(nats_server.url, scheduler) as bus:
        node = await FakeNode(bus, "n1").start()
        await bus.endpoints.put("ep1", EndpointSpec(id="ep1", name="ep1", workers_min=2))

        first = await eventually(lambda: _ready(node.of("ep1"), 2), what="2 workers started")
        # Until the node reports a started worker the start counts as pending (30 s), so let
        # the scheduler see both before one exits and the node stops reporting it.
        await eventually(lambda: not schedulers[0].pending.starts, what="starts reported")
        node.workers.pop(first[0])
        await node.report()
        after = await eventually(
            lambda: _ready(node.of("ep1") if first[0] not in node.of("ep1") else [], 2), what="a replacement")
        assert first[1] in after

        # Kept: more rounds change nothing.
        ticks = schedulers[0].ticks
        await eventually(lambda: _ready(schedulers[0].ticks >= ticks + 5), what="5 more rounds")
        assert node.of("ep1") == after and len(node.started) == 3


async def test_a_lost_nodes_workers_are_placed_on_another_node(nats_server):
    async with running(nats_server.url, lambda bus: Scheduler(bus, SETTINGS)) as bus:
        n1 = await FakeNode(bus, "n1").start()
        await bus.endpoints.put("ep1", EndpointSpec(id="ep1", name="ep1", workers_min=2))
        await eventually(lambda: _ready(n1.of("ep1"), 2), what="2 workers on n1")
        n2 = await FakeNode(bus, "n2").start()

        await n1.die()
        await eventually(lambda: _ready(n2.of("ep1"), 2), timeout_s=15, what="2 workers on n2")

        async def n1_forgotten() -> bool:
            return await bus.nodes.get(subjects.node_key("n1")) is None

        await async_wait_until(n1_forgotten, what="n1's status deleted")
        await n2.die()


async def test_gpu_workers_get_their_own_gpus(nats_server):
    gpus = [GpuInfo(index=i, uuid=f"GPU-{i}", name="NVIDIA H100 80GB HBM3", memory_total_mb=81920)
            for i in range(3)]
    async with running(nats_server.url, lambda bus: Scheduler(bus, SETTINGS)) as bus:
        node = await FakeNode(bus, "g1", gpus=gpus).start()
        await bus.endpoints.put("ep1", EndpointSpec(id="ep1", name="ep1", workers_min=3, workers_max=3,
                                                    gpu_count=1, gpu_type_ids=["H100"]))
        await eventually(lambda: _ready(node.of("ep1"), 3), what="3 GPU workers")
        held = sorted(u for w in node.workers.values() for u in w.gpu_uuids)
        assert held == ["GPU-0", "GPU-1", "GPU-2"]
        await node.die()


async def test_pending_workers_and_their_reason_are_published_until_capacity_appears(nats_server):
    h100 = [GpuInfo(index=0, uuid="GPU-h0", name="NVIDIA H100 80GB HBM3", memory_total_mb=81920)]
    a100 = [GpuInfo(index=i, uuid=f"GPU-a{i}", name="NVIDIA A100-SXM4-80GB", memory_total_mb=81920)
            for i in range(2)]
    async with running(nats_server.url, lambda bus: Scheduler(bus, SETTINGS)) as bus:
        small = await FakeNode(bus, "a1", gpus=a100).start()
        await bus.endpoints.put("ep1", EndpointSpec(id="ep1", name="ep1", workers_min=2, workers_max=2,
                                                    gpu_count=1, gpu_type_ids=["H100"]))

        async def pending():
            got = await bus.placement.get(subjects.placement_key("ep1"))
            return got.value if got else None

        status = await async_wait_until(pending, timeout_s=10, what="placement status written")
        assert status.pending_workers == 2 and status.since_ms > 0
        assert status.reason == ("no node has 1 free GPU(s) of ['H100']: "
                                 "a1: 2 of 2 GPUs free (NVIDIA A100-SXM4-80GB)")
        assert small.started == []
        big = await FakeNode(bus, "h1", gpus=h100).start()
        status = await async_wait_until(lambda: _pending_is(bus, 1), timeout_s=10,
                                        what="one worker placed, one pending")
        assert "h1: 0 of 1 GPUs free" in status.reason and "a1: 2 of 2 GPUs free" in status.reason
        # The status and the start command go out together: the node may hear of it a moment later.
        started = await eventually(lambda: _ready(big.started, 1), what="the start on h1")
        assert [s.gpu_uuids for s in started] == [["GPU-h0"]]
        big.gpus = h100 + [GpuInfo(index=1, uuid="GPU-h1", name="NVIDIA H100 80GB HBM3", memory_total_mb=81920)]
        await big.report()
        await eventually(lambda: _ready(big.of("ep1"), 2), what="both workers placed")
        await async_wait_until(lambda: _placement_gone(bus), timeout_s=10, what="placement status deleted")
        await small.die()
        await big.die()


async def _pending_is(bus: Bus, n: int):
    got = await bus.placement.get(subjects.placement_key("ep1"))
    return got.value if got and got.value.pending_workers == n else None


async def _placement_gone(bus: Bus) -> bool:
    return await bus.placement.get(subjects.placement_key("ep1")) is None


WAITING = "gwwaitingreplica"  # a gateway replica's token


def _record(job_id: str, status: str, **kw) -> JobRecord:
    base = {"submitted_at_ms": now_ms(), "policy": JobPolicy(execution_timeout_ms=60_000, ttl_ms=86_400_000)}
    base.update(kw)
    return JobRecord(id=job_id, endpoint_id="ep1", status=status, **base)


async def test_janitor_times_out_expired_queued_jobs_and_deletes_old_records(nats_server):
    retention = Retention(result_ms=5_000, sync_result_ms=2_000)
    async with running(nats_server.url, lambda bus: Janitor(bus, retention, interval_s=0.1)) as bus:
        events: list[JobChanged] = []
        cancels: list[CancelJob] = []

        async def on_event(event, _msg) -> None:
            events.append(event)

        async def on_cancel(cancel, _msg) -> None:
            cancels.append(cancel)

        # q1 is a /runsync job: the replica waiting for it hears its end from the store.
        q1 = new_job_id(sync=True, gateway=WAITING)
        republished: list[JobRecord] = []

        async def on_record(msg: Msg) -> None:
            republished.append(Codec(JobRecord).decode(msg.data))

        await bus.subscribe(subjects.job_events(q1), Codec(JobEvent), on_event)
        await bus.nc.subscribe(subjects.gateway_job_records(WAITING), cb=on_record)
        await bus.subscribe(subjects.job_cancel("ep1"), Codec(CancelJob), on_cancel)
        await bus.nc.flush()
        _, ref = await bus.payloads.save("old", "output", b'"' + b"x" * 300_000 + b'"')
        t = now_ms()
        short_ttl = JobPolicy(execution_timeout_ms=60_000, ttl_ms=1_000)
        records = {
            q1: _record(q1, "IN_QUEUE", submitted_at_ms=t - 5_000, policy=short_ttl, webhook="http://hook",
                        sync=True),
            "q2": _record("q2", "IN_QUEUE"),
            "old": _record("old", "COMPLETED", completed_at_ms=t - 10_000, output_ref=ref),
            "new": _record("new", "COMPLETED", completed_at_ms=t),
            "sync": _record("sync", "FAILED", completed_at_ms=t - 3_000, sync=True),
            "async": _record("async", "FAILED", completed_at_ms=t - 3_000),
        }
        for job_id, record in records.items():
            await bus.jobs.create(subjects.job_key("ep1", job_id), record)

        async def state(job_id: str) -> str | None:
            got = await bus.jobs.get(subjects.job_key("ep1", job_id))
            return None if got is None else got.value.status

        async def swept() -> bool:
            return (await state(q1) == "TIMED_OUT" and await state("old") is None
                    and await state("sync") is None)

        await async_wait_until(swept, what="the janitor's sweep")
        assert await state("q2") == "IN_QUEUE"
        assert await state("new") == "COMPLETED" and await state("async") == "FAILED"
        assert await bus.payloads.load(None, ref) is None

        timed_out = (await bus.jobs.get(subjects.job_key("ep1", q1))).value
        assert "TTL of 1000 ms" in timed_out.error
        await eventually(lambda: _ready(len(events) == 1 and len(republished) == 2 and cancels),
                         what="event, records and cancel")
        assert events[0].record == republished[1] == timed_out and republished[0].status == "IN_QUEUE"
        assert cancels[0].job_id == q1
        due = await bus.js.get_last_msg(subjects.STREAM_WEBHOOKS, subjects.webhook_due("ep1"))
        assert Codec(WebhookDue).decode(due.data) == WebhookDue(job_id=q1, endpoint_id="ep1")


@pytest.mark.timeout(60)
async def test_the_service_process_serves_metrics_and_places_workers(nats_server):
    port = free_port()
    env = env_with(RP_NATS_URL=nats_server.url, RP_METRICS_PORT=str(port), RP_SCHEDULE_INTERVAL_S="0.1",
                   RP_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "runplane_scheduler"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    bus = await Bus.connect(BusSettings(url=nats_server.url, name="test"))
    try:
        node = await FakeNode(bus, "n1").start()
        await bus.endpoints.put("ep1", EndpointSpec(id="ep1", name="ep1", workers_min=1))
        await eventually(lambda: _ready(node.of("ep1"), 1), timeout_s=30, what="a worker started")

        async def metrics() -> str:
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
                return (await http.get(f"http://127.0.0.1:{port}/metrics")).text

        text = await async_wait_until(metrics, what="/metrics")
        assert 'rp_scheduler_commands_total{command="start",result="ok"} 1.0' in text
        await node.die()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
        await bus.close()
    assert proc.returncode == 0, err.decode()[-3000:]


async def eventually(check, *, timeout_s: float = 10.0, what: str = "condition"):
    """Poll a plain (non-async) check without blocking the event loop."""

    async def poll():
        return check()

    return await async_wait_until(poll, timeout_s=timeout_s, what=what)


def _ready(value, n: int | None = None):
    """`value` when truthy (and of length `n` if given), else None: for polling waits."""
    if n is not None:
        return value if len(value) == n else None
    return value or None

"""Well-formed KV entries under a key that is not theirs (a garbled or forged put): the
scheduler and the autoscaler read each bucket by key, so such an entry never stands for
the endpoint or node it names. Real nats-server, the services' own loops in this process."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from runplane_autoscaler.loop import Autoscaler
from runplane_autoscaler.settings import AutoscalerSettings
from runplane_bus import Bus, BusSettings
from runplane_proto import subjects as s
from runplane_proto.codec import Codec
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.nodes import NodeCommand, NodeStatus, StartWorker
from runplane_proto.scaling import ScaleTarget
from runplane_scheduler.loop import Scheduler
from runplane_scheduler.settings import SchedulerSettings
from runplane_testing.waiting import async_wait_until

pytestmark = pytest.mark.fuzz


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.asynccontextmanager
async def _running(service):
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_scheduler_ignores_a_target_and_a_spec_under_another_key(nats_server):
    bus = await Bus.connect(BusSettings(url=nats_server.url, name="test"))
    service_bus = await Bus.connect(BusSettings(url=nats_server.url, name="scheduler"))
    try:
        ep = "real-ep"
        await bus.endpoints.put(ep, EndpointSpec(id=ep, name=ep, command=["true"], workers_max=3))
        await bus.endpoints.put("junk", EndpointSpec(id=ep, name="forged", command=["true"], workers_min=3,
                                                     workers_max=3))
        await bus.scale.put("forged", ScaleTarget(endpoint_id=ep, desired_workers=3))
        await bus.nodes.put("n1", NodeStatus(node_id="n1", hostname="h", runtime="process", cpu_count=4,
                                             heartbeat_at_ms=_now_ms()))
        starts: list[StartWorker] = []

        async def on_command(cmd: NodeCommand, _msg) -> None:
            if isinstance(cmd, StartWorker):
                starts.append(cmd)

        await bus.subscribe(s.node_cmd("n1"), Codec(NodeCommand), on_command)
        scheduler = Scheduler(service_bus, SchedulerSettings(schedule_interval_s=0.05))
        async with _running(scheduler):
            # Rounds with everything read (the mirrors load before the first one) start nothing.
            await async_wait_until(lambda: _ticked(scheduler, 5), what="five scheduler rounds")
            assert starts == []
            # The endpoint's own target is followed.
            await bus.scale.put(ep, ScaleTarget(endpoint_id=ep, desired_workers=2))
            await async_wait_until(lambda: _counted(starts, 2), what="two starts for the real target")
            assert {c.spec.name for c in starts} == {ep}
    finally:
        await service_bus.close()
        await bus.close()


async def test_autoscaler_ignores_a_spec_under_another_key(nats_server):
    bus = await Bus.connect(BusSettings(url=nats_server.url, name="test"))
    service_bus = await Bus.connect(BusSettings(url=nats_server.url, name="autoscaler"))
    try:
        ep = "real-ep"
        await bus.endpoints.put(ep, EndpointSpec(id=ep, name=ep, command=["true"], workers_max=3))
        await bus.endpoints.put("junk", EndpointSpec(id=ep, name="forged", command=["true"], workers_min=3,
                                                     workers_max=3))

        async def target() -> ScaleTarget | None:
            got = await bus.scale.get(ep)
            return got.value if got is not None else None

        async with _running(Autoscaler(service_bus, AutoscalerSettings(interval_s=0.05))):
            written = await async_wait_until(target, what="the endpoint's scale target")
            assert written.desired_workers == 0, written
            assert await bus.scale.get("junk") is None
    finally:
        await service_bus.close()
        await bus.close()


async def _ticked(service, n: int) -> bool:
    return service.ticks >= n


async def _counted(items: list, n: int) -> bool:
    return len(items) >= n

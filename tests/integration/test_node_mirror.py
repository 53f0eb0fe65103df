"""The scheduler's node mirror against a real nats-server: a mere heartbeat moves only the
heartbeat time of the status it holds (no full decode); a changed layout is decoded."""

from __future__ import annotations

import msgspec

from runplane_bus import Bus, BusSettings
from runplane_bus.mirror import Mirror
from runplane_proto import subjects
from runplane_proto.nodes import GpuInfo, NodeStatus, WorkerInfo
from runplane_scheduler.cluster import heartbeat
from runplane_testing.waiting import async_wait_until


def _status(**kw: object) -> NodeStatus:
    base = dict(node_id="n1", hostname="n1", runtime="process", cpu_count=4, started_at_ms=1, heartbeat_at_ms=1000,
                gpus=[GpuInfo(index=0, uuid="GPU-1", name="NVIDIA H100 80GB HBM3", memory_total_mb=81920)],
                workers=[WorkerInfo(worker_id="w1", endpoint_id="e1", state="idle", started_at_ms=1)],
                layout_version=1)
    return NodeStatus(**{**base, **kw})  # type: ignore[arg-type]


async def test_heartbeats_refresh_the_held_status_and_changes_replace_it(nats_server):
    bus = await Bus.connect(BusSettings(url=nats_server.url))
    seen: list[tuple[int, int]] = []
    try:
        key = subjects.node_key("n1")
        await bus.nodes.put(key, _status())
        mirror = await Mirror(bus.nodes, refresh=heartbeat,
                              on_change=lambda _, old, new: seen.append((new.heartbeat_at_ms, new.layout_version))
                              ).start()
        first = mirror.get(key)
        assert first is not None
        await bus.nodes.put(key, _status(heartbeat_at_ms=2000, memory_available_mb=7))

        async def beat_seen() -> bool:
            got = mirror.get(key)
            return got is not None and got.heartbeat_at_ms == 2000

        await async_wait_until(beat_seen, timeout_s=5, what="the heartbeat")
        beat = mirror.get(key)
        assert beat.workers is first.workers and beat.memory_available_mb == 0  # the held status, refreshed
        running = msgspec.structs.replace(first.workers[0], state="running", jobs=["j1"])
        await bus.nodes.put(key, _status(heartbeat_at_ms=3000, layout_version=2, workers=[running]))

        async def change_seen() -> bool:
            got = mirror.get(key)
            return got is not None and got.layout_version == 2

        await async_wait_until(change_seen, timeout_s=5, what="the change")
        assert mirror.get(key).workers == [running] and seen[-2:] == [(2000, 1), (3000, 2)]
        await mirror.stop()
    finally:
        await bus.close()

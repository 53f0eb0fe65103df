"""The scheduler's node mirror against a real nats-server: a mere heartbeat moves only the
heartbeat time of the status it holds (no full decode); a changed layout is decoded. And a
mirror on a 3-server cluster follows on soon after the server holding its watch dies."""

from __future__ import annotations

import contextlib
import time

import msgspec

from runplane_bus import Bus, BusSettings
from runplane_bus.mirror import Mirror
from runplane_proto import subjects
from runplane_proto.nodes import GpuInfo, NodeStatus, WorkerInfo
from runplane_scheduler.cluster import heartbeat
from runplane_testing.natscluster import NatsNode, nats_members
from runplane_testing.waiting import async_wait_until, wait_until


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


async def test_a_mirror_follows_on_after_the_server_holding_its_watch_is_killed(tmp_path):
    """The watch's consumer has one replica, on one server: when that server dies, the mirror
    must notice within seconds (short idle heartbeats) and carry on from where it was, not
    after the 10-20 s of nats-py's default 5 s heartbeats (the periodic resync is kept out of
    it here)."""
    servers = nats_members(tmp_path)
    try:
        for server in servers:
            server.start()
        wait_until(lambda: all(_meta_leader(server) for server in servers), timeout_s=60, interval_s=0.2,
                   what="a JetStream meta leader")
        bus = await Bus.connect(BusSettings(url=",".join(server.url for server in servers), replicas=3))
        try:
            key = subjects.node_key("n1")
            await bus.nodes.put(key, _status())
            mirror = await Mirror(bus.nodes, resync_s=3600).start()
            assert mirror.get(key) is not None
            holder = (await mirror._watcher.consumer_info()).cluster.leader
            victim = next(server for server in servers if server.name == holder)
            victim.kill()
            killed = time.monotonic()
            put_s: list[float] = []

            async def put_seen() -> bool:
                if not put_s:
                    with contextlib.suppress(Exception):  # the bucket may be electing a leader
                        await bus.nodes.put(key, _status(heartbeat_at_ms=2000))
                        put_s.append(time.monotonic() - killed)
                got = mirror.get(key)
                return got is not None and got.heartbeat_at_ms == 2000

            await async_wait_until(put_seen, timeout_s=30, interval_s=0.2, what="a put after the kill")
            seen_s = time.monotonic() - killed
            print(f"watch consumer on {holder}: a later put (written {put_s[0]:.1f} s after the kill) "
                  f"seen {seen_s:.1f} s after the kill")
            # 2-4 s to notice the lost consumer, plus a re-election; old heartbeats took 10-20 s.
            assert seen_s < 9, seen_s
            await mirror.stop()
        finally:
            await bus.close()
    finally:
        for server in servers:
            server.stop()


def _meta_leader(server: NatsNode) -> bool:
    try:
        return bool((server.monitor("/jsz").get("meta_cluster") or {}).get("leader"))
    except Exception:
        return False

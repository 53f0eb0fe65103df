"""Leader leases against a real NATS KV: one holder at a time, takeover after expiry,
instant takeover after a release."""

from __future__ import annotations

from runplane_bus import Bus, BusSettings
from runplane_bus.leases import LeaseKeeper
from runplane_service.clock import FakeClock


async def test_one_leader_takeover_on_expiry_and_release(nats_server):
    bus = await Bus.connect(BusSettings(url=nats_server.url))
    clock = FakeClock()
    try:
        a = LeaseKeeper(bus.leases, "scheduler", "a", ttl_s=5, clock=clock)
        b = LeaseKeeper(bus.leases, "scheduler", "b", ttl_s=5, clock=clock)
        assert await a.hold() is True
        first = await bus.leases.get("scheduler")
        clock.advance(1)
        assert await a.hold() is True  # renewed under a third of the TTL ago: no write
        assert (await bus.leases.get("scheduler")).revision == first.revision
        assert await b.hold() is False
        clock.advance(2)
        assert await a.hold() is True  # renewed: now valid until t+8
        assert (await bus.leases.get("scheduler")).revision > first.revision
        clock.advance(4)
        assert await b.hold() is False  # a's renewal still holds
        clock.advance(2)  # a stopped renewing: expired
        assert await b.hold() is True
        assert await a.hold() is False  # a learns it lost
        stored = await bus.leases.get("scheduler")
        assert stored is not None and stored.value.holder == "b"
        await b.release()
        assert await a.hold() is True  # no need to wait for b's lease to expire
    finally:
        await bus.close()


async def test_two_contenders_racing_for_a_free_lease_get_one_winner(nats_server):
    import asyncio

    bus = await Bus.connect(BusSettings(url=nats_server.url))
    try:
        keepers = [LeaseKeeper(bus.leases, "autoscaler", f"k{i}", ttl_s=5, clock=FakeClock()) for i in range(5)]
        results = await asyncio.gather(*(k.hold() for k in keepers))
        assert sorted(results) == [False] * 4 + [True]
    finally:
        await bus.close()


async def test_a_kept_lease_outlives_a_slow_round_and_one_holder_never_races_itself(nats_server):
    import asyncio

    from runplane_service.clock import Clock
    from runplane_testing.waiting import async_wait_until

    bus = await Bus.connect(BusSettings(url=nats_server.url))
    stop = asyncio.Event()
    try:
        a = LeaseKeeper(bus.leases, "autoscaler", "a", ttl_s=0.6, clock=Clock())
        b = LeaseKeeper(bus.leases, "autoscaler", "b", ttl_s=0.6, clock=Clock())
        # Two calls at once (a round and the keeper): one compare-and-set, both answer True.
        assert await asyncio.gather(a.hold(), a.hold()) == [True, True]
        assert (await bus.leases.get("autoscaler")).value.holder == "a"
        keeper = asyncio.create_task(a.keep(stop))
        for _ in range(8):  # 2 s, over three TTLs, with no round calling hold()
            await asyncio.sleep(0.25)
            assert await b.hold() is False
        stop.set()
        await keeper
        assert a.leading
        await async_wait_until(b.hold, timeout_s=5, what="a takeover once a stops keeping it")
    finally:
        await bus.close()

from __future__ import annotations

import pytest
from runplane_bus import Bus, BusSettings, Conflict
from runplane_proto.jobs import JobPolicy, JobRecord


def _record(job_id: str = "j1", status: str = "IN_QUEUE") -> JobRecord:
    return JobRecord(id=job_id, endpoint_id="ep1", status=status, submitted_at_ms=1,
                     policy=JobPolicy(execution_timeout_ms=1000, ttl_ms=10000))


async def test_typed_kv_compare_and_set(nats_server):
    bus = await Bus.connect(BusSettings(url=nats_server.url))
    try:
        rev = await bus.jobs.create("ep1.j1", _record())
        with pytest.raises(Conflict):
            await bus.jobs.create("ep1.j1", _record())
        await bus.jobs.update("ep1.j1", _record(status="IN_PROGRESS"), rev)
        with pytest.raises(Conflict):
            await bus.jobs.update("ep1.j1", _record(status="FAILED"), rev)
        got = await bus.jobs.get("ep1.j1")
        assert got is not None and got.value.status == "IN_PROGRESS"
        await bus.jobs.create("ep1.j2", _record("j2"))
        await bus.jobs.create("ep2.j3", _record("j3"))
        assert sorted(await bus.jobs.keys("ep1.*")) == ["ep1.j1", "ep1.j2"]
        assert [k async for k, _ in bus.jobs.items("ep2.*")] == ["ep2.j3"]
        assert await bus.jobs.keys("nope.*") == []
    finally:
        await bus.close()


async def test_large_payload_goes_to_object_store(nats_server):
    bus = await Bus.connect(BusSettings(url=nats_server.url))
    try:
        small = await bus.payloads.save("j1", "input", b"{}")
        assert small == (b"{}", None)
        big = b'"' + b"x" * 2_000_000 + b'"'
        inline, ref = await bus.payloads.save("j1", "output", big)
        assert inline is None and ref
        assert await bus.payloads.load(None, ref) == big
    finally:
        await bus.close()

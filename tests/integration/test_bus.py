from __future__ import annotations

import pytest
from nats.js.errors import InvalidKeyError, NoStreamResponseError
from nats.aio.msg import Msg
from runplane_bus import Bus, BusSettings, Conflict
from runplane_bus.topology import ensure_job_records_republish
from runplane_proto import subjects as s
from runplane_proto.codec import Codec
from runplane_proto.dead_letters import dead_letter_of
from runplane_proto.ids import new_gateway_token, new_job_id
from runplane_proto.jobs import JobPolicy, JobRecord
from runplane_testing.waiting import async_wait_until


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


async def test_kv_writes_take_a_deleted_key_again_expire_with_a_ttl_and_refuse_bad_input(nats_server):
    """put / create / update / publish_durable past the plain compare-and-set case."""
    bus = await Bus.connect(BusSettings(url=nats_server.url))
    try:
        rev = await bus.jobs.create("ep1.j1", _record())
        await bus.jobs.delete("ep1.j1")
        assert await bus.jobs.get("ep1.j1") is None
        again = await bus.jobs.create("ep1.j1", _record(status="IN_PROGRESS"))  # over the marker
        assert again > rev
        got = await bus.jobs.get("ep1.j1")
        assert got is not None and got.revision == again and got.value.status == "IN_PROGRESS"
        put = await bus.jobs.put("ep1.j1", _record(status="COMPLETED"))
        assert put > again and (await bus.jobs.get("ep1.j1")).value.status == "COMPLETED"
        with pytest.raises(InvalidKeyError):
            await bus.jobs.put("ep1.bad key", _record())
        with pytest.raises(NoStreamResponseError):
            await bus.publish_durable("nobody.stores.this", _record())
        seq = await bus.publish_durable(s.job_queue("ep1"), _record(), msg_id="m1")
        assert await bus.publish_durable(s.job_queue("ep1"), _record(), msg_id="m1") == seq  # deduplicated
        # An entry with its own TTL goes by itself (a bucket with per-message TTLs allowed).
        ttl_rev = await bus.dead_letters.create("ep1.j9", dead_letter_of(
            _record("j9", status="FAILED"), now_ms=1), ttl_s=1)
        with pytest.raises(Conflict):
            await bus.dead_letters.update("ep1.j9", dead_letter_of(
                _record("j9", status="FAILED"), now_ms=2), ttl_rev + 5, ttl_s=1)
        assert await bus.dead_letters.get("ep1.j9") is not None
        await async_wait_until(lambda: _absent(bus, "ep1.j9"), timeout_s=10, what="the entry to expire")
    finally:
        await bus.close()


async def _absent(bus: Bus, key: str) -> bool:
    return await bus.dead_letters.get(key) is None


async def test_pages_read_every_current_value_a_page_at_a_time(nats_server):
    """The janitor's and the job list's reader: each live key once, at its latest value,
    oldest write first, in pages of at most `page_size`; deleted keys and other endpoints'
    keys left out; an empty match ends at once."""
    bus = await Bus.connect(BusSettings(url=nats_server.url))
    try:
        for i in range(250):
            await bus.jobs.create(f"ep1.j{i}", _record(f"j{i}"))
        await bus.jobs.create("ep2.x", _record("x"))
        for i in range(0, 250, 10):  # rewritten: comes last, at its new value
            current = await bus.jobs.get(f"ep1.j{i}")
            assert current is not None
            await bus.jobs.update(f"ep1.j{i}", _record(f"j{i}", status="COMPLETED"), current.revision)
        for i in range(5, 250, 10):
            await bus.jobs.delete(f"ep1.j{i}")
        pages = [page async for page in bus.jobs.pages("ep1.*", page_size=40)]
        assert all(0 < len(page) <= 40 for page in pages)
        seen = [(key, record.status) for page in pages for key, record in page]
        expected = [(f"ep1.j{i}", "IN_QUEUE") for i in range(250) if i % 10 not in (0, 5)]
        expected += [(f"ep1.j{i}", "COMPLETED") for i in range(0, 250, 10)]
        assert seen == expected
        assert [page async for page in bus.jobs.pages("nope.*")] == []
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


async def test_mirror_follows_puts_and_deletes_and_heals_by_resync(nats_server):
    from runplane_bus.mirror import Mirror
    from runplane_testing.waiting import async_wait_until

    bus = await Bus.connect(BusSettings(url=nats_server.url))
    changed: list[str] = []
    transitions: list[tuple[str, str | None, str | None]] = []

    def on_change(key, old, new):
        changed.append(key)
        transitions.append((key, old and old.status, new and new.status))
    try:
        await bus.jobs.put("ep1.before", _record("before"))
        mirror = await Mirror(bus.jobs, on_change=on_change).start()
        assert [v.id for v in mirror.values()] == ["before"]
        await bus.jobs.put("ep1.j1", _record("j1"))
        await bus.jobs.put("ep1.j1", _record("j1", status="IN_PROGRESS"))

        async def j1_running():
            got = mirror.get("ep1.j1")
            return got is not None and got.status == "IN_PROGRESS"

        await async_wait_until(j1_running, timeout_s=5, what="mirror saw the update")
        await bus.jobs.delete("ep1.before")

        async def before_gone():
            return mirror.get("ep1.before") is None

        await async_wait_until(before_gone, timeout_s=5, what="mirror saw the delete")
        assert "ep1.before" in changed and "ep1.j1" in changed
        assert ("ep1.j1", "IN_QUEUE", "IN_PROGRESS") in transitions
        assert ("ep1.before", "IN_QUEUE", None) in transitions
        # A gap (as after a missed watch message) is healed by the next resync.
        mirror._values.pop("ep1.j1")
        mirror._values["ep1.ghost"] = _record("ghost")
        mirror._revisions["ep1.ghost"] = 1
        mirror._revisions["ep1.j1"] = 0
        await mirror.resync()
        assert sorted(mirror._values) == ["ep1.j1"] and mirror.get("ep1.j1").status == "IN_PROGRESS"
        await mirror.stop()
    finally:
        await bus.close()



async def test_job_records_republish_reaches_only_the_replica_named_by_the_job_id(nats_server):
    """KV rp-jobs made without the republish (an older version) gets it from the gateway's
    start check; then a replica's subject hears the writes of its own /runsync jobs only."""
    bus = await Bus.connect(BusSettings(url=nats_server.url))
    try:
        stream = f"KV_{s.KV_JOBS}"
        config = (await bus.js.stream_info(stream)).config
        config.republish = None
        await bus.js.update_stream(config)
        assert (await bus.js.stream_info(stream)).config.republish is None
        assert await ensure_job_records_republish(bus.js) is True
        assert await ensure_job_records_republish(bus.js) is False  # already there: untouched

        token = new_gateway_token()
        heard: list[tuple[str, str]] = []

        async def on_record(msg: Msg) -> None:
            heard.append((msg.subject, Codec(JobRecord).decode(msg.data).id))

        await bus.nc.subscribe(s.gateway_job_records(token), cb=on_record)
        await bus.nc.flush()
        others = [new_job_id(), new_job_id(sync=True), new_job_id(sync=True, gateway=new_gateway_token())]
        mine = new_job_id(sync=True, gateway=token)
        for job_id in (*others, mine):  # in this order: once mine is heard, the others would have been
            await bus.jobs.create(s.job_key("ep1", job_id), _record(job_id))
        await async_wait_until(lambda: (heard), what="the replica's record")
        assert heard == [(f"rp.jobrec.ep1.{mine[:-len(token)]}.{token}", mine)]
        with pytest.raises(ValueError):
            new_job_id(sync=True, gateway="gw-has-a-dash-x")
    finally:
        await bus.close()

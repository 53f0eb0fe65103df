"""The gateway in-process (ASGI) against a real nats-server, with a tiny agent made of the Bus."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
from nats.aio.msg import Msg
from runplane_bus import Bus, BusSettings
from runplane_gateway import metrics as gateway_metrics
from runplane_gateway.app import Gateway
from runplane_gateway.settings import GatewaySettings
from runplane_proto import subjects
from runplane_proto.codec import Codec
from runplane_proto.jobs import CancelJob, JobChanged, JobEvent, JobQueued, JobRecord, StreamChunk
from runplane_proto.scaling import PlacementStatus
from runplane_proto.nodes import NodeStatus, WorkerInfo
from runplane_service.clock import FakeClock
from runplane_testing.waiting import async_wait_until

KEY = "test-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SETTINGS = GatewaySettings(api_key=KEY, runsync_wait_ms=1000, webhook_retry_delay_s=0.05,
                           max_body_run_bytes=2 * 1024 * 1024, max_body_runsync_bytes=3 * 1024 * 1024)
queued_codec: Codec[JobQueued] = Codec(JobQueued)


class Stack:
    def __init__(self, bus: Bus, gateway: Gateway, http: httpx.AsyncClient, clock: FakeClock) -> None:
        self.bus, self.gateway, self.http, self.clock = bus, gateway, http, clock

    async def endpoint(self, **spec: object) -> str:
        body = {"name": "t", "command": ["true"], **spec}
        resp = await self.http.post("/v1/endpoints", json=body)
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    async def run(self, ep: str, body: dict | None = None) -> str:
        resp = await self.http.post(f"/v2/{ep}/run", json=body if body is not None else {"input": {"n": 1}})
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "IN_QUEUE"
        return resp.json()["id"]

    async def record(self, ep: str, job_id: str) -> JobRecord | None:
        got = await self.bus.jobs.get(subjects.job_key(ep, job_id))
        return got.value if got else None

    def agent(self, ep: str) -> Agent:
        return Agent(self.bus, self.clock, ep)


class Agent:
    """What a node agent does to a job record, reduced to the bus calls."""

    def __init__(self, bus: Bus, clock: FakeClock, ep: str) -> None:
        self.bus, self.clock, self.ep = bus, clock, ep
        self.sub = None

    async def take(self) -> tuple[JobQueued, Msg]:
        if self.sub is None:
            self.sub = await self.bus.js.pull_subscribe_bind(durable=subjects.job_consumer(self.ep),
                                                             stream=subjects.STREAM_JOBS)
        msg = (await self.sub.fetch(1, timeout=5))[0]
        return queued_codec.decode(msg.data), msg

    async def update(self, job_id: str, **changes: object) -> JobRecord:
        result = await self.bus.jobs.modify(subjects.job_key(self.ep, job_id),
                                            lambda r: msgspec.structs.replace(r, **changes))
        assert result is not None
        await self.bus.job_changed(result.value)  # as every writer of a record does
        return result.value

    async def start(self, job_id: str) -> JobRecord:
        self.clock.advance(0.25)
        return await self.update(job_id, status="IN_PROGRESS", started_at_ms=self.clock.now_ms(),
                                 worker_id="w1", node_id="n1", attempts=1)

    async def finish(self, job_id: str, status: str = "COMPLETED", **changes: object) -> JobRecord:
        self.clock.advance(1.5)
        record = await self.update(job_id, status=status, completed_at_ms=self.clock.now_ms(), **changes)
        await self.bus.count_job_end(record)  # as the node agent does, for /health
        return record


@pytest.fixture
async def stack(nats_server) -> AsyncIterator[Stack]:
    bus = await Bus.connect(BusSettings(url=nats_server.url))
    clock = FakeClock()
    gateway = await Gateway.start(bus, SETTINGS, clock=clock)
    transport = httpx.ASGITransport(app=gateway.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", headers=AUTH, timeout=30) as http:
        yield Stack(bus, gateway, http, clock)
    await gateway.stop()
    await bus.close()


# -- management API ----------------------------------------------------------------------------


async def test_endpoint_crud(stack: Stack) -> None:
    http = stack.http
    resp = await http.post("/v1/endpoints", json={"name": "echo", "command": ["python", "h.py"],
                                                  "env": {"A": "1"}, "workersMax": 2})
    assert resp.status_code == 201
    created = resp.json()
    ep = created["id"]
    assert created | {"createdAtMs": 0, "updatedAtMs": 0} == {
        "id": ep, "name": "echo", "imageName": None, "command": ["python", "h.py"], "env": {"A": "***"},
        "workersMin": 0, "workersMax": 2, "idleTimeout": 5, "scalerType": "QUEUE_DELAY", "scalerValue": 4,
        "flashboot": True, "gpuCount": 0, "gpuTypeIds": [], "executionTimeoutMs": 600000,
        "prewarmWorkers": 0, "warmWindows": [], "predictivePrewarm": False, "weight": 1, "gpuQuota": 0,
        "createdAtMs": 0, "updatedAtMs": 0,
    }
    stored = await stack.bus.endpoints.get(ep)
    assert stored is not None and stored.value.workers_max == 2 and stored.value.env == {"A": "1"}
    await stack.bus.js.consumer_info(subjects.STREAM_JOBS, subjects.job_consumer(ep))

    assert (await http.get(f"/v1/endpoints/{ep}")).json() == created
    assert [e["id"] for e in (await http.get("/v1/endpoints")).json()] == [ep]

    resp = await http.patch(f"/v1/endpoints/{ep}", json={"workersMin": 1, "imageName": "img:1"})
    assert resp.status_code == 200 and resp.json()["workersMin"] == 1 and resp.json()["imageName"] == "img:1"
    resp = await http.patch(f"/v1/endpoints/{ep}", json={"workersMin": 3})
    assert resp.status_code == 400 and "workersMin" in resp.json()["error"]
    assert (await stack.bus.endpoints.get(ep)).value.workers_min == 1

    resp = await http.delete(f"/v1/endpoints/{ep}")
    assert resp.status_code == 200 and resp.json() == {"id": ep, "deleted": True}
    assert (await http.get(f"/v1/endpoints/{ep}")).status_code == 404
    assert (await http.patch(f"/v1/endpoints/{ep}", json={"name": "x"})).status_code == 404
    assert (await http.delete(f"/v1/endpoints/{ep}")).status_code == 404
    assert (await http.post(f"/v2/{ep}/run", json={"input": 1})).status_code == 404


@pytest.mark.parametrize("body, field", [
    ({"name": "x", "command": ["true"], "workersMin": 5, "workersMax": 2}, "workersMin"),
    ({"name": "x", "command": ["true"], "scalerType": "FAST"}, "scalerType"),
    ({"name": "x", "command": ["true"], "idleTimeout": 0}, "idleTimeout"),
    ({"name": "x", "command": ["true"], "scalerValue": 0}, "scalerValue"),
    ({"name": "x", "command": ["true"], "executionTimeoutMs": 10}, "executionTimeoutMs"),
    ({"name": "x", "command": "true"}, "command"),
    ({"name": "x", "command": ["true"], "env": {"A": 1}}, "env"),
    ({"name": "x", "command": ["true"], "gpuCount": -1}, "gpuCount"),
    ({"command": ["true"]}, "name"),
    ({"name": "x"}, "imageName"),
    ({"name": "x", "command": ["true"], "colour": 1, "flavour": 2}, "colour, flavour"),
    ({"name": "x", "command": ["true"], "prewarmWorkers": 4}, "prewarmWorkers"),
    ({"name": "x", "command": ["true"], "warmWindows": [{"cron": "0 25 * * *", "minutes": 5}]}, "warmWindows[0]: cron"),
    ({"name": "x", "command": ["true"], "warmWindows": [{"cron": "0 9 * * *", "minutes": 5,
                                                         "timezone": "Nowhere/City"}]}, "warmWindows[0]: unknown time zone"),
    ({"name": "x", "command": ["true"], "flashboot": False, "predictivePrewarm": True}, "flashboot"),
    ({"name": "x", "command": ["true"], "weight": 0}, "weight"),
    ({"name": "x", "command": ["true"], "gpuCount": 2, "gpuQuota": 1}, "gpuQuota"),
])
async def test_endpoint_validation_names_the_field(stack: Stack, body: dict, field: str) -> None:
    resp = await stack.http.post("/v1/endpoints", json=body)
    assert resp.status_code == 400
    assert resp.headers["content-type"] == "application/json"
    assert field in resp.json()["error"]


async def test_auth(stack: Stack) -> None:
    ep = await stack.endpoint()
    url = f"/v2/{ep}/run"
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": KEY}):
        resp = await stack.http.post(url, json={"input": 1}, headers=headers)
        assert resp.status_code == 200
    for headers in ({"Authorization": "Bearer nope"}, {"Authorization": "nope"}, {"Authorization": ""}):
        resp = await stack.http.post(url, json={"input": 1}, headers=headers)
        assert resp.status_code == 401 and resp.headers["content-type"] == "application/json"
        assert "API key" in resp.json()["error"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.gateway.app), base_url="http://gw") as anon:
        assert (await anon.get("/v1/endpoints")).status_code == 401
        assert (await anon.get("/healthz")).json() == {"status": "ok"}
        metrics = await anon.get("/metrics")
        assert metrics.status_code == 200 and "rp_gateway_requests_total" in metrics.text
    resp = await stack.http.get("/nowhere")
    assert resp.status_code == 404 and resp.json() == {"error": "not found"}


# -- submit ------------------------------------------------------------------------------------


async def test_run_writes_the_record_and_queues_the_job(stack: Stack) -> None:
    ep = await stack.endpoint(executionTimeoutMs=60_000)
    raw = b'{"input": {"text": "hi",  "n": [1, 2.50]}, "s3Config": {"bucketName": "b"}, "webhook": null,' \
          b' "policy": {"ttl": 20000, "lowPriority": true}}'
    resp = await stack.http.post(f"/v2/{ep}/run", content=raw)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    job_id = resp.json()["id"]
    assert resp.json() == {"id": job_id, "status": "IN_QUEUE"} and job_id.endswith("-r1")

    record = await stack.record(ep, job_id)
    assert record is not None and record.status == "IN_QUEUE" and not record.sync
    assert record.input_json == b'{"text": "hi",  "n": [1, 2.50]}'  # the client's bytes, as sent
    assert json.loads(record.extra_json) == {"s3Config": {"bucketName": "b"}}
    assert record.policy.ttl_ms == 20_000 and record.policy.execution_timeout_ms == 60_000
    assert record.policy.low_priority and record.webhook is None

    queued, msg = await stack.agent(ep).take()
    assert queued.job_id == job_id and queued.endpoint_id == ep and queued.low_priority
    assert msg.headers["Nats-Msg-Id"] == f"{job_id}:0"
    assert msg.subject == subjects.job_queue(ep, low_priority=True)  # counted apart by the autoscaler


@pytest.mark.parametrize("content, status, needle", [
    (b"{not json", 400, "JSON"),
    (b"[1, 2]", 400, "object"),
    (b'{"inputs": {}}', 400, "input"),
    (b'{"input": null}', 400, "input"),
    (b'{"input": 1, "policy": {"ttl": 5}}', 400, "policy.ttl"),
    (b'{"input": 1, "policy": {"executionTimeout": 999999999999}}', 400, "policy.executionTimeout"),
    (b'{"input": 1, "policy": {"ttl": 20000, "speed": 1}}', 400, "speed"),
    (b'{"input": 1, "webhook": "ftp://x"}', 400, "webhook"),
    (b'{"input": 1, "webhook": 5}', 400, "webhook"),
])
async def test_bad_submissions(stack: Stack, content: bytes, status: int, needle: str) -> None:
    ep = await stack.endpoint()
    for op in ("run", "runsync"):
        resp = await stack.http.post(f"/v2/{ep}/{op}", content=content)
        assert resp.status_code == status, resp.text
        assert needle in resp.json()["error"]


async def test_unknown_endpoint_job_and_wait(stack: Stack) -> None:
    resp = await stack.http.post("/v2/doesnotexist/run", json={"input": {}})
    assert resp.status_code == 404 and "doesnotexist" in resp.json()["error"]
    ep = await stack.endpoint()
    for path in ("status/nope-r1", "stream/nope-r1", "status/bad.id"):
        resp = await stack.http.get(f"/v2/{ep}/{path}")
        assert resp.status_code == 404 and resp.json()["error"]
    assert (await stack.http.post(f"/v2/{ep}/cancel/nope-r1")).status_code == 404
    assert (await stack.http.post(f"/v2/{ep}/retry/nope-r1")).status_code == 404
    for wait in ("5", "300001", "abc"):
        resp = await stack.http.post(f"/v2/{ep}/runsync?wait={wait}", json={"input": 1})
        assert resp.status_code == 400 and "wait" in resp.json()["error"]


async def test_oversized_bodies_are_413(stack: Stack) -> None:
    ep = await stack.endpoint()
    big = b'{"input":"' + b"x" * (2 * 1024 * 1024) + b'"}'
    resp = await stack.http.post(f"/v2/{ep}/run", content=big)
    assert resp.status_code == 413 and "2 MB" in resp.json()["error"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the real size counts
        for part in (big[: len(big) // 2], big[len(big) // 2:]):
            yield part

    resp = await stack.http.post(f"/v2/{ep}/run", content=chunked())
    assert resp.status_code == 413
    # /runsync has its own, larger cap: this body passes and becomes an object-store input.
    resp = await stack.http.post(f"/v2/{ep}/runsync", content=big)
    assert resp.status_code == 200 and resp.json()["status"] == "IN_QUEUE"


async def test_large_input_goes_to_the_object_store(stack: Stack) -> None:
    ep = await stack.endpoint()
    payload = b'{"blob": "' + b"y" * 400_000 + b'"}'
    resp = await stack.http.post(f"/v2/{ep}/run", content=b'{"input":' + payload + b"}")
    job_id = resp.json()["id"]
    record = await stack.record(ep, job_id)
    assert record.input_json is None and record.input_ref == subjects.payload_object(job_id, "input")
    assert await stack.bus.payloads.load(None, record.input_ref) == payload


# -- runsync, status, stream -------------------------------------------------------------------


async def test_runsync_fast_answers_the_result(stack: Stack) -> None:
    ep = await stack.endpoint()
    agent = stack.agent(ep)

    async def work() -> None:
        queued, msg = await agent.take()
        await agent.start(queued.job_id)
        await agent.finish(queued.job_id, output_json=b'{"echo": [1, 2]}')
        await msg.ack()

    worker = asyncio.ensure_future(work())
    resp = await stack.http.post(f"/v2/{ep}/runsync?wait=30000", json={"input": {"a": 1}})
    await worker
    body = resp.json()
    assert resp.status_code == 200 and body["id"].startswith("sync-")
    assert body == {"id": body["id"], "status": "COMPLETED", "delayTime": 250, "executionTime": 1500,
                    "output": {"echo": [1, 2]}, "workerId": "w1", "timings": _timings(250, 1500)}
    assert (await stack.record(ep, body["id"])).sync


async def test_runsync_hears_the_end_from_the_store_on_its_replicas_own_subject(stack: Stack) -> None:
    """A /runsync job's id ends with the waiting replica's token; KV rp-jobs republishes each
    write of the record to the replica's subject, so the answer comes from the stored end
    even when its writer announces nothing (the wait never runs out), and another replica's
    subject hears none of it."""
    ep = await stack.endpoint()
    agent = stack.agent(ep)
    token = stack.gateway.sync_ends.token
    mine: list[tuple[str, str]] = []
    others: list[str] = []
    codec: Codec[JobRecord] = Codec(JobRecord)

    async def on_mine(msg: Msg) -> None:
        mine.append((msg.subject, codec.decode(msg.data).status))

    async def on_other(msg: Msg) -> None:
        others.append(msg.subject)

    sub = await stack.bus.nc.subscribe(subjects.gateway_job_records(token), cb=on_mine)
    other = await stack.bus.nc.subscribe(subjects.gateway_job_records("gwsomeoneelse000"), cb=on_other)
    expired_before = gateway_metrics.RUNSYNC_WAITS_EXPIRED._value.get()

    async def work() -> str:
        queued, msg = await agent.take()
        key = subjects.job_key(ep, queued.job_id)
        # The record and the message are stored at the same time: the record may come second.
        stored = await async_wait_until(lambda: stack.bus.jobs.get(key), what="the stored record")
        stack.clock.advance(1.5)
        # Written, never announced: no JobChanged anywhere.
        await stack.bus.jobs.update(key, msgspec.structs.replace(
            stored.value, status="COMPLETED", completed_at_ms=stack.clock.now_ms(), output_json=b"3"),
            stored.revision)
        await msg.ack()
        return queued.job_id

    worker = asyncio.ensure_future(work())
    resp = await stack.http.post(f"/v2/{ep}/runsync?wait=30000", json={"input": 3})
    job_id = await worker
    assert resp.json()["status"] == "COMPLETED" and resp.json()["output"] == 3
    assert gateway_metrics.RUNSYNC_WAITS_EXPIRED._value.get() == expired_before
    assert len(token) == 16 and "-" not in token and job_id == resp.json()["id"]
    assert job_id.startswith("sync-") and job_id.endswith("-" + token)
    await async_wait_until(lambda: (len(mine) >= 2), what="both writes republished")
    await sub.unsubscribe()
    await other.unsubscribe()
    head = job_id[:-len(token)]
    assert mine == [(f"rp.jobrec.{ep}.{head}.{token}", "IN_QUEUE"), (f"rp.jobrec.{ep}.{head}.{token}", "COMPLETED")]
    assert others == []


async def test_runsync_slow_answers_the_id_when_the_wait_runs_out(stack: Stack) -> None:
    ep = await stack.endpoint()
    agent = stack.agent(ep)

    async def work() -> str:
        queued, _ = await agent.take()
        await agent.start(queued.job_id)
        return queued.job_id

    worker = asyncio.ensure_future(work())
    resp = await stack.http.post(f"/v2/{ep}/runsync?wait=1000", json={"input": {"a": 1}})
    job_id = await worker
    assert resp.status_code == 200 and resp.json() == {"id": job_id, "status": "IN_PROGRESS"}
    await agent.finish(job_id, status="FAILED", error="boom")
    body = (await stack.http.get(f"/v2/{ep}/status/{job_id}")).json()
    assert body["status"] == "FAILED" and body["error"] == "boom" and "output" not in body


async def test_status_shows_progress_then_the_result(stack: Stack) -> None:
    ep = await stack.endpoint()
    agent = stack.agent(ep)
    job_id = await stack.run(ep)
    assert (await stack.http.get(f"/v2/{ep}/status/{job_id}")).json() == {
        "id": job_id, "status": "IN_QUEUE", "queuePosition": 0, "timings": {"totalMs": 0, "queuedMs": 0}}
    await agent.start(job_id)
    await agent.update(job_id, output_json=b'{"pct": 50}')
    stack.clock.advance(0.5)
    resp = await stack.http.post(f"/v2/{ep}/status/{job_id}")  # POST works as GET does
    assert resp.json() == {"id": job_id, "status": "IN_PROGRESS", "delayTime": 250, "executionTime": 500,
                           "output": {"pct": 50}, "workerId": "w1", "timings": _timings(250, 500)}
    await agent.finish(job_id, output_json=b'"done"')
    resp = await stack.http.get(f"/v2/{ep}/status/{job_id}")
    assert resp.json() == {"id": job_id, "status": "COMPLETED", "delayTime": 250, "executionTime": 2000,
                           "output": "done", "workerId": "w1", "timings": _timings(250, 2000)}


async def test_status_sync_waits_for_the_end(stack: Stack) -> None:
    ep = await stack.endpoint()
    agent = stack.agent(ep)
    job_id = await stack.run(ep)
    await agent.start(job_id)
    poll = asyncio.ensure_future(stack.http.get(f"/v2/{ep}/status-sync/{job_id}?wait=30000"))
    # The gateway shares this connection: wait until it follows the job's events.
    events = subjects.job_events(job_id)
    await async_wait_until(lambda: (any(sub.subject == events for sub in stack.bus.nc._subs.values())),
                           what="status-sync waiting")
    await agent.finish(job_id, output_json=b"7")
    body = (await poll).json()
    assert body["status"] == "COMPLETED" and body["output"] == 7


async def test_large_output_is_read_from_the_object_store(stack: Stack) -> None:
    ep = await stack.endpoint()
    job_id = await stack.run(ep)
    big = b'["' + b"z" * 300_000 + b'"]'
    _, ref = await stack.bus.payloads.save(job_id, "output", big)
    agent = stack.agent(ep)
    await agent.start(job_id)
    await agent.finish(job_id, output_ref=ref)
    assert (await stack.http.get(f"/v2/{ep}/status/{job_id}")).json()["output"] == [big[2:-2].decode()]


async def test_stream_returns_each_chunk_once(stack: Stack) -> None:
    ep = await stack.endpoint()
    agent = stack.agent(ep)
    job_id = await stack.run(ep)
    other = await stack.run(ep)

    async def chunk(job: str, i: int) -> None:
        await stack.bus.publish_durable(subjects.job_chunks(job), StreamChunk(
            job_id=job, index=i, chunk_json=b'{"output": {"i": %d}}' % i))

    empty = (await stack.http.get(f"/v2/{ep}/stream/{job_id}")).json()
    assert empty == {"id": job_id, "status": "IN_QUEUE", "stream": []}
    await agent.start(job_id)
    await chunk(job_id, 0)
    await chunk(other, 99)
    await chunk(job_id, 1)
    first = (await stack.http.get(f"/v2/{ep}/stream/{job_id}")).json()
    assert first == {"id": job_id, "status": "IN_PROGRESS", "stream": [{"output": {"i": 0}}, {"output": {"i": 1}}]}
    await chunk(job_id, 2)
    await agent.finish(job_id, output_json=b"[]")
    second = (await stack.http.post(f"/v2/{ep}/stream/{job_id}")).json()
    assert second == {"id": job_id, "status": "COMPLETED", "stream": [{"output": {"i": 2}}]}
    third = (await stack.http.get(f"/v2/{ep}/stream/{job_id}")).json()
    assert third == {"id": job_id, "status": "COMPLETED", "stream": []}
    assert (await stack.http.get(f"/v2/{ep}/stream/{other}")).json()["stream"] == [{"output": {"i": 99}}]


async def test_concurrent_stream_reads_never_repeat_a_chunk(stack: Stack) -> None:
    ep = await stack.endpoint()
    job_id = await stack.run(ep)
    for i in range(20):
        await stack.bus.publish_durable(subjects.job_chunks(job_id), StreamChunk(
            job_id=job_id, index=i, chunk_json=b'{"output": %d}' % i))
    reads = await asyncio.gather(*(stack.http.get(f"/v2/{ep}/stream/{job_id}") for _ in range(4)))
    seen = [c["output"] for r in reads for c in r.json()["stream"]]
    assert sorted(seen) == list(range(20))


# -- cancel, retry, purge, health --------------------------------------------------------------


async def test_cancel(stack: Stack) -> None:
    ep = await stack.endpoint()
    agent = stack.agent(ep)
    cancels: list[CancelJob] = []
    events: list[JobEvent] = []
    cancel_sub = await stack.bus.nc.subscribe(subjects.job_cancel(ep), cb=_collect(cancels, Codec(CancelJob)))
    job_id = await stack.run(ep)
    event_sub = await stack.bus.nc.subscribe(subjects.job_events(job_id), cb=_collect(events, Codec(JobEvent)))
    await agent.start(job_id)

    resp = await stack.http.post(f"/v2/{ep}/cancel/{job_id}")
    assert resp.status_code == 200 and resp.json() == {"id": job_id, "status": "CANCELLED"}
    record = await stack.record(ep, job_id)
    assert record.status == "CANCELLED" and record.completed_at_ms is not None
    await async_wait_until(lambda: (cancels and any(
        isinstance(e, JobChanged) and e.record.status == "CANCELLED" for e in events)), what="cancel published")
    assert cancels[0].job_id == job_id and cancels[0].endpoint_id == ep
    # A finished job keeps its state.
    assert (await stack.http.post(f"/v2/{ep}/cancel/{job_id}")).json()["status"] == "CANCELLED"
    done = await stack.run(ep)
    await agent.start(done)
    await agent.finish(done)
    assert (await stack.http.post(f"/v2/{ep}/cancel/{done}")).json() == {"id": done, "status": "COMPLETED"}
    await cancel_sub.unsubscribe()
    await event_sub.unsubscribe()


async def test_retry(stack: Stack) -> None:
    ep = await stack.endpoint()
    agent = stack.agent(ep)
    job_id = await stack.run(ep)
    await agent.take()
    resp = await stack.http.post(f"/v2/{ep}/retry/{job_id}")
    assert resp.status_code == 400 and "IN_QUEUE" in resp.json()["error"]
    await agent.start(job_id)
    await agent.finish(job_id, status="FAILED", error="bad", output_json=b"1")

    resp = await stack.http.post(f"/v2/{ep}/retry/{job_id}")
    assert resp.status_code == 200 and resp.json() == {"id": job_id, "status": "IN_QUEUE"}
    record = await stack.record(ep, job_id)
    assert (record.status, record.retries, record.attempts) == ("IN_QUEUE", 1, 0)
    assert record.output_json is None and record.error is None and record.started_at_ms is None
    assert record.input_json == b'{"n":1}'
    queued, msg = await agent.take()
    assert queued.job_id == job_id and msg.headers["Nats-Msg-Id"] == f"{job_id}:1"
    view = (await stack.http.get(f"/v2/{ep}/status/{job_id}")).json()
    assert view.pop("timings")["totalMs"] >= 0 and view.pop("queuePosition") == 0  # taken: none ahead
    assert view.pop("etaMs") >= 1000  # one job ended lately: at most 1 per s
    assert view == {"id": job_id, "status": "IN_QUEUE", "retries": 1}

    await agent.start(job_id)
    await agent.finish(job_id, output_json=b"2")
    resp = await stack.http.post(f"/v2/{ep}/retry/{job_id}")
    assert resp.status_code == 400 and "COMPLETED" in resp.json()["error"]


async def test_purge_queue_and_health(stack: Stack) -> None:
    ep = await stack.endpoint()
    other = await stack.endpoint()
    agent = stack.agent(ep)
    running, done, failed = [await stack.run(ep) for _ in range(3)]
    taken = {}
    for _ in range(3):  # /health counts from the queue: taken messages are in progress
        queued_msg, msg = await agent.take()
        taken[queued_msg.job_id] = msg
    queued = [await stack.run(ep) for _ in range(3)]
    for job in (running, done, failed):
        await agent.start(job)
    await agent.finish(done)
    await agent.finish(failed, status="FAILED", error="x")
    for job in (done, failed):
        await taken[job].ack_sync()
    await stack.run(other)
    now = stack.clock.now_ms()
    await stack.bus.nodes.put("n1", NodeStatus(node_id="n1", hostname="h", runtime="process",
                                               heartbeat_at_ms=now, workers=[
        WorkerInfo(worker_id="w1", endpoint_id=ep, state="running", started_at_ms=now),
        WorkerInfo(worker_id="w2", endpoint_id=ep, state="idle", started_at_ms=now),
        WorkerInfo(worker_id="w3", endpoint_id=ep, state="starting", started_at_ms=now),
        WorkerInfo(worker_id="w4", endpoint_id=other, state="idle", started_at_ms=now),
    ]))
    await stack.bus.nodes.put("lost", NodeStatus(node_id="lost", hostname="h", runtime="process",
                                                 heartbeat_at_ms=now - 60_000, workers=[
        WorkerInfo(worker_id="w5", endpoint_id=ep, state="idle", started_at_ms=now)]))

    health = (await stack.http.get(f"/v2/{ep}/health")).json()
    assert health["jobs"].pop("queueDelayMs") >= 0  # the oldest queued job's age (test_job_timings)
    assert health == {"jobs": {"completed": 1, "failed": 1, "inProgress": 1, "inQueue": 3, "retried": 0},
                      "workers": {"idle": 1, "running": 1, "initializing": 1, "throttled": 0}}
    # Workers the scheduler cannot place: counted as throttled, with the reason.
    await stack.bus.placement.put(subjects.placement_key(ep), PlacementStatus(
        endpoint_id=ep, pending_workers=2, reason="no node has 1 free GPU(s) of ['H100']: n1: no GPUs",
        since_ms=now - 5000, updated_at_ms=now))
    health = (await stack.http.get(f"/v2/{ep}/health")).json()
    assert health["workers"]["throttled"] == 2
    assert health["placement"] == {"pendingWorkers": 2, "sinceMs": now - 5000,
                                   "reason": "no node has 1 free GPU(s) of ['H100']: n1: no GPUs"}
    assert "placement" not in (await stack.http.get(f"/v2/{other}/health")).json()

    resp = await stack.http.post(f"/v2/{ep}/purge-queue")
    assert resp.status_code == 200 and resp.json() == {"removed": 3, "status": "completed"}
    for job in queued:
        record = await stack.record(ep, job)
        assert (record.status, record.error) == ("CANCELLED", "purged")
    assert (await stack.record(ep, running)).status == "IN_PROGRESS"
    assert (await stack.http.get(f"/v2/{ep}/health")).json()["jobs"]["inQueue"] == 0
    assert (await stack.http.get(f"/v2/{other}/health")).json()["jobs"]["inQueue"] == 1
    assert (await stack.http.post(f"/v2/{ep}/purge-queue")).json() == {"removed": 0, "status": "completed"}


# -- time: TTL and retention -------------------------------------------------------------------


async def test_queued_job_past_its_ttl_times_out(stack: Stack) -> None:
    ep = await stack.endpoint()
    job_id = await stack.run(ep, {"input": 1, "policy": {"ttl": 10_000}})
    stack.clock.advance(9)
    assert (await stack.http.get(f"/v2/{ep}/status/{job_id}")).json()["status"] == "IN_QUEUE"
    stack.clock.advance(2)
    body = (await stack.http.get(f"/v2/{ep}/status/{job_id}")).json()
    assert body["status"] == "TIMED_OUT" and "10000 ms" in body["error"]
    assert (await stack.record(ep, job_id)).status == "TIMED_OUT"
    # TIMED_OUT may be retried, with a fresh TTL.
    assert (await stack.http.post(f"/v2/{ep}/retry/{job_id}")).json()["status"] == "IN_QUEUE"
    assert (await stack.http.get(f"/v2/{ep}/status/{job_id}")).json()["status"] == "IN_QUEUE"


async def test_results_expire_after_their_retention(stack: Stack) -> None:
    ep = await stack.endpoint()
    agent = stack.agent(ep)
    job_id = await stack.run(ep)
    await agent.take()
    await agent.start(job_id)
    await agent.finish(job_id, output_json=b"1")

    async def sync_job() -> None:
        queued, _ = await agent.take()
        await agent.start(queued.job_id)
        await agent.finish(queued.job_id, output_json=b"2")

    worker = asyncio.ensure_future(sync_job())
    sync_id = (await stack.http.post(f"/v2/{ep}/runsync?wait=30000", json={"input": 2})).json()["id"]
    await worker
    stack.clock.advance(61)
    assert (await stack.http.get(f"/v2/{ep}/status/{sync_id}")).status_code == 404
    assert (await stack.http.get(f"/v2/{ep}/status/{job_id}")).status_code == 200
    stack.clock.advance(1800)
    for path in (f"status/{job_id}", f"stream/{job_id}"):
        assert (await stack.http.get(f"/v2/{ep}/{path}")).status_code == 404
    assert (await stack.http.post(f"/v2/{ep}/retry/{job_id}")).status_code == 404


# -- webhooks ----------------------------------------------------------------------------------


async def test_webhook_is_delivered_with_a_retry(stack: Stack) -> None:
    from runplane_proto.jobs import WebhookDue
    from runplane_service.lifecycle import bound_port, serve_http
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    received: list[dict] = []

    async def hook(request: Request) -> Response:
        received.append(json.loads(await request.body()))
        return Response(status_code=500 if len(received) == 1 else 200)

    stop = asyncio.Event()
    server = await serve_http(Starlette(routes=[Route("/hook", hook, methods=["POST"])]), "127.0.0.1", 0, stop)
    url = f"http://127.0.0.1:{bound_port(server)}/hook"
    try:
        ep = await stack.endpoint()
        agent = stack.agent(ep)
        job_id = await stack.run(ep, {"input": 1, "webhook": url})
        await agent.start(job_id)
        await agent.finish(job_id, output_json=b'{"ok": true}')
        await stack.bus.publish_durable(subjects.webhook_due(ep), WebhookDue(job_id=job_id, endpoint_id=ep))
        await async_wait_until(lambda: (len(received) == 2), what="webhook retried")
        assert received[0] == received[1] == {"id": job_id, "status": "COMPLETED", "delayTime": 250,
                                              "executionTime": 1500, "output": {"ok": True}, "workerId": "w1",
                                              "timings": _timings(250, 1500)}
        # A job the gateway ends (cancel) gets its webhook from the gateway.
        cancelled = await stack.run(ep, {"input": 1, "webhook": url})
        await stack.http.post(f"/v2/{ep}/cancel/{cancelled}")
        await async_wait_until(lambda: (len(received) == 3), what="cancel webhook")
        assert received[2] == {"id": cancelled, "status": "CANCELLED", "timings": {"totalMs": 0, "queuedMs": 0}}
        await async_wait_until(lambda: _consumer_idle(stack), what="webhook messages acked")
    finally:
        stop.set()


async def _consumer_idle(stack: Stack) -> bool:
    info = await stack.bus.js.consumer_info(subjects.STREAM_WEBHOOKS, subjects.WEBHOOK_CONSUMER)
    return info.num_pending == 0 and info.num_ack_pending == 0


def _collect(into: list, codec: Codec):
    async def cb(msg: Msg) -> None:
        into.append(codec.decode(msg.data))
    return cb


def _timings(delay_ms: int, handler_ms: int) -> dict:
    """/status `timings` of a job this test's stand-in agent ran (it notes no start kind)."""
    return {"totalMs": delay_ms + handler_ms, "queuedMs": delay_ms, "waitingForCapacityMs": 0,
            "workerStartMs": 0, "handlerMs": handler_ms}

"""Garbage on every channel a service reads, against real processes and a real nats-server.

Each channel of the contract (`runplane_proto.subjects.REGISTRY`) that some service reads
gets malformed, truncated, oversized and wrong-type payloads: core subjects (node
commands, worker logs, cancels, job events), JetStream (the job queues, stream chunks,
webhooks) and KV puts into every bucket a service reads, on keys nobody uses and on live
ones. Each service must log, count (a Prometheus counter) and drop them and keep serving:
afterwards a normal job still completes end to end, every process is alive, garbage left
no message behind for redelivery, and the leaders still lead.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec
import nats
import pytest
from badinput import garbage, metric, wrong_tag

from runplane_proto import subjects as s
from runplane_proto.codec import Codec, encode
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.jobs import (
    CancelJob, JobChanged, JobPolicy, JobQueued, JobRecord, StreamChunk, WebhookDue,
)
from runplane_proto.dead_letters import DeadLetter
from runplane_proto.idempotency import IdempotentSubmit
from runplane_proto.leases import Lease
from runplane_proto.logs import WorkerLogsReply, WorkerLogsRequest
from runplane_proto.nodes import CommandReply, NodeStatus, StartWorker, StopWorker
from runplane_proto.scaling import PlacementStatus, ScaleTarget
from runplane_testing.cluster import python_command
from runplane_testing.waiting import async_wait_until

pytestmark = pytest.mark.fuzz

REPLY: Codec[CommandReply] = Codec(CommandReply)
LOGS_REPLY: Codec[WorkerLogsReply] = Codec(WorkerLogsReply)
LEASE: Codec[Lease] = Codec(Lease)
TARGET: Codec[ScaleTarget] = Codec(ScaleTarget)
RECORD: Codec[JobRecord] = Codec(JobRecord)
NODE = "node1"
WORKER = python_command("tests/fixtures/workers/rp_handler.py")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _record(job_id: str, endpoint_id: str, status: str = "COMPLETED") -> JobRecord:
    return JobRecord(id=job_id, endpoint_id=endpoint_id, status=status, submitted_at_ms=_now_ms(),
                     policy=JobPolicy(execution_timeout_ms=60_000, ttl_ms=60_000),
                     output_json=b'{"stolen": true}')


def _reads(channel: s.Channel) -> bool:
    """Whether some service reads this channel (and so must survive garbage on it)."""
    return any(not sub.endswith("only)") for sub in channel.subscribers) or channel.kind == "kv"


def test_every_channel_read_by_a_service_is_fuzzed_here():
    """The channels fuzzed below are the contract's: a new channel must be added here."""
    fuzzed = {"job queue", "low-priority job queue", "job events", "job chunks", "job cancel",
              "webhook due", "node commands", "worker logs", "job records", "job records of /runsync",
              "endpoint specs",
              "node status", "leader leases", "scale targets", "placement status", "dead letters",
              "idempotent submits"}
    assert {c.name for c in s.REGISTRY if _reads(c)} == fuzzed


async def test_garbage_on_every_channel_is_counted_and_dropped(fuzz_cluster):
    cluster = fuzz_cluster
    ep = cluster.create_endpoint(name="fuzz", command=WORKER, workersMin=1, workersMax=1, flashboot=False)
    cluster.wait_workers(ep, 1)
    headers = {"Authorization": f"Bearer {cluster.api_key}"}
    nc = await nats.connect(cluster.nats.url)
    try:
        async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=headers, timeout=60) as http:
            workers_before = [w["id"] for w in (await http.get(f"/v1/endpoints/{ep}/workers")).json()]
            assert len(workers_before) == 1
            spec = EndpointSpec(id=ep, name="x", command=["true"])

            # -- node commands and worker logs (request/reply): every one answered, none crashes --
            for name, data in [*garbage(StartWorker(worker_id="wfuzz", spec=spec),
                                        other=CancelJob(job_id="j", endpoint_id=ep), seed=1),
                               ("stop with the start tag", wrong_tag(StopWorker(worker_id="wfuzz"), "start_worker"))]:
                reply = REPLY.decode((await nc.request(s.node_cmd(NODE), data, timeout=10)).data)
                assert not reply.ok and "undecodable" in (reply.error or ""), name
            for name, data in garbage(WorkerLogsRequest(endpoint_id=ep), other=spec, seed=2):
                answer = (await nc.request(s.node_logs(NODE), data, timeout=10)).data
                if name == "map without its tag":  # a lone tagged Struct decodes without its tag
                    assert LOGS_REPLY.decode(answer).node_id == NODE
                    continue
                reply = REPLY.decode(answer)
                assert not reply.ok and "undecodable" in (reply.error or ""), name
            # Well-formed but absurd: an unknown worker, an unknown GPU, a silly limit.
            reply = REPLY.decode((await nc.request(s.node_cmd(NODE), encode(StopWorker(
                worker_id="nobody", only_if_idle=False)), timeout=10)).data)
            assert reply.ok
            reply = REPLY.decode((await nc.request(s.node_cmd(NODE), encode(StartWorker(
                worker_id="wghost", spec=spec, gpu_uuids=["GPU-nope"])), timeout=10)).data)
            assert not reply.ok and "GPU" in reply.error
            for limit in (-5, 2**63 - 1):
                logs = LOGS_REPLY.decode((await nc.request(s.node_logs(NODE), encode(WorkerLogsRequest(
                    endpoint_id=ep, limit=limit, after_seq=-(2**63))), timeout=10)).data)
                assert logs.node_id == NODE

            # -- cancels (core, every agent listens) --
            cancels = garbage(CancelJob(job_id="j", endpoint_id=ep), other=spec, seed=3)
            for _, data in cancels:
                await nc.publish(s.job_cancel(ep), data)
            await nc.publish(s.job_cancel(ep), encode(CancelJob(job_id="nosuchjob", endpoint_id=ep)))
            await nc.flush()

            # -- the job queues: garbage is terminated, never redelivered for good --
            js = nc.jetstream()
            jobs_kv = await js.key_value(s.KV_JOBS)
            queued = JobQueued(job_id="j", endpoint_id=ep, submitted_at_ms=_now_ms())
            queue_garbage = garbage(queued, other=CancelJob(job_id="j", endpoint_id=ep), seed=4)
            for _, data in queue_garbage:
                await js.publish(s.job_queue(ep), data)
            for _, data in queue_garbage[:4]:
                await js.publish(s.job_queue(ep, low_priority=True), data)
            # Well-formed, but: submitted in the far future with no record; a record that is garbage.
            await js.publish(s.job_queue(ep), encode(JobQueued(job_id="from-the-future", endpoint_id=ep,
                                                               submitted_at_ms=2**62)))
            await jobs_kv.put(s.job_key(ep, "garbled-record"), b"\x92\x01\x02 not a record")
            await js.publish(s.job_queue(ep), encode(JobQueued(job_id="garbled-record", endpoint_id=ep,
                                                               submitted_at_ms=_now_ms())))

            # -- job events while a /runsync waits; then chunks of that job --
            runsync = asyncio.ensure_future(http.post(f"/v2/{ep}/runsync?wait=60000",
                                                      json={"input": {"sleep": 4}}))

            async def sync_job() -> str | None:
                keys = await jobs_kv.keys()
                return next((k.split(".", 1)[1] for k in keys if k.startswith(f"{ep}.sync-")), None)

            job_id = await async_wait_until(sync_job, timeout_s=30, what="the /runsync job's record")
            # The waiting replica's records subject (the job id ends with its token): garbage,
            # another job's terminal record and a delete marker, never this job's answer. (A
            # record of the job that decodes is one only the store itself publishes there.)
            token = job_id[-16:]
            mine = f"rp.jobrec.{ep}.{job_id[:-16]}.{token}"
            records = [data for name, data in garbage(_record(job_id, ep), other=queued, seed=8)
                       if name not in ("map without its tag", "unknown tag")]  # both decode: no tag
            for data in records:
                await nc.publish(mine, data)
            await nc.publish(mine, encode(_record("someone-else", ep)))
            await nc.publish(mine, b"", headers={"KV-Operation": "DEL"})
            # The job's own events subject, while a /status-sync long-poll waits on it.
            status = asyncio.ensure_future(http.get(f"/v2/{ep}/status-sync/{job_id}?wait=60000"))
            events = garbage(JobChanged(record=_record(job_id, ep)), other=queued, seed=5)
            gw = cluster.metrics_url("gateway")
            gw_dropped = "rp_gateway_dropped_messages_total"

            async def events_dropped() -> bool:  # published again until the long-poll is listening
                for _, data in events:
                    await nc.publish(s.job_events(job_id), data)
                await nc.publish(s.job_events(job_id), encode(JobChanged(record=_record("someone-else", ep))))
                return await metric(http, gw, gw_dropped, subject="job events") >= len(events)

            await async_wait_until(events_dropped, timeout_s=30, interval_s=0.2, what="event garbage dropped")
            resp = await runsync
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["id"] == job_id and body["status"] == "COMPLETED", body
            assert body["output"]["echo"] == {"sleep": 4} and body["output"]["id"] == job_id
            polled = (await status).json()
            assert polled["status"] == "COMPLETED" and polled["output"] == body["output"], polled

            chunk = StreamChunk(job_id=job_id, index=0, chunk_json=b'{"output": 1}')
            for _, data in garbage(chunk, other=queued, seed=6):
                await js.publish(s.job_chunks(job_id), data)
            await js.publish(s.job_chunks(job_id), encode(StreamChunk(
                job_id=job_id, index=0, chunk_json=b'{"output": not json')))
            await js.publish(s.job_chunks(job_id), encode(StreamChunk(
                job_id="someone-else", index=0, chunk_json=b'{"output": "stolen"}')))
            await js.publish(s.job_chunks(job_id), encode(StreamChunk(
                job_id=job_id, index=1, chunk_json=b'{"output": "ok"}')))
            resp = await http.get(f"/v2/{ep}/stream/{job_id}")
            assert resp.status_code == 200, resp.text
            assert resp.json()["stream"] == [{"output": "ok"}]

            # -- webhooks due: garbage terminated, an unknown job skipped --
            for _, data in garbage(WebhookDue(job_id=job_id, endpoint_id=ep), other=queued, seed=7):
                await js.publish(s.webhook_due(ep), data)
            await js.publish(s.webhook_due(ep), encode(WebhookDue(job_id="nosuchjob", endpoint_id=ep)))

            # -- KV: garbage on unused keys and on live ones --
            buckets = {b: await js.key_value(b) for b in (s.KV_NODES, s.KV_ENDPOINTS, s.KV_SCALE,
                                                          s.KV_JOBS, s.KV_PLACEMENT, s.KV_LEASES)}
            original_spec = (await buckets[s.KV_ENDPOINTS].get(ep)).value
            samples = {
                s.KV_NODES: NodeStatus(node_id=NODE, hostname="h", runtime="process"),
                s.KV_ENDPOINTS: spec,
                s.KV_SCALE: ScaleTarget(endpoint_id=ep, desired_workers=1),
                s.KV_JOBS: _record("junkjob", ep),
                s.KV_PLACEMENT: PlacementStatus(endpoint_id=ep, pending_workers=1, reason="r"),
                s.KV_LEASES: Lease(holder="x", expires_at_ms=1),
            }
            keys = {
                s.KV_NODES: ["ghost", NODE],
                s.KV_ENDPOINTS: ["junkep", ep],
                s.KV_SCALE: ["junkscale", ep],
                s.KV_JOBS: [s.job_key(ep, "junkjob")],
                s.KV_PLACEMENT: ["junkplace", ep],
                s.KV_LEASES: ["scheduler", "autoscaler"],
            }
            for seed, (bucket, kv) in enumerate(buckets.items(), start=10):
                variants = garbage(samples[bucket], other=queued, seed=seed)
                # The last value a key keeps is garbage too ("random bytes").
                variants.append(variants[1])
                for key in keys[bucket]:
                    for _, data in variants:
                        await kv.put(key, data)
            # Dead letters and idempotent submits (the gateway reads both): garbage on an unused
            # key and on a live idempotency entry; the listing skips it, a repeat of the live key
            # is answered with a clear error or a job, never a 5xx.
            resp = await http.post(f"/v2/{ep}/run", json={"input": {"k": 1}}, headers={"Idempotency-Key": "k1"})
            assert resp.status_code == 200, resp.text
            dead = await js.key_value(s.KV_DEAD_LETTERS)
            idem = await js.key_value(s.KV_IDEMPOTENCY)
            live_idem = [k for k in await idem.keys() if k.startswith(f"{ep}.")]
            assert len(live_idem) == 1
            dead_sample = DeadLetter(job_id="junkjob", endpoint_id=ep, status="FAILED", error="e",
                                     submitted_at_ms=1, failed_at_ms=2,
                                     policy=JobPolicy(execution_timeout_ms=60_000, ttl_ms=60_000))
            idem_sample = IdempotentSubmit(job_id="junkjob", endpoint_id=ep, created_at_ms=1, body_sha256="0")
            for seed, (kv, sample, names) in enumerate(((dead, dead_sample, [f"{ep}.junkjob"]),
                                                        (idem, idem_sample, [f"{ep}.junk", *live_idem])), start=30):
                variants = garbage(sample, other=queued, seed=seed)
                variants.append(variants[1])
                for key in names:
                    for _, data in variants:
                        await kv.put(key, data)
            resp = await http.get(f"/v1/endpoints/{ep}/dead-letters")
            assert resp.status_code == 200 and resp.json()["deadLetters"] == [], resp.text
            resp = await http.post(f"/v2/{ep}/run", json={"input": {"k": 1}}, headers={"Idempotency-Key": "k1"})
            # Either a job (200 with its id) or a clear error (4xx with a message): never a 5xx.
            body = resp.json()
            if resp.status_code == 200:
                assert "id" in body, resp.text
            else:
                assert 400 <= resp.status_code < 500 and body.get("error"), resp.text

            # Well-formed entries under a key that is not theirs.
            await buckets[s.KV_SCALE].put("forged", encode(ScaleTarget(endpoint_id=ep, desired_workers=9)))
            await buckets[s.KV_NODES].put("forged", encode(NodeStatus(
                node_id=NODE, hostname="forged", runtime="process", heartbeat_at_ms=1)))

            # The gateway still answers about the endpoint (its last good spec, no placement).
            resp = await http.get(f"/v2/{ep}/health")
            assert resp.status_code == 200, resp.text
            assert "placement" not in resp.json()
            # The management API lists what KV holds: the garbled specs are left out.
            resp = await http.get("/v1/endpoints")
            assert resp.status_code == 200 and ep not in [e["id"] for e in resp.json()]
            resp = await http.get("/v1/nodes")
            assert resp.status_code == 200, resp.text

            # The leaders overwrite the garbage in their lease and keep leading.
            async def leases_readable() -> bool:
                for role in ("scheduler", "autoscaler"):
                    try:
                        LEASE.decode((await buckets[s.KV_LEASES].get(role)).value)
                    except msgspec.DecodeError:
                        return False
                return True

            await async_wait_until(leases_readable, timeout_s=20, what="the leaders' leases rewritten")
            # The node's own status is rewritten by its next heartbeat.
            await async_wait_until(lambda: _decodes(buckets[s.KV_NODES], NODE, NodeStatus), timeout_s=20,
                                   what="node status rewritten")

            # Repair the spec (as an operator would), then everything works as before.
            await buckets[s.KV_ENDPOINTS].put(ep, original_spec)
            assert cluster.dead() == []
            resp = await http.post(f"/v2/{ep}/runsync?wait=60000", json={"input": {"after": "garbage"}})
            body = resp.json()
            assert body["status"] == "COMPLETED" and body["output"]["echo"] == {"after": "garbage"}, body
            workers_after = [w["id"] for w in (await http.get(f"/v1/endpoints/{ep}/workers")).json()]
            assert workers_after == workers_before
            # A new endpoint is still scaled (autoscaler) and placed (scheduler).
            ep2 = (await http.post("/v1/endpoints", json={
                "name": "after", "command": WORKER, "workersMin": 1, "flashboot": False})).json()["id"]
            await async_wait_until(lambda: _decodes(buckets[s.KV_SCALE], ep2, ScaleTarget), timeout_s=30,
                                   what="scale target of a new endpoint")
            resp = await http.post(f"/v2/{ep2}/runsync?wait=60000", json={"input": {"new": 1}})
            assert resp.json()["status"] == "COMPLETED", resp.text

            # Nothing garbage put on a queue is left for redelivery.
            async def queues_empty() -> bool:
                jobs = await js.stream_info(s.STREAM_JOBS)
                hooks = await js.stream_info(s.STREAM_WEBHOOKS)
                return jobs.state.messages == 0 and hooks.state.messages == 0

            await async_wait_until(queues_empty, timeout_s=40, what="job and webhook queues empty")

            # Counted by whoever dropped them.
            agent = cluster.metrics_url(NODE)
            dropped = "rp_bus_dropped_messages_total"
            assert await metric(http, agent, dropped, subject=s.node_cmd(NODE)) >= 17
            assert await metric(http, agent, dropped, subject=s.node_logs(NODE)) >= 15
            # (A lone tagged Struct decodes without its tag: "map without its tag" is a valid message.)
            assert await metric(http, agent, dropped, subject=s.ALL_CANCELS) >= len(cancels) - 1
            skipped = "rp_node_agent_jobs_skipped_total"
            assert await metric(http, agent, skipped, endpoint=ep, reason="undecodable") >= len(queue_garbage) + 3
            assert await metric(http, agent, skipped, endpoint=ep, reason="missing") >= 2
            # The garbage on the replica's records subject (another job's end there is no garbage:
            # the end of a /runsync whose wait ran out looks the same, and is let go quietly).
            assert await metric(http, gw, gw_dropped, subject="job records") >= len(records)
            assert await metric(http, gw, gw_dropped, subject=s.ALL_JOB_CHUNKS) >= 3
            assert await metric(http, gw, gw_dropped, subject=s.webhook_due(ep)) >= 10
            undecodable = "rp_bus_undecodable_values_total"
            for service, bucket_names in {
                "gateway": (s.KV_NODES, s.KV_ENDPOINTS, s.KV_PLACEMENT),
                "scheduler": (s.KV_NODES, s.KV_ENDPOINTS, s.KV_SCALE, s.KV_LEASES),
                "autoscaler": (s.KV_NODES, s.KV_ENDPOINTS, s.KV_LEASES),
                NODE: (s.KV_JOBS,),
            }.items():
                for bucket in bucket_names:
                    assert await metric(http, cluster.metrics_url(service), undecodable, bucket=bucket) >= 1, \
                        (service, bucket)
        assert cluster.dead() == []
        for name, svc in cluster.services.items():
            assert "Traceback" not in svc.log_text(), f"{name} logged a traceback:\n{svc.log_text()[-4000:]}"
    finally:
        await nc.close()


async def _decodes(kv, key: str, type_) -> bool:
    try:
        entry = await kv.get(key)
        Codec(type_).decode(entry.value)
        return True
    except Exception:
        return False

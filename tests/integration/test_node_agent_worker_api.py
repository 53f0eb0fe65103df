"""The worker-facing HTTP protocol, driven by hand: a placeholder worker process (it just
sleeps) provides a real worker id and token; the test speaks the protocol itself."""

from __future__ import annotations

import json
import sys
import time
import uuid

import httpx
import msgspec
import pytest
import pytest_asyncio
from node_agent_harness import (
    output_of,
    record_of,
    start_worker,
    submit,
    wait_record,
    worker_environ,
    worker_pid,
)
from runplane_proto import subjects as s
from runplane_proto.codec import Codec
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.jobs import (
    CancelJob, ChunkAdded, JobChanged, JobEvent, JobPolicy, JobQueued, JobRecord, StreamChunk,
)
from runplane_testing.waiting import async_wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")
# A wide as-sent window: the hand-driven takes below must not depend on how busy the machine is.
AGENT_OPTIONS = {"take_poll_s": 1.0, "as_sent_window_ms": 60_000}

EVENTS: Codec[JobEvent] = Codec(JobEvent)
CHUNK: Codec[StreamChunk] = Codec(StreamChunk)
FORM = {"Content-Type": "application/x-www-form-urlencoded", "charset": "utf-8"}


@pytest_asyncio.fixture(loop_scope="module")
async def http():
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


class HandWorker:
    """The env a real worker would get, used to speak the protocol from the test."""

    def __init__(self, worker_id: str, env: dict[str, str]) -> None:
        self.worker_id = worker_id
        self.env = env
        self.key = env["RUNPOD_AI_API_KEY"]
        self.take_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", worker_id)

    def done_url(self, job_id: str, stream: bool = False) -> str:
        url = self.env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", self.worker_id)
        return url.replace("$ID", job_id) + f"&isStream={'true' if stream else 'false'}"

    def stream_url(self, job_id: str) -> str:
        url = self.env["RUNPOD_WEBHOOK_POST_STREAM"].replace("$RUNPOD_POD_ID", self.worker_id)
        return url.replace("$ID", job_id) + "&isStream=false"

    def ping_url(self) -> str:
        return self.env["RUNPOD_WEBHOOK_PING"].replace("$RUNPOD_POD_ID", self.worker_id)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": self.key}

    async def take(self, http: httpx.AsyncClient, in_progress: int = 0) -> httpx.Response:
        return await http.get(f"{self.take_url}&job_in_progress={in_progress}", headers=self.auth)

    async def done(self, http: httpx.AsyncClient, job_id: str, body: object, stream: bool = False):
        return await http.post(self.done_url(job_id, stream), content=json.dumps(body),
                               headers={**self.auth, **FORM})


async def hand_worker(bus, agent, endpoint_id: str | None = None) -> HandWorker:
    endpoint_id = endpoint_id or f"ep{uuid.uuid4().hex[:8]}"
    spec = EndpointSpec(id=endpoint_id, name=endpoint_id, env={"RP_NATS_URL": "nats://leak", "MY_VAR": "1"},
                        command=[sys.executable, "-c", "import time; time.sleep(600)"])
    worker_id = await start_worker(bus, agent.settings.node_id, spec, ready=False)
    pid = await async_wait_until(lambda: (worker_pid(worker_id)), what="worker process")
    return HandWorker(worker_id, worker_environ(pid))


async def test_worker_env_follows_the_runpod_contract(bus, agent):
    worker = await hand_worker(bus, agent)
    env = worker.env
    ep = env["RUNPOD_ENDPOINT_ID"]
    assert env["RUNPOD_POD_ID"] == worker.worker_id
    for name in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_POST_OUTPUT", "RUNPOD_WEBHOOK_POST_STREAM",
                 "RUNPOD_WEBHOOK_PING"):
        assert "?" in env[name] and env[name].startswith(agent.url + f"/v2/{ep}/")
    assert env["RUNPOD_WEBHOOK_GET_JOB"].endswith("/job-take/$ID?gpu=cpu")
    assert "/job-done/$RUNPOD_POD_ID/$ID?" in env["RUNPOD_WEBHOOK_POST_OUTPUT"]
    assert env["RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"] == "true"
    assert env["RUNPOD_PING_INTERVAL"] == "1000"
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["MY_VAR"] == "1"
    assert not [k for k in env if k.startswith("RP_")], "workers never get NATS or agent settings"


async def test_bad_key_is_401_and_wrong_endpoint_is_403(bus, agent, http):
    worker = await hand_worker(bus, agent)
    wrong = await http.get(f"{worker.take_url}&job_in_progress=0", headers={"Authorization": "nope"})
    assert wrong.status_code == 401
    missing = await http.get(f"{worker.take_url}&job_in_progress=0")
    assert missing.status_code == 401
    stranger = worker.take_url.replace(worker.worker_id, "nosuchworker")
    assert (await http.get(stranger, headers=worker.auth)).status_code == 401
    other_ep = worker.take_url.replace(f"/v2/{worker.env['RUNPOD_ENDPOINT_ID']}/", "/v2/otherep/")
    assert (await http.get(other_ep, headers=worker.auth)).status_code == 403
    bearer = await http.post(worker.ping_url(), headers={"Authorization": f"Bearer {worker.key}"})
    assert bearer.status_code == 200


async def test_take_long_polls_then_answers_204(bus, agent, http):
    worker = await hand_worker(bus, agent)
    started = time.monotonic()
    response = await worker.take(http)
    assert response.status_code == 204
    assert time.monotonic() - started >= 0.9  # held for RP_TAKE_POLL_S (1 s here)
    stop = await http.get(worker.take_url.replace("/job-take/", "/job-stop/"), headers=worker.auth)
    assert stop.status_code == 204


async def test_take_hands_over_input_and_extra_keys(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    events = []
    job_id = f"{uuid.uuid4()}-r1"
    await collect_events(bus, job_id, events)
    await submit(bus, ep, {"prompt": "ünïcode", "n": [1, 2]}, job_id=job_id,
                 webhook="http://hook.example/x", extra={"s3Config": {"bucketName": "b"}})
    response = await worker.take(http)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"id": job_id, "input": {"prompt": "ünïcode", "n": [1, 2]},
                               "webhook": "http://hook.example/x", "s3Config": {"bucketName": "b"},
                               "attempt": 1}
    record = await wait_record(bus, ep, job_id, "IN_PROGRESS")
    assert record.worker_id == worker.worker_id and record.node_id == agent.settings.node_id
    assert record.attempts == 1 and record.started_at_ms
    await async_wait_until(lambda: (any(isinstance(e, JobChanged) for e in events)))
    assert events[0].record.status == "IN_PROGRESS"
    await worker.done(http, job_id, {"output": "ok"})
    await wait_record(bus, ep, job_id, "COMPLETED")


async def collect_events(bus, job_id: str, into: list) -> None:
    async def on_event(msg) -> None:
        into.append(EVENTS.decode(msg.data))
    await bus.nc.subscribe(s.job_events(job_id), cb=on_event)


async def test_result_bodies_map_to_completed_and_failed(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    cases = [
        ({"output": {"a": 1}}, "COMPLETED", {"a": 1}, None),
        ({"output": None}, "COMPLETED", None, None),
        ({}, "COMPLETED", None, None),
        ({"error": "bad input"}, "FAILED", None, "bad input"),
        ({"output": [1], "error": "half"}, "FAILED", [1], "half"),
        ({"error": {"code": 7}}, "FAILED", None, '{"code": 7}'),
    ]
    for body, status, output, error in cases:
        job_id = await submit(bus, ep, {"x": 1})
        assert (await worker.take(http)).json()["id"] == job_id
        response = await worker.done(http, job_id, body)
        assert response.status_code == 200
        record = await wait_record(bus, ep, job_id)
        assert (record.status, output_of(record), record.error) == (status, output, error), body
        assert record.completed_at_ms and record.completed_at_ms >= record.started_at_ms
    bad = await http.post(worker.done_url("nojob"), content=b"not json", headers={**worker.auth, **FORM})
    assert bad.status_code == 400


async def test_progress_shows_while_running_and_never_overwrites_the_result(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    job_id = await submit(bus, ep, {"x": 1})
    assert (await worker.take(http)).status_code == 200
    await worker.done(http, job_id, {"status": "IN_PROGRESS", "output": {"pct": 50}})
    record = await wait_record(bus, ep, job_id, "IN_PROGRESS", where=lambda r: r.output_json is not None)
    assert output_of(record) == {"pct": 50}
    await worker.done(http, job_id, {"output": "final"})
    await wait_record(bus, ep, job_id, "COMPLETED")
    late = await worker.done(http, job_id, {"status": "IN_PROGRESS", "output": {"pct": 99}})
    assert late.status_code == 200
    record = await record_of(bus, ep, job_id)
    assert record.status == "COMPLETED" and output_of(record) == "final"
    again = await worker.done(http, job_id, {"output": "again"})
    assert again.status_code == 404
    assert output_of(await record_of(bus, ep, job_id)) == "final"


async def test_stream_chunks_are_stored_in_order_and_announced(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    job_id = f"{uuid.uuid4()}-r1"
    events = []
    await collect_events(bus, job_id, events)
    await submit(bus, ep, {"x": 1}, job_id=job_id)
    assert (await worker.take(http)).status_code == 200
    for i in range(3):
        response = await http.post(worker.stream_url(job_id), content=json.dumps({"output": {"i": i}}),
                                   headers={**worker.auth, **FORM})
        assert response.status_code == 200
    await worker.done(http, job_id, {"output": [{"i": 0}, {"i": 1}, {"i": 2}]}, stream=True)
    record = await wait_record(bus, ep, job_id, "COMPLETED")
    assert record.chunks == 3 and output_of(record) == [{"i": 0}, {"i": 1}, {"i": 2}]
    chunks = await read_chunks(bus, job_id, 3)
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [msgspec.json.decode(c.chunk_json) for c in chunks] == [{"output": {"i": i}} for i in range(3)]
    await async_wait_until(lambda: (any(isinstance(e, JobChanged) and e.record.status == "COMPLETED"
                                              for e in events)))
    assert [e.index for e in events if isinstance(e, ChunkAdded)] == [0, 1, 2]


async def read_chunks(bus, job_id: str, n: int) -> list[StreamChunk]:
    sub = await bus.js.pull_subscribe(s.job_chunks(job_id), stream=s.STREAM_CHUNKS)
    try:
        msgs = await sub.fetch(n, timeout=5)
        return [CHUNK.decode(m.data) for m in msgs]
    finally:
        await sub.unsubscribe()


async def test_cancelled_job_is_offered_until_the_worker_lets_go(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    job_id = await submit(bus, ep, {"x": 1})
    assert (await worker.take(http)).status_code == 200
    await wait_record(bus, ep, job_id, "IN_PROGRESS")
    await cancel_like_the_gateway(bus, ep, job_id)
    stop_url = worker.take_url.replace("/job-take/", "/job-stop/")
    first = await http.get(stop_url, headers=worker.auth)
    assert first.status_code == 200 and first.json() == {"jobsToStop": [job_id]}
    again = await http.get(stop_url, headers=worker.auth)  # still held: offered again
    assert again.json() == {"jobsToStop": [job_id]}
    # A ping that no longer lists the job means the worker let go of it.
    ping = await http.get(worker.ping_url() + "&runpod_version=1.12.0", headers=worker.auth)
    assert ping.status_code == 200
    await async_wait_until(lambda: consumer_settled(bus, ep), what="message acked")
    assert (await http.get(stop_url, headers=worker.auth)).status_code == 204
    late = await worker.done(http, job_id, {"output": "too late"})
    assert late.status_code == 404
    assert (await record_of(bus, ep, job_id)).status == "CANCELLED"


async def cancel_like_the_gateway(bus, endpoint_id: str, job_id: str) -> None:
    """Read, modify, write again on a conflict (the agent may be writing the claim or a
    progress update meanwhile), then tell the agents."""
    written = await bus.jobs.modify(s.job_key(endpoint_id, job_id), lambda r: msgspec.structs.replace(
        r, status="CANCELLED", completed_at_ms=int(time.time() * 1000)))
    assert written is not None and written.value.status == "CANCELLED"
    await bus.publish(s.job_events(job_id), JobChanged(record=written.value))
    await bus.publish(s.job_cancel(endpoint_id), CancelJob(job_id=job_id, endpoint_id=endpoint_id))


async def consumer_settled(bus, endpoint_id: str) -> bool:
    info = await bus.js.consumer_info(s.STREAM_JOBS, s.job_consumer(endpoint_id))
    return info.num_ack_pending == 0 and info.num_pending == 0


async def test_worker_that_keeps_a_stopped_job_is_recycled_after_the_grace(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    old_pid = worker_pid(worker.worker_id)
    job_id = await submit(bus, ep, {"x": 1})
    assert (await worker.take(http)).status_code == 200
    await wait_record(bus, ep, job_id, "IN_PROGRESS")
    await cancel_like_the_gateway(bus, ep, job_id)
    # The placeholder never lets go: after RP_STOP_GRACE_S it is replaced by a fresh process.
    new_pid = await async_wait_until(lambda: (_other_pid(worker.worker_id, old_pid)), timeout_s=20,
                                     what="recycled worker")
    assert worker_environ(new_pid)["RUNPOD_AI_API_KEY"] != worker.key
    await async_wait_until(lambda: consumer_settled(bus, ep), what="message acked")
    assert (await record_of(bus, ep, job_id)).status == "CANCELLED"
    assert (await worker.take(http)).status_code == 401  # the old token died with the old process


def _other_pid(worker_id: str, old_pid: int | None) -> int | None:
    pid = worker_pid(worker_id)
    return pid if pid is not None and pid != old_pid else None


async def test_only_the_holding_worker_may_report(bus, agent, http):
    first = await hand_worker(bus, agent)
    ep = first.env["RUNPOD_ENDPOINT_ID"]
    second = await hand_worker(bus, agent, ep)
    job_id = await submit(bus, ep, {"x": 1})
    assert (await first.take(http)).status_code == 200
    assert (await second.done(http, job_id, {"output": "not mine"})).status_code == 404
    assert (await first.done(http, job_id, {"output": "mine"})).status_code == 200
    assert output_of(await wait_record(bus, ep, job_id, "COMPLETED")) == "mine"


async def test_batch_take_answers_a_list(bus, agent, http):
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    ids = [await submit(bus, ep, {"i": i}) for i in range(3)]
    url = worker.take_url.replace("/job-take/", "/job-take-batch/") + "&batch_size=5&job_in_progress=0"
    response = await http.get(url, headers=worker.auth)
    assert response.status_code == 200
    jobs = response.json()
    assert isinstance(jobs, list) and sorted(j["id"] for j in jobs) == sorted(ids)
    for job in jobs:
        await worker.done(http, job["id"], {"output": job["input"]})
    for i, job_id in enumerate(ids):
        assert output_of(await wait_record(bus, ep, job_id, "COMPLETED")) == {"i": i}


async def test_unhealthy_ping_recycles_the_worker(bus, agent, http):
    worker = await hand_worker(bus, agent)
    old_pid = worker_pid(worker.worker_id)
    response = await http.get(worker.ping_url() + "&status=unhealthy&check=disk&reason=full",
                              headers=worker.auth)
    assert response.status_code == 200
    await async_wait_until(lambda: (_other_pid(worker.worker_id, old_pid)), timeout_s=20,
                           what="recycled worker")


async def test_metrics_and_healthz(agent, http):
    assert (await http.get(f"{agent.url}/healthz")).json() == {"status": "ok"}
    metrics = (await http.get(f"{agent.url}/metrics")).text
    assert "rp_node_agent_jobs_taken_total" in metrics and "rp_node_agent_take_polls_waiting" in metrics


# -- a first delivery handed over from the record its message carries --------------------------


async def _queue_with_record(bus, ep: str, job_input: object, *, stored_status: str | None) -> str:
    """A job whose queue message carries its IN_QUEUE record (as the gateway sends it); the
    stored record has `stored_status` (None: not stored, as if its write were still on the way)."""
    job_id = f"{uuid.uuid4()}-r1"
    now_ms = int(time.time() * 1000)
    sent = JobRecord(id=job_id, endpoint_id=ep, status="IN_QUEUE", submitted_at_ms=now_ms,
                     policy=JobPolicy(execution_timeout_ms=600_000, ttl_ms=86_400_000),
                     input_json=json.dumps(job_input).encode())
    if stored_status is not None:
        await bus.jobs.create(s.job_key(ep, job_id), msgspec.structs.replace(sent, status=stored_status))
    await bus.publish_durable(s.job_queue(ep), JobQueued(job_id=job_id, endpoint_id=ep, submitted_at_ms=now_ms,
                                                         record=sent), msg_id=f"{job_id}:0")
    return job_id


async def stops_offered(worker: HandWorker, http: httpx.AsyncClient) -> list[str]:
    stop = await http.get(worker.take_url.replace("/job-take/", "/job-stop/"), headers=worker.auth)
    return stop.json()["jobsToStop"] if stop.status_code == 200 else []


async def test_a_job_cancelled_before_its_claim_is_stopped_and_stays_cancelled(bus, agent, http):
    """The worker gets the job from its message at once; the claim write finds it CANCELLED:
    the worker is told to stop, the message is acked, nothing is written over the cancel."""
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    job_id = await _queue_with_record(bus, ep, {"n": 1}, stored_status="CANCELLED")
    taken = await worker.take(http)
    assert taken.status_code == 200 and taken.json() == {"id": job_id, "input": {"n": 1}, "attempt": 1}
    assert await async_wait_until(lambda: stops_offered(worker, http), timeout_s=10, what="a stop") == [job_id]
    # A result sent anyway lets the job go and changes nothing.
    assert (await worker.done(http, job_id, {"output": "late"})).status_code == 200
    await async_wait_until(lambda: consumer_settled(bus, ep), timeout_s=20, what="message acked")
    record = await record_of(bus, ep, job_id)
    assert record.status == "CANCELLED" and record.worker_id is None and record.attempts == 0
    assert record.output_json is None


async def test_a_job_whose_record_is_not_stored_yet_runs_once_it_is(bus, agent, http):
    """Handed over from its message while its record is not stored: stopped and given back to
    the queue; once the record is there, a delivery runs it to the end (no attempt counted for
    the stopped hand-over, which never became a claim)."""
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    job_id = await _queue_with_record(bus, ep, {"n": 2}, stored_status=None)
    first = await worker.take(http)
    assert first.status_code == 200 and first.json()["id"] == job_id
    assert await async_wait_until(lambda: stops_offered(worker, http), timeout_s=10, what="a stop") == [job_id]
    assert await record_of(bus, ep, job_id) is None
    now_ms = int(time.time() * 1000)
    await bus.jobs.create(s.job_key(ep, job_id), JobRecord(
        id=job_id, endpoint_id=ep, status="IN_QUEUE", submitted_at_ms=now_ms, input_json=b'{"n": 2}',
        policy=JobPolicy(execution_timeout_ms=600_000, ttl_ms=86_400_000)))

    async def taken_again() -> httpx.Response | None:
        response = await worker.take(http)
        return response if response.status_code == 200 else None

    again = await async_wait_until(taken_again, timeout_s=20, what="the job delivered again")
    assert again.json() == {"id": job_id, "input": {"n": 2}, "attempt": 1}
    await wait_record(bus, ep, job_id, "IN_PROGRESS")
    assert (await worker.done(http, job_id, {"output": "ran"})).status_code == 200
    record = await wait_record(bus, ep, job_id, "COMPLETED")
    assert output_of(record) == "ran" and record.attempts == 1
    await async_wait_until(lambda: consumer_settled(bus, ep), timeout_s=20, what="message acked")


async def test_results_right_after_the_take_end_the_job_with_its_attempt_counted(bus, agent, http):
    """A result may arrive before the claim is written (then the terminal write carries it):
    either way the record ends COMPLETED with one attempt by this worker, its start time set,
    and no IN_PROGRESS is ever announced after the end."""
    worker = await hand_worker(bus, agent)
    ep = worker.env["RUNPOD_ENDPOINT_ID"]
    for n in range(15):
        job_id = f"{uuid.uuid4()}-r1"
        events: list = []
        await collect_events(bus, job_id, events)
        await submit(bus, ep, {"n": n}, job_id=job_id)
        taken = await worker.take(http)
        assert taken.status_code == 200 and taken.json()["id"] == job_id
        assert (await worker.done(http, job_id, {"output": n})).status_code == 200
        record = await wait_record(bus, ep, job_id, "COMPLETED")
        assert output_of(record) == n and record.attempts == 1 and record.worker_id == worker.worker_id
        assert record.started_at_ms is not None and record.completed_at_ms >= record.started_at_ms
        await async_wait_until(lambda: (any(e.record.status == "COMPLETED" for e in events)),
                               what="the end announced")
        statuses = [e.record.status for e in events]
        assert statuses in (["COMPLETED"], ["IN_PROGRESS", "COMPLETED"]), statuses
    await async_wait_until(lambda: consumer_settled(bus, ep), timeout_s=20, what="messages acked")

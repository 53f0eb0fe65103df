"""Idempotent submits and the dead-letter API, the gateway in-process against a real
nats-server: two replicas racing on one Idempotency-Key make one job; a repeat answers the
original (and /runsync waits for it); bad keys and changed bodies are refused; the key's window
is a per-entry TTL. Dead letters written through the bus's one path (`count_job_end`) are listed
with filters and pages, replayed to the same and another endpoint (linked), and deleted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from runplane_bus import Bus, BusSettings
from runplane_gateway.app import Gateway
from runplane_gateway.settings import GatewaySettings
from runplane_proto import subjects
from runplane_proto.jobs import JobAttempt, JobPolicy, JobRecord
from runplane_service.clock import FakeClock
from runplane_testing.waiting import async_wait_until

KEY = "test-bootstrap-admin-key"
SETTINGS = GatewaySettings(api_key=KEY, rate_limits=False, runsync_wait_ms=5000, idempotency_window_s=2)


class Replica:
    def __init__(self, bus: Bus, gateway: Gateway) -> None:
        self.bus, self.gateway = bus, gateway

    def client(self, key: str = KEY) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.gateway.app), base_url="http://gw",
                                 headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture
async def replicas(nats_server) -> AsyncIterator[list[Replica]]:
    """Two gateway replicas, each with its own NATS connection, as two processes would be."""
    started = []
    for i in range(2):
        bus = await Bus.connect(BusSettings(url=nats_server.url, name=f"gateway-{i}", dead_letter_retention_s=3))
        started.append(Replica(bus, await Gateway.start(bus, SETTINGS, webhooks=False)))
    yield started
    for replica in started:
        await replica.gateway.stop()
        await replica.bus.close()


async def _endpoint(http: httpx.AsyncClient, name: str) -> str:
    resp = await http.post("/v1/endpoints", json={"name": name, "command": ["true"]})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


async def _queued(http: httpx.AsyncClient, ep: str) -> int:
    return (await http.get(f"/v2/{ep}/health")).json()["jobs"]["inQueue"]


# -- idempotent submits ----------------------------------------------------------------------------


async def test_two_replicas_racing_on_one_key_make_one_job(replicas) -> None:
    a, b = replicas[0].client(), replicas[1].client()
    async with a, b:
        ep = await _endpoint(a, "idem")
        for i in range(20):  # each key sent to both replicas at the same moment
            body = {"input": {"n": i}}
            headers = {"Idempotency-Key": f"order-{i}"}
            first, second = await asyncio.gather(a.post(f"/v2/{ep}/run", json=body, headers=headers),
                                                 b.post(f"/v2/{ep}/run", json=body, headers=headers))
            assert first.status_code == second.status_code == 200, (first.text, second.text)
            assert first.json()["id"] == second.json()["id"]
            replayed = [r.headers.get("idempotent-replayed") for r in (first, second)]
            assert sorted(replayed, key=str) == [None, "true"], replayed  # one made it, one replayed it
        await async_wait_until(lambda: _queued_is(a, ep, 20), timeout_s=5, what="20 jobs queued")
        # The body field is the same key as the header; whitespace and key order do not matter.
        again = await b.post(f"/v2/{ep}/run", content=b'{ "idempotencyKey":"order-3", "input": {"n": 3} }')
        first = await a.post(f"/v2/{ep}/run", json={"input": {"n": 3}}, headers={"Idempotency-Key": "order-3"})
        assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
        assert again.json()["status"] == "IN_QUEUE"
        assert await _queued(a, ep) == 20


async def _queued_is(http: httpx.AsyncClient, ep: str, n: int) -> bool:
    return await _queued(http, ep) == n


async def test_repeats_with_another_body_or_bad_keys_are_refused(replicas) -> None:
    async with replicas[0].client() as http:
        ep = await _endpoint(http, "idem-bad")
        ok = await http.post(f"/v2/{ep}/run", json={"input": 1}, headers={"Idempotency-Key": "k1"})
        assert ok.status_code == 200
        changed = await http.post(f"/v2/{ep}/run", json={"input": 2}, headers={"Idempotency-Key": "k1"})
        assert changed.status_code == 422 and ok.json()["id"] in changed.json()["error"], changed.text
        for headers, body, words in (
            ({"Idempotency-Key": "x" * 256}, {"input": 1}, "255"),
            ({}, {"input": 1, "idempotencyKey": "a\tb"}, "control"),
            ({}, {"input": 1, "idempotencyKey": 7}, "string"),
            ({}, {"input": 1, "idempotencyKey": ""}, "1 to 255"),
            ({"Idempotency-Key": "k2"}, {"input": 1, "idempotencyKey": "k3"}, "differ"),
        ):
            resp = await http.post(f"/v2/{ep}/run", json=body, headers=headers)
            assert resp.status_code == 400 and words in resp.json()["error"], resp.text
        assert await _queued(http, ep) == 1


async def test_keys_are_scoped_per_endpoint_and_api_key_and_expire(replicas) -> None:
    async with replicas[0].client() as admin:
        ep1, ep2 = await _endpoint(admin, "s1"), await _endpoint(admin, "s2")
        made = (await admin.post("/v1/keys", json={"name": "ci", "scope": "endpoint", "endpoints": [ep1]})).json()
        h = {"Idempotency-Key": "same"}
        on1 = (await admin.post(f"/v2/{ep1}/run", json={"input": 1}, headers=h)).json()["id"]
        on2 = (await admin.post(f"/v2/{ep2}/run", json={"input": 1}, headers=h)).json()["id"]
        async with replicas[1].client(made["key"]) as scoped:
            other_key = (await scoped.post(f"/v2/{ep1}/run", json={"input": 1}, headers=h)).json()["id"]
        assert len({on1, on2, other_key}) == 3
        # The window (2 s here) is the entry's TTL: after it the same key queues a new job.
        started = time.monotonic()

        async def renewed() -> bool:
            resp = await admin.post(f"/v2/{ep1}/run", json={"input": 1}, headers=h)
            return resp.json()["id"] != on1

        await async_wait_until(renewed, timeout_s=10, what="the key's entry expired")
        assert time.monotonic() - started > 0.5


async def test_runsync_repeat_waits_for_the_same_job(replicas) -> None:
    bus = replicas[0].bus
    async with replicas[0].client() as a, replicas[1].client() as b:
        ep = await _endpoint(a, "idem-sync")
        h = {"Idempotency-Key": "sync-1"}
        first = asyncio.ensure_future(a.post(f"/v2/{ep}/runsync", json={"input": {"x": 1}}, headers=h))
        ids: list[str] = []

        async def queued_job() -> bool:
            ids[:] = await bus.jobs.keys(subjects.endpoint_jobs_filter(ep))
            return len(ids) == 1

        await async_wait_until(queued_job, timeout_s=5, what="the first /runsync queued its job")
        second = asyncio.ensure_future(b.post(f"/v2/{ep}/runsync", json={"input": {"x": 1}}, headers=h))
        await asyncio.sleep(0.3)  # let the repeat start waiting (it must not queue a job meanwhile)
        assert not second.done() and len(await bus.jobs.keys(subjects.endpoint_jobs_filter(ep))) == 1
        # Finish the job as an agent would: the record, then the events both waiters follow.
        key = ids[0]
        got = await bus.jobs.get(key)
        done = msgspec.structs.replace(got.value, status="COMPLETED", output_json=b'{"ok":true}',
                                       started_at_ms=got.value.submitted_at_ms, completed_at_ms=int(time.time() * 1000))
        await bus.jobs.update(key, done, got.revision)
        await bus.job_changed(done)  # on the job's subject and the first replica's (/runsync)
        one, two = await first, await second
        assert one.json()["id"] == two.json()["id"] == done.id
        assert one.json()["output"] == two.json()["output"] == {"ok": True}
        assert "idempotent-replayed" not in one.headers and two.headers["idempotent-replayed"] == "true"


async def test_a_repeat_after_the_record_is_gone_answers_expired_and_queues_nothing(nats_server) -> None:
    """The key's window (24 h by default) outlives the job's record (30 min for /run): a repeat
    inside the window whose record is gone answers the original id with status EXPIRED, as a
    replay, and queues nothing; /status of the job is a 404. A record missing just after the
    first submit (still being written) reads IN_QUEUE instead. The gateway's clock is a fake."""
    clock = FakeClock(start_ms=int(time.time() * 1000))
    settings = msgspec.structs.replace(SETTINGS, idempotency_window_s=3600)
    bus = await Bus.connect(BusSettings(url=nats_server.url, name="gateway-fake-clock"))
    gateway = await Gateway.start(bus, settings, clock=clock, webhooks=False)
    try:
        async with Replica(bus, gateway).client() as http:
            ep = await _endpoint(http, "idem-expired")
            h = {"Idempotency-Key": "order-9"}
            job_id = (await http.post(f"/v2/{ep}/run", json={"input": 1}, headers=h)).json()["id"]
            key = subjects.job_key(ep, job_id)
            got = await bus.jobs.get(key)
            now_ms = clock.now_ms()
            await bus.jobs.update(key, msgspec.structs.replace(
                got.value, status="COMPLETED", output_json=b"1", started_at_ms=now_ms, completed_at_ms=now_ms),
                got.revision)

            async def repeats_answer(status: str) -> None:
                for path in ("run", "runsync"):
                    resp = await http.post(f"/v2/{ep}/{path}", json={"input": 1}, headers=h)
                    assert resp.status_code == 200, resp.text
                    assert resp.json() == {"id": job_id, "status": status}, (path, resp.text)
                    assert resp.headers["idempotent-replayed"] == "true"
                assert await _queued(http, ep) == 1  # only the first submit's job
                assert len(await bus.jobs.keys(subjects.endpoint_jobs_filter(ep))) <= 1

            # Past the result retention: the gateway hides the record (the janitor deletes it later).
            clock.advance(settings.result_retention_s + 1)
            assert (await http.get(f"/v2/{ep}/status/{job_id}")).status_code == 404
            await repeats_answer("EXPIRED")
            # Deleted by the janitor: the same answer.
            await bus.jobs.delete(key)
            await repeats_answer("EXPIRED")

            # A key whose record is missing moments after its submit: taken as still being written.
            h = {"Idempotency-Key": "order-10"}
            job_id = (await http.post(f"/v2/{ep}/run", json={"input": 2}, headers=h)).json()["id"]
            await bus.jobs.delete(subjects.job_key(ep, job_id))
            resp = await http.post(f"/v2/{ep}/run", json={"input": 2}, headers=h)
            assert resp.json() == {"id": job_id, "status": "IN_QUEUE"}, resp.text
            clock.advance(11)
            resp = await http.post(f"/v2/{ep}/run", json={"input": 2}, headers=h)
            assert resp.json() == {"id": job_id, "status": "EXPIRED"}, resp.text
    finally:
        await gateway.stop()
        await bus.close()


# -- dead letters ----------------------------------------------------------------------------------


def _failed(ep: str, job_id: str, *, at_ms: int, error: str, input_json: bytes) -> JobRecord:
    attempts = tuple(JobAttempt(number=n, worker_id=f"w{n}", node_id=f"n{n}", started_at_ms=at_ms - 100,
                                ended_at_ms=at_ms - 50, error=f"worker exited ({n})") for n in (1, 2))
    return JobRecord(id=job_id, endpoint_id=ep, status="FAILED", submitted_at_ms=at_ms - 1000,
                     policy=JobPolicy(execution_timeout_ms=600_000, ttl_ms=86_400_000), input_json=input_json,
                     completed_at_ms=at_ms, attempts=3, error=error, attempt_log=attempts)


async def test_dead_letters_listed_filtered_paged_replayed_and_deleted(replicas) -> None:
    bus = replicas[0].bus
    async with replicas[0].client() as http:
        ep, other = await _endpoint(http, "dlq"), await _endpoint(http, "dlq-other")
        base = 1_700_000_000_000
        for i in range(5):
            error = "CUDA out of memory" if i % 2 else "ValueError: bad input"
            await bus.count_job_end(_failed(ep, f"job-{i}", at_ms=base + i * 1000, error=error,
                                            input_json=b'{"n":%d}' % i))
        listed = (await http.get(f"/v1/endpoints/{ep}/dead-letters")).json()
        assert [d["jobId"] for d in listed["deadLetters"]] == [f"job-{i}" for i in (4, 3, 2, 1, 0)]
        first = listed["deadLetters"][0]
        assert first["status"] == "FAILED" and first["error"] == "ValueError: bad input"
        assert [(a["number"], a["workerId"], a["nodeId"], a["error"]) for a in first["attempts"]] == [
            (1, "w1", "n1", "worker exited (1)"), (2, "w2", "n2", "worker exited (2)")]
        assert "input" not in first and listed["next"] is None
        # Filters: time range (since inclusive, until exclusive) and error text in any attempt.
        q = f"since={base + 1000}&until={base + 4000}"
        ranged = (await http.get(f"/v1/endpoints/{ep}/dead-letters?{q}")).json()["deadLetters"]
        assert [d["jobId"] for d in ranged] == ["job-3", "job-2", "job-1"]
        cuda = (await http.get(f"/v1/endpoints/{ep}/dead-letters?error=cuda")).json()["deadLetters"]
        assert [d["jobId"] for d in cuda] == ["job-3", "job-1"]
        by_attempt = (await http.get(f"/v1/endpoints/{ep}/dead-letters?error=exited%20(2)")).json()
        assert len(by_attempt["deadLetters"]) == 5
        # Pages.
        seen, after = [], ""
        while True:
            page = (await http.get(f"/v1/endpoints/{ep}/dead-letters?limit=2&after={after}")).json()
            seen += [d["jobId"] for d in page["deadLetters"]]
            if page["next"] is None:
                break
            after = page["next"]
        assert seen == [f"job-{i}" for i in (4, 3, 2, 1, 0)]
        one = (await http.get(f"/v1/endpoints/{ep}/dead-letters/job-2")).json()
        assert one["input"] == {"n": 2}
        # Replay a selection to the same endpoint, then the CUDA ones to another.
        resp = await http.post(f"/v1/endpoints/{ep}/dead-letters/replay",
                               json={"jobIds": ["job-0", "job-2", "nope"]})
        assert resp.status_code == 200, resp.text
        same = resp.json()
        assert [(r["deadLetter"], r["endpointId"], r["status"]) for r in same["replayed"]] == [
            ("job-0", ep, "IN_QUEUE"), ("job-2", ep, "IN_QUEUE")]
        assert same["skipped"] == [{"deadLetter": "nope", "reason": "no such dead letter"}]
        new = await bus.jobs.get(subjects.job_key(ep, same["replayed"][1]["id"]))
        assert new.value.input_json == b'{"n":2}' and new.value.status == "IN_QUEUE"
        moved = (await http.post(f"/v1/endpoints/{ep}/dead-letters/replay",
                                 json={"all": True, "error": "CUDA", "endpointId": other})).json()
        assert [(r["deadLetter"], r["endpointId"]) for r in moved["replayed"]] == [("job-1", other), ("job-3", other)]
        assert await _queued(http, other) == 2 and await _queued(http, ep) == 2
        links = (await http.get(f"/v1/endpoints/{ep}/dead-letters/job-3")).json()["replays"]
        assert [(r["endpointId"], r["jobId"]) for r in links] == [(other, moved["replayed"][1]["id"])]
        bad = await http.post(f"/v1/endpoints/{ep}/dead-letters/replay", json={"jobIds": ["job-1"], "all": True})
        assert bad.status_code == 400
        # Bad requests are 400s naming the problem (the field, the JSON error, the parameter).
        d = f"/v1/endpoints/{ep}/dead-letters"
        for resp, words in (
            (await http.post(f"{d}/replay", json={"jobIds": "job-1"}), "replay: jobIds: expected `array | null`, got `str`"),
            (await http.post(f"{d}/replay", json={"all": True, "color": 1}), "replay: object contains unknown field"),
            (await http.post(f"{d}/replay", content=b"{not json"), "replay: invalid JSON body"),
            (await http.get(f"{d}?limit=1001"), "limit must be an integer between 0 and 1000, got '1001'"),
            (await http.get(f"{d}?since=-1"), "since must be a time in milliseconds since the epoch"),
            (await http.get(f"{d}?until=soon"), "until must be a time in milliseconds since the epoch, got 'soon'"),
        ):
            assert resp.status_code == 400 and words in resp.json()["error"], resp.text
        # Delete one, then by filter, then the rest.
        assert (await http.delete(f"/v1/endpoints/{ep}/dead-letters/job-4")).json() == {"id": "job-4",
                                                                                         "deleted": True}
        assert (await http.get(f"/v1/endpoints/{ep}/dead-letters/job-4")).status_code == 404
        assert (await http.delete(f"/v1/endpoints/{ep}/dead-letters?error=cuda")).json() == {"deleted": 2}
        left = (await http.get(f"/v1/endpoints/{ep}/dead-letters")).json()["deadLetters"]
        assert [d["jobId"] for d in left] == ["job-2", "job-0"]
        assert (await http.delete(f"/v1/endpoints/{ep}/dead-letters")).json() == {"deleted": 2}
        assert (await http.get(f"/v1/endpoints/{ep}/dead-letters")).json()["deadLetters"] == []


async def test_dead_letters_expire_and_endpoint_keys_stay_in_scope(replicas) -> None:
    bus = replicas[0].bus  # dead-letter retention 3 s
    async with replicas[0].client() as admin:
        ep, other = await _endpoint(admin, "dlq-scope"), await _endpoint(admin, "dlq-scope-2")
        await bus.count_job_end(_failed(ep, "gone-soon", at_ms=int(time.time() * 1000), error="x",
                                        input_json=b"1"))
        made = (await admin.post("/v1/keys", json={"name": "s", "scope": "endpoint", "endpoints": [ep]})).json()
        async with replicas[1].client(made["key"]) as scoped:
            assert len((await scoped.get(f"/v1/endpoints/{ep}/dead-letters")).json()["deadLetters"]) == 1
            assert (await scoped.get(f"/v1/endpoints/{other}/dead-letters")).status_code == 403
            away = await scoped.post(f"/v1/endpoints/{ep}/dead-letters/replay",
                                     json={"all": True, "endpointId": other})
            assert away.status_code == 403, away.text
            here = await scoped.post(f"/v1/endpoints/{ep}/dead-letters/replay", json={"all": True})
            assert len(here.json()["replayed"]) == 1
        # The retention is the entry's TTL.

        async def expired() -> bool:
            return (await admin.get(f"/v1/endpoints/{ep}/dead-letters")).json()["deadLetters"] == []

        await async_wait_until(expired, timeout_s=10, what="the dead letter expired")


async def test_a_repeat_is_answered_even_when_the_queue_is_full(nats_server) -> None:
    """The queue cap is checked after the key: a repeat queues nothing and gets the original
    job; a new key is refused with 429 and its entry let go, so the same key works once there
    is room again."""
    bus = await Bus.connect(BusSettings(url=nats_server.url, name="gateway-cap"))
    gateway = await Gateway.start(bus, msgspec.structs.replace(SETTINGS, queue_cap=2), webhooks=False)
    try:
        async with Replica(bus, gateway).client() as http:
            ep = await _endpoint(http, "idem-cap")
            first = await http.post(f"/v2/{ep}/run", json={"input": 1}, headers={"Idempotency-Key": "k-1"})
            assert first.status_code == 200, first.text
            assert (await http.post(f"/v2/{ep}/run", json={"input": 2})).status_code == 200
            await async_wait_until(lambda: _full(http, ep), timeout_s=10, what="the queue full")
            for op in ("run", "runsync"):
                again = await http.post(f"/v2/{ep}/{op}?wait=1000", json={"input": 1},
                                        headers={"Idempotency-Key": "k-1"})
                assert again.status_code == 200, (op, again.text)
                assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
            refused = await http.post(f"/v2/{ep}/run", json={"input": 3}, headers={"Idempotency-Key": "k-new"})
            assert refused.status_code == 429, refused.text
            assert (await http.post(f"/v2/{ep}/purge-queue")).status_code == 200
            await async_wait_until(lambda: _room(http, ep), timeout_s=10, what="room in the queue")
            later = await http.post(f"/v2/{ep}/run", json={"input": 3}, headers={"Idempotency-Key": "k-new"})
            assert later.status_code == 200 and "idempotent-replayed" not in later.headers, later.text
            assert later.json()["id"] != first.json()["id"]
    finally:
        await gateway.stop()
        await bus.close()


async def _full(http: httpx.AsyncClient, ep: str) -> bool:
    return (await http.post(f"/v2/{ep}/run", json={"input": 0})).status_code == 429


async def _room(http: httpx.AsyncClient, ep: str) -> bool:
    return await _queued(http, ep) == 0

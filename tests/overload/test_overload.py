"""Overload: an endpoint whose queue is far beyond its workers, against all services as
processes and a real nats-server.

The endpoint asks for a GPU type no node has, so it is accepted, shown throttled and never
gets a worker: every job stays queued. CI runs it with a cap of 2,000 (RP_QUEUE_CAP) so it
stays short; `./scripts/bench overload` does the same with 100,000 jobs and the default cap.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx
import nats
import pytest

from runplane_bus import Bus, BusSettings
from runplane_proto import subjects
from runplane_testing.cluster import Cluster

pytestmark = pytest.mark.overload

CAP = 2000
ENV = {
    "RP_QUEUE_CAP": str(CAP),
    "RP_RATE_LIMITS": "0",  # thousands of /run a second: past RunPod's default limits
    "RP_LOG_LEVEL": "WARNING",
}
CONCURRENCY = 32
SAMPLES = 60


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


async def submit(http: httpx.AsyncClient, ep: str, count: int) -> list[str]:
    """`count` /run requests from CONCURRENCY connections; every one must be accepted."""
    ids: list[str] = []
    left = iter(range(count))

    async def one_connection() -> None:
        for _ in left:
            resp = await http.post(f"/v2/{ep}/run", json={"input": {"n": 1}})
            assert resp.status_code == 200, resp.text
            ids.append(resp.json()["id"])

    await asyncio.gather(*(one_connection() for _ in range(CONCURRENCY)))
    return ids


async def p50_ms(http: httpx.AsyncClient, path: str) -> float:
    took = []
    for _ in range(SAMPLES):
        started = time.perf_counter()
        resp = await http.get(path)
        took.append((time.perf_counter() - started) * 1000)
        assert resp.status_code == 200, resp.text
    return statistics.median(took)


@pytest.fixture(scope="module")
def cluster():
    with Cluster(nodes=1, env=dict(ENV)) as c:
        yield c


async def test_a_full_queue_is_capped_cheap_to_watch_and_purged(cluster: Cluster) -> None:
    ep = cluster.create_endpoint(name="overload", workersMin=1, gpuCount=1, gpuTypeIds=["Z9000"],
                                 command=["true"])
    gateway_pid = cluster.services["gateway"].proc.pid
    headers = {"Authorization": f"Bearer {cluster.api_key}"}
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=headers, timeout=60,
                                 limits=limits) as http:
        probe = await submit(http, ep, 1)
        status_empty = await p50_ms(http, f"/v2/{ep}/status/{probe[0]}")
        health_empty = await p50_ms(http, f"/v2/{ep}/health")
        rss_before = rss_mb(gateway_pid)

        ids = probe + await submit(http, ep, CAP - 1)
        assert len(set(ids)) == CAP

        # At the cap: /run and /runsync are refused with 429 naming the cap, nothing is queued.
        for op in ("run", "runsync"):
            resp = await http.post(f"/v2/{ep}/{op}", json={"input": {"n": 2}})
            assert resp.status_code == 429, resp.text
            error = resp.json()["error"]
            assert f"the cap is {CAP}" in error and "RP_QUEUE_CAP" in error and ep in error, error
        health = (await http.get(f"/v2/{ep}/health")).json()
        delay_ms = health["jobs"].pop("queueDelayMs")
        assert health["jobs"] == {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": CAP, "retried": 0}
        assert delay_ms > 0  # the probe has waited since before the fill
        assert health["workers"]["throttled"] >= 1 and health["workers"]["idle"] == 0

        # /status and /health cost what they cost on an empty queue: nothing reads every job.
        status_full = await p50_ms(http, f"/v2/{ep}/status/{ids[CAP // 2]}")
        # Places counted from the stream, however long the queue: the probe is first, the last
        # answered submit among the last CONCURRENCY queued.
        assert (await http.get(f"/v2/{ep}/status/{ids[0]}")).json()["queuePosition"] == 0
        last = (await http.get(f"/v2/{ep}/status/{ids[-1]}")).json()["queuePosition"]
        assert CAP - CONCURRENCY <= last <= CAP - 1, last
        health_full = await p50_ms(http, f"/v2/{ep}/health")
        assert status_full < 3 * status_empty + 10, (status_empty, status_full)
        assert health_full < 3 * health_empty + 10, (health_empty, health_full)
        # The gateway keeps no state per job (a generous bound: 2,000 records are ~1 MB).
        rss_after = rss_mb(gateway_pid)
        assert rss_after - rss_before < 40, (rss_before, rss_after)

        # purge-queue clears it: every job CANCELLED "purged", and the cap lifts at once.
        resp = await http.post(f"/v2/{ep}/purge-queue")
        assert resp.status_code == 200 and resp.json() == {"removed": CAP, "status": "completed"}, resp.text
        assert (await http.get(f"/v2/{ep}/health")).json()["jobs"]["inQueue"] == 0
        statuses = await records(cluster, ep)
        assert len(statuses) == CAP and set(statuses) == set(ids)
        assert set(statuses.values()) == {("CANCELLED", "purged")}
        assert (await http.get(f"/v2/{ep}/status/{ids[0]}")).json()["status"] == "CANCELLED"
        resp = await http.post(f"/v2/{ep}/run", json={"input": {"n": 3}})
        assert resp.status_code == 200 and resp.json()["status"] == "IN_QUEUE", resp.text
        assert (await http.get(f"/v2/{ep}/health")).json()["jobs"]["inQueue"] == 1


async def records(cluster: Cluster, ep: str) -> dict[str, tuple[str, str | None]]:
    """(status, error) of every record of the endpoint, read from the bucket page by page."""
    assert cluster.nats is not None
    bus = await Bus.connect(BusSettings(url=cluster.nats.url))
    try:
        found = {}
        async for page in bus.jobs.pages(subjects.endpoint_jobs_filter(ep), page_size=500):
            assert len(page) <= 500
            found.update((r.id, (r.status, r.error)) for _, r in page)
        return found
    finally:
        await bus.close()


async def test_a_job_cancelled_in_the_queue_leaves_it_at_the_next_purge(cluster: Cluster) -> None:
    """A queued job cancelled by the client keeps its message until an agent skips it; a purge
    acks it without counting it as removed."""
    ep = cluster.create_endpoint(name="overload-cancel", workersMin=1, gpuCount=1, gpuTypeIds=["Z9000"],
                                 command=["true"])
    headers = {"Authorization": f"Bearer {cluster.api_key}"}
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=headers, timeout=60) as http:
        cancelled, kept = await submit(http, ep, 2)
        assert (await http.post(f"/v2/{ep}/cancel/{cancelled}")).json()["status"] == "CANCELLED"
        resp = await http.post(f"/v2/{ep}/purge-queue")
        assert resp.json() == {"removed": 1, "status": "completed"}, resp.text
        assert (await http.get(f"/v2/{ep}/status/{kept}")).json()["status"] == "CANCELLED"
        assert (await http.get(f"/v2/{ep}/health")).json()["jobs"]["inQueue"] == 0
    assert cluster.nats is not None
    nc = await nats.connect(cluster.nats.url)
    try:
        info = await nc.jetstream().consumer_info(subjects.STREAM_JOBS, subjects.job_consumer(ep))
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
    finally:
        await nc.close()

"""overload: 100,000 jobs queued on an endpoint that can never get a worker.

The endpoint asks for a GPU type no node has (accepted, shown throttled), so every job stays
queued. Figures: the time to queue them through /run; /status and /health p50/p99 on the
empty and on the full queue (and their ratio: the floor is the same call with nothing
queued, measured in the same run); gateway and nats-server RSS empty, full and while /status
and /health are hammered; /run past the cap (every one a 429); purge-queue's time for all
of them (each record CANCELLED "purged", checked); one janitor pass over every record.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import aiohttp

from bench.stats import percentile
from runplane_bus import Bus, BusSettings
from runplane_proto import subjects
from runplane_scheduler.janitor import Janitor
from runplane_scheduler.janitor_rules import Retention
from runplane_testing.cluster import Cluster

PAYLOAD = json.dumps({"input": {"prompt": "x" * 200}}).encode()
CONCURRENCY = 64
SAMPLES = 300
HAMMER_S = 10.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _queue(http: aiohttp.ClientSession, url: str, count: int) -> tuple[list[str], float, int]:
    """`count` jobs queued through /run from CONCURRENCY connections: their ids, the time it
    took, and how many 429s came before the queue was full. The cap's count is a copy at most
    0.5 s old plus what the gateway queued since, and it can run a few jobs ahead while submits
    are in flight as the copy is read again: such a 429 is retried after its Retry-After (the
    wait counts in the time; a run with any is reported by `overload_fill_early_429`)."""
    ids: list[str] = []
    left = iter(range(count))
    early = 0

    async def connection() -> None:
        nonlocal early
        for _ in left:
            while True:
                async with http.post(url, data=PAYLOAD) as resp:
                    body = await resp.json()
                    if resp.status == 429 and early < 10 * CONCURRENCY:
                        early += 1
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                        continue
                    if resp.status != 200:
                        raise RuntimeError(f"/run answered {resp.status}: {body}")
                    ids.append(body["id"])
                    break

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(CONCURRENCY)))
    return ids, time.perf_counter() - started, early


async def _latencies(http: aiohttp.ClientSession, urls: list[str]) -> list[float]:
    took = []
    for url in urls:
        started = time.perf_counter()
        async with http.get(url) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url} answered {resp.status}")
        took.append((time.perf_counter() - started) * 1000)
    return took


async def _hammer(http: aiohttp.ClientSession, urls: list[str], pids: list[int]) -> tuple[int, list[float]]:
    """/status and /health from 16 connections for HAMMER_S; the highest RSS of each process."""
    done = 0
    peak = [0.0] * len(pids)
    deadline = time.monotonic() + HAMMER_S

    async def connection() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            async with http.get(random.choice(urls)) as resp:
                await resp.read()
            done += 1

    async def watch() -> None:
        while time.monotonic() < deadline:
            for i, pid in enumerate(pids):
                peak[i] = max(peak[i], rss_mb(pid))
            await asyncio.sleep(0.2)

    await asyncio.gather(watch(), *(connection() for _ in range(16)))
    return done, peak


async def _records(nats_url: str, ep: str) -> dict[tuple[str, str | None], int]:
    bus = await Bus.connect(BusSettings(url=nats_url))
    try:
        found: dict[tuple[str, str | None], int] = {}
        async for page in bus.jobs.pages(subjects.endpoint_jobs_filter(ep)):
            for _, record in page:
                found[(record.status, record.error)] = found.get((record.status, record.error), 0) + 1
        return found
    finally:
        await bus.close()


async def _janitor_pass_s(nats_url: str) -> float:
    bus = await Bus.connect(BusSettings(url=nats_url))
    try:
        started = time.perf_counter()
        await Janitor(bus, Retention()).sweep_once()
        return time.perf_counter() - started
    finally:
        await bus.close()


def run(quick: bool = False) -> dict[str, float]:
    count = 10_000 if quick else 100_000
    # The cap at the count (RunPod's default is 50,000); rate limits off: thousands of /run a second.
    env = {"RP_LOG_LEVEL": "WARNING", "RP_RATE_LIMITS": "0", "RP_QUEUE_CAP": str(count)}
    with Cluster(nodes=1, env=env) as cluster:
        ep = cluster.create_endpoint(name="bench-overload", workersMin=1, gpuCount=1, gpuTypeIds=["Z9000"],
                                     command=["true"])
        assert cluster.nats is not None and cluster.nats.proc is not None
        gateway_pid = cluster.services["gateway"].proc.pid
        nats_pid = cluster.nats.proc.pid
        return asyncio.run(_measure(cluster, ep, count, gateway_pid, nats_pid))


async def _measure(cluster: Cluster, ep: str, count: int, gateway_pid: int,
                   nats_pid: int) -> dict[str, float]:
    base = f"{cluster.gateway_url}/v2/{ep}"
    headers = {"Authorization": f"Bearer {cluster.api_key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(headers=headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as http:
        probe, _, _ = await _queue(http, f"{base}/run", 1)
        status_empty = await _latencies(http, [f"{base}/status/{probe[0]}"] * SAMPLES)
        health_empty = await _latencies(http, [f"{base}/health"] * SAMPLES)
        gateway_empty, nats_empty = rss_mb(gateway_pid), rss_mb(nats_pid)

        ids, queue_s, early_429 = await _queue(http, f"{base}/run", count - 1)
        ids += probe
        async with http.get(f"{base}/health") as resp:
            in_queue = (await resp.json())["jobs"]["inQueue"]
        sample = random.Random(1).sample(ids, SAMPLES)
        status_full = await _latencies(http, [f"{base}/status/{job}" for job in sample])
        health_full = await _latencies(http, [f"{base}/health"] * SAMPLES)
        gateway_full, nats_full = rss_mb(gateway_pid), rss_mb(nats_pid)
        hammered, (gateway_peak, nats_peak) = await _hammer(
            http, [f"{base}/health", *(f"{base}/status/{job}" for job in sample)], [gateway_pid, nats_pid])

        refused = 0
        for _ in range(100):
            async with http.post(f"{base}/run", data=PAYLOAD) as resp:
                refused += resp.status == 429
        async with http.get(f"{base}/health") as resp:
            in_queue_after_cap = (await resp.json())["jobs"]["inQueue"]

        janitor_s = await _janitor_pass_s(cluster.nats.url)

        started = time.perf_counter()
        async with http.post(f"{base}/purge-queue") as resp:
            purged = (await resp.json())["removed"]
        purge_s = time.perf_counter() - started
        async with http.get(f"{base}/health") as resp:
            in_queue_purged = (await resp.json())["jobs"]["inQueue"]
        found = await _records(cluster.nats.url, ep)
        gateway_purged = rss_mb(gateway_pid)

    p = percentile
    return {
        "overload_jobs": count,
        "overload_queue_s": round(queue_s, 1),
        "overload_queue_jobs_per_s": round((count - 1) / queue_s, 1),
        "overload_inqueue_full": in_queue,
        "overload_status_empty_p50_ms": round(p(status_empty, 50), 2),
        "overload_status_empty_p99_ms": round(p(status_empty, 99), 2),
        "overload_status_full_p50_ms": round(p(status_full, 50), 2),
        "overload_status_full_p99_ms": round(p(status_full, 99), 2),
        "overload_status_p50_full_over_empty": round(p(status_full, 50) / p(status_empty, 50), 2),
        "overload_health_empty_p50_ms": round(p(health_empty, 50), 2),
        "overload_health_empty_p99_ms": round(p(health_empty, 99), 2),
        "overload_health_full_p50_ms": round(p(health_full, 50), 2),
        "overload_health_full_p99_ms": round(p(health_full, 99), 2),
        "overload_health_p50_full_over_empty": round(p(health_full, 50) / p(health_empty, 50), 2),
        "overload_gateway_rss_empty_mb": round(gateway_empty, 1),
        "overload_gateway_rss_full_mb": round(gateway_full, 1),
        "overload_gateway_rss_hammered_peak_mb": round(gateway_peak, 1),
        "overload_gateway_rss_purged_mb": round(gateway_purged, 1),
        "overload_nats_rss_empty_mb": round(nats_empty, 1),
        "overload_nats_rss_full_mb": round(nats_full, 1),
        "overload_nats_rss_hammered_peak_mb": round(nats_peak, 1),
        "overload_hammer_requests_per_s": round(hammered / HAMMER_S, 1),
        "overload_fill_early_429": early_429,
        "overload_run_past_cap_429_of_100": refused,
        "overload_inqueue_after_cap": in_queue_after_cap,
        "overload_janitor_pass_s": round(janitor_s, 1),
        "overload_purge_s": round(purge_s, 1),
        "overload_purge_jobs_per_s": round(purged / purge_s, 1),
        "overload_purged": purged,
        "overload_inqueue_purged": in_queue_purged,
        "overload_records_cancelled_purged": found.get(("CANCELLED", "purged"), 0),
        "overload_records_other": sum(n for k, n in found.items() if k != ("CANCELLED", "purged")),
    }

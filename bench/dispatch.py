"""dispatch: a no-op job through the whole system, against its floors.

Figures: runsync_p50_ms, runsync_p99_ms (sequential /runsync, no-op handler),
http_floor_p50_ms (bare Starlette no-op, same client, payload and method, in blocks taking
turns with the /runsync ones),
nats_rr_floor_p50_ms, runsync_p50_over_http_floor, run_throughput_jobs_per_s
(concurrent /run from h2load, counted to completion) and jetstream_floor_jobs_per_s.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import time

import httpx
import nats
from nats.aio.msg import Msg

from bench.floors import http_floor_call, http_floor_server, jetstream_floor_jobs_per_s, nats_rr_floor_ms
from bench.stats import percentile
from runplane_proto import subjects
from runplane_proto.codec import Codec
from runplane_proto.jobs import JobEnded
from runplane_testing.cluster import Cluster, python_command

PAYLOAD = json.dumps({"input": {"prompt": "x" * 900, "n": 1}}).encode()
THROUGHPUT_WORKERS = 4
THROUGHPUT_CONCURRENCY = 64


BLOCK = 100


def _runsync_and_floor_ms(cluster: Cluster, endpoint_id: str,
                          samples: int) -> tuple[list[float], list[float]]:
    """Sequential /runsync calls and floor calls in alternating blocks of BLOCK: both see the
    machine as it is over the same stretch of time (a shared 2-core machine drifts over a run
    by more than the difference measured), and each block runs warm, as one kind of call
    after another (a floor call between two /runsync calls would meet a cold server)."""
    headers = {"Authorization": f"Bearer {cluster.api_key}", "Content-Type": "application/json"}
    with http_floor_server() as floor_url, \
            httpx.Client(base_url=cluster.gateway_url, headers=headers, timeout=30) as http, \
            httpx.Client(base_url=floor_url, headers=headers, timeout=30) as floor_http:

        def runsync_call() -> float:
            t0 = time.perf_counter()
            resp = http.post(f"/v2/{endpoint_id}/runsync", content=PAYLOAD)
            elapsed = (time.perf_counter() - t0) * 1000
            assert resp.json()["status"] == "COMPLETED", resp.text
            return elapsed

        runsync: list[float] = []
        floor: list[float] = []
        while len(runsync) < samples:
            size = min(BLOCK, samples - len(runsync))
            for _ in range(10):  # warm again after the other kind's block
                runsync_call()
            runsync.extend(runsync_call() for _ in range(size))
            for _ in range(10):
                http_floor_call(floor_http, PAYLOAD)
            floor.extend(http_floor_call(floor_http, PAYLOAD) for _ in range(size))
        return runsync, floor


def _h2load(url: str, api_key: str, count: int) -> tuple[list[str], str]:
    """The h2load command that POSTs PAYLOAD to `url` `count` times over
    THROUGHPUT_CONCURRENCY keep-alive HTTP/1.1 connections, one request in flight on each,
    and the payload file it reads (the caller deletes it)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f:
        f.write(PAYLOAD)
    return ["h2load", "--h1", "-n", str(count), "-c", str(THROUGHPUT_CONCURRENCY), "-m", "1",
            "-d", f.name, "-H", f"Authorization: Bearer {api_key}",
            "-H", "Content-Type: application/json", url], f.name


def h2load_accepted(report: str) -> int:
    """How many requests h2load saw answered 2xx, from its report; raises if any failed."""
    done = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", report)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", report)
    if done is None or codes is None:
        raise RuntimeError(f"h2load report not understood:\n{report}")
    total, succeeded, failed = (int(done.group(i)) for i in (1, 2, 3))
    ok, other = int(codes.group(1)), sum(int(codes.group(i)) for i in (2, 3, 4))
    if failed or other or ok != total or succeeded != total:
        raise RuntimeError(f"h2load: not every /run was accepted:\n{report}")
    return ok


def _throughput(cluster: Cluster, endpoint_id: str, count: int) -> float:
    """Submit `count` /run requests from THROUGHPUT_CONCURRENCY connections and count them to
    completion by the ends the agents count on the bus (polling /health would itself load
    the system). The load comes from h2load (C): a Python load generator on the same two
    cores took ~13 % of their CPU (~175 us per job with aiohttp), which a real client, being
    elsewhere, does not take from the system it calls."""
    url = f"{cluster.gateway_url}/v2/{endpoint_id}/run"
    assert cluster.nats is not None
    nats_url = cluster.nats.url
    if shutil.which("h2load") is None:
        raise RuntimeError("h2load not found (apt-get install nghttp2-client; ./scripts/bench installs it)")

    async def measure() -> float:
        nc = await nats.connect(nats_url)
        ends: Codec[JobEnded] = Codec(JobEnded)
        completed: set[str] = set()
        all_done = asyncio.Event()

        async def on_end(msg: Msg) -> None:
            completed.add(ends.decode(msg.data).job_id)
            if len(completed) >= count:
                all_done.set()

        # The agents count each job's end on rp.jobends (what /health reads): a small message
        # per job, where the job's events carry its whole record to decode.
        await nc.subscribe(subjects.job_ended(endpoint_id, "completed"), cb=on_end)
        await nc.flush()
        command, payload_file = _h2load(url, cluster.api_key, count)
        try:
            started = time.perf_counter()
            load = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
            report, _ = await load.communicate()
            accepted = h2load_accepted(report.decode())
            await asyncio.wait_for(all_done.wait(), timeout=300)
            elapsed = time.perf_counter() - started
        finally:
            os.unlink(payload_file)
        await asyncio.sleep(0.2)  # an end beyond the count would be a job nobody submitted
        await nc.close()
        assert accepted == count == len(completed), f"{accepted} accepted, {len(completed)} completed"
        return count / elapsed

    return asyncio.run(measure())


def run(quick: bool = False) -> dict[str, float]:
    samples = 200 if quick else 1000
    count = 2000 if quick else 10000
    # Thousands of /run a second on one endpoint: far past RunPod's default limits (1000 per 10 s).
    env = {"RP_LOG_LEVEL": "WARNING", "RP_RATE_LIMITS": "0"}
    with Cluster(nodes=1, env=env) as cluster:
        latency_ep = cluster.create_endpoint(name="bench-latency", workersMin=1, workersMax=1,
                                             command=python_command("examples/fast/handler.py"))
        cluster.wait_workers(latency_ep, 1)
        runsync, floor = _runsync_and_floor_ms(cluster, latency_ep, samples)
        nats_floor = nats_rr_floor_ms(cluster.nats.url, PAYLOAD, samples)
        tput_ep = cluster.create_endpoint(
            name="bench-throughput", workersMin=THROUGHPUT_WORKERS, workersMax=THROUGHPUT_WORKERS,
            command=python_command("examples/fast/handler.py"), env={"RP_WORKER_CONCURRENCY": "16"})
        cluster.wait_workers(tput_ep, THROUGHPUT_WORKERS)
        throughput = _throughput(cluster, tput_ep, count)
        js_floor = jetstream_floor_jobs_per_s(cluster.nats.url, PAYLOAD, count)
    p50 = percentile(runsync, 50)
    floor_p50 = percentile(floor, 50)
    return {
        "runsync_p50_ms": round(p50, 3),
        "runsync_p99_ms": round(percentile(runsync, 99), 3),
        "http_floor_p50_ms": round(floor_p50, 3),
        "nats_rr_floor_p50_ms": round(percentile(nats_floor, 50), 3),
        "runsync_p50_over_http_floor": round(p50 / floor_p50, 2),
        "run_throughput_jobs_per_s": round(throughput, 1),
        "jetstream_floor_jobs_per_s": round(js_floor, 1),
        "run_throughput_over_jetstream_floor": round(throughput / js_floor, 3),
    }

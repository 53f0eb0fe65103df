"""Where a job's time went and where a queued job stands, with every service as a process:
/status `timings` (cold start after waiting for capacity, then warm, then flash after parking),
the per-endpoint histograms on the node agent's /metrics, a queued job's position and ETA, and
/health's queue delay."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from runplane_testing.cluster import Cluster, python_command
from runplane_testing.waiting import wait_until

from .conftest import FAST_ENV

pytestmark = pytest.mark.system
ECHO = python_command("examples/echo/handler.py")
FLASH = python_command("examples/flash/handler.py")
PARTS = ("queuedMs", "waitingForCapacityMs", "workerStartMs", "handlerMs", "resultUploadMs")


@pytest.fixture(scope="module")
def cluster():
    with Cluster(nodes=1, env=dict(FAST_ENV, RP_PARK_MEMORY_MB="2048")) as c:
        yield c


def _status(cluster, ep: str, job_id: str) -> dict:
    with cluster.client() as http:
        resp = http.get(f"/v2/{ep}/status/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def _runsync(cluster, ep: str, payload: object) -> dict:
    with cluster.client() as http:
        body = http.post(f"/v2/{ep}/runsync?wait=60000", json={"input": payload}).json()
    assert body["status"] == "COMPLETED", body
    return _status(cluster, ep, body["id"])


def _run(cluster, ep: str, payload: object, **extra: object) -> str:
    with cluster.client() as http:
        resp = http.post(f"/v2/{ep}/run", json={"input": payload, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def _adds_up(timings: dict) -> None:
    assert set(PARTS) <= set(timings), timings
    assert all(timings[p] >= 0 for p in PARTS), timings
    assert abs(sum(timings[p] for p in PARTS) - timings["totalMs"]) <= 2, timings


def _agent_metrics(cluster) -> str:
    port = cluster.services["node1"].env["RP_AGENT_PORT"]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_cold_start_after_waiting_for_capacity_then_a_warm_one_and_the_histograms(cluster):
    ep = cluster.create_endpoint(name="timed", command=ECHO, workersMin=0, workersMax=1, idleTimeout=60,
                                 flashboot=False)
    first = _runsync(cluster, ep, {"sleep": 0.3})
    t = first["timings"]
    _adds_up(t)
    # Scaled to zero at submit: the autoscaler and scheduler had to start a worker (capacity),
    # whose boot (the RunPod SDK's import) the job then waited through.
    assert t["workerStart"] == "cold", t
    assert t["waitingForCapacityMs"] > 0 and t["workerStartMs"] >= 200, t
    assert t["handlerMs"] >= 300, t
    assert first["delayTime"] >= t["waitingForCapacityMs"] + t["workerStartMs"] - 2, first

    second = _runsync(cluster, ep, {"text": "again"})
    t = second["timings"]
    _adds_up(t)
    assert t["workerStart"] == "warm" and t["workerStartMs"] == 0 and t["waitingForCapacityMs"] == 0, t
    assert second["workerId"] == first["workerId"]

    # The same figures per endpoint on the agent's /metrics.
    text = _agent_metrics(cluster)
    for phase in ("queued", "waiting_for_capacity", "worker_start", "handler", "result_upload"):
        assert _sample(text, "rp_node_agent_job_phase_seconds_count", endpoint=ep, phase=phase) == 2, phase
    assert _sample(text, "rp_node_agent_job_phase_seconds_sum", endpoint=ep, phase="handler") >= 0.3
    assert _sample(text, "rp_node_agent_job_worker_start_seconds_count", endpoint=ep, kind="cold") == 1
    assert _sample(text, "rp_node_agent_job_worker_start_seconds_count", endpoint=ep, kind="warm") == 1
    assert re.search(r'rp_node_agent_job_worker_start_seconds_sum\{endpoint="%s",kind="cold"\} 0\.[2-9]|'
                     r'rp_node_agent_job_worker_start_seconds_sum\{endpoint="%s",kind="cold"\} [1-9]' % (ep, ep),
                     text), text


def test_a_job_on_a_parked_flash_worker_is_a_flash_start(cluster):
    ep = cluster.create_endpoint(name="timedflash", command=FLASH, workersMin=0, workersMax=1, idleTimeout=1,
                                 flashboot=True)
    first = _runsync(cluster, ep, {"n": 1})
    assert first["timings"]["workerStart"] == "cold"

    def parked() -> bool:
        with cluster.client() as http:
            workers = http.get(f"/v1/endpoints/{ep}/workers").json()
        return any(w["state"] == "parked" for w in workers)

    wait_until(parked, timeout_s=30, what="the worker parked")
    second = _runsync(cluster, ep, {"n": 2})
    t = second["timings"]
    _adds_up(t)
    assert second["workerId"] == first["workerId"]
    assert t["workerStart"] == "flash" and t["waitingForCapacityMs"] == 0, t
    assert t["workerStartMs"] < 1000, t
    assert _sample(_agent_metrics(cluster), "rp_node_agent_job_worker_start_seconds_count", endpoint=ep,
                   kind="flash") == 1


def test_jobs_that_cannot_get_a_worker_have_fixed_positions_and_a_growing_queue_delay(cluster):
    # No node has this GPU: the endpoint is accepted, stays throttled, and its jobs stay queued.
    ep = cluster.create_endpoint(name="nogpu", command=ECHO, workersMin=0, workersMax=1, gpuCount=1,
                                 gpuTypeIds=["NVIDIA NO-SUCH-GPU 7000"])
    jobs = [_run(cluster, ep, {"n": i}) for i in range(3)]
    jobs.append(_run(cluster, ep, {"n": 3}, policy={"lowPriority": True}))
    for position, job_id in enumerate(jobs):
        status = _status(cluster, ep, job_id)
        assert status["status"] == "IN_QUEUE", status
        assert status["queuePosition"] == position, (position, status)
        assert "etaMs" not in status, status  # nothing ended: no rate to go by
        assert status["timings"]["queuedMs"] == status["timings"]["totalMs"]

    def delay() -> int:
        with cluster.client() as http:
            return http.get(f"/v2/{ep}/health").json()["jobs"]["queueDelayMs"]

    first = delay()
    assert first > 0
    wait_until(lambda: delay() >= first + 500, timeout_s=10, what="the queue delay growing")
    with cluster.client() as http:
        assert http.post(f"/v2/{ep}/purge-queue").json()["removed"] == 4
    assert delay() == 0


def test_a_queued_job_counts_down_as_the_jobs_ahead_are_taken_with_an_eta(cluster):
    ep = cluster.create_endpoint(name="oneatatime", command=ECHO, workersMin=1, workersMax=1, flashboot=False)
    cluster.wait_workers(ep, idle=1)
    jobs = [_run(cluster, ep, {"sleep": 0.8, "n": i}) for i in range(4)]
    last = jobs[-1]
    seen: list[tuple[int, int | None]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = _status(cluster, ep, last)
        if status["status"] != "IN_QUEUE":
            break
        seen.append((status["queuePosition"], status.get("etaMs")))
        time.sleep(0.15)
    positions = [p for p, _ in seen]
    assert positions == sorted(positions, reverse=True), seen  # never goes up
    assert positions[0] >= 2 and positions[-1] == 0, seen
    # Once a job ended the endpoint has an end rate, and queued jobs an estimate from it.
    with_eta = [(p, eta) for p, eta in seen if eta is not None]
    assert with_eta, seen
    assert all(eta > 0 for _, eta in with_eta), seen
    done = wait_until(lambda: (s := _status(cluster, ep, last))["status"] == "COMPLETED" and s, timeout_s=30,
                      what="the last job done")
    assert "queuePosition" not in done and done["timings"]["queuedMs"] >= 1000, done

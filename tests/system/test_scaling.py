"""Autoscaling with every service as a process: from zero on the first request, a burst up to
workersMax and never beyond, back to zero after idleTimeout, and low-priority jobs that never
start a worker by themselves."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from runplane_testing.cluster import python_command
from runplane_testing.nodewatch import NodeWatch
from runplane_testing.waiting import wait_until

pytestmark = pytest.mark.system

FAST = "examples/fast/handler.py"
IDLE_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def watch(cluster) -> Iterator[NodeWatch]:
    with NodeWatch(cluster.nats.url) as w:
        yield w


def _endpoint(cluster, watch: NodeWatch, **spec: object) -> str:
    body: dict[str, object] = {"command": python_command(FAST), "workersMin": 0, "idleTimeout": IDLE_TIMEOUT_S,
                               "scalerType": "REQUEST_COUNT", "scalerValue": 1}
    body.update(spec)
    ep = cluster.create_endpoint(**body)
    # At zero, and the autoscaler has seen it (its consumer exists and a target is written).
    wait_until(lambda: _target(cluster, ep) == 0, timeout_s=30, what="first scale target")
    assert watch.count(ep) == 0
    return ep


def _target(cluster, ep: str) -> int | None:
    import asyncio

    from runplane_bus import Bus, BusSettings
    from runplane_proto import subjects

    async def read() -> int | None:
        bus = await Bus.connect(BusSettings(url=cluster.nats.url, name="test"))
        try:
            got = await bus.scale.get(subjects.scale_key(ep))
            return None if got is None else got.value.desired_workers
        finally:
            await bus.close()

    return asyncio.run(read())


def _status(http, ep: str, job_id: str) -> dict:
    return http.get(f"/v2/{ep}/status/{job_id}").json()


def _all_completed(http, ep: str, jobs: dict[str, dict]) -> dict[str, dict] | None:
    bodies = {job_id: _status(http, ep, job_id) for job_id in jobs}
    failed = {j: b for j, b in bodies.items() if b["status"] in ("FAILED", "CANCELLED", "TIMED_OUT")}
    assert not failed, failed
    return bodies if all(b["status"] == "COMPLETED" for b in bodies.values()) else None


def test_scale_from_zero_on_the_first_request(cluster, watch):
    ep = _endpoint(cluster, watch, name="fromzero", workersMax=1)
    with cluster.client() as http:
        body = http.post(f"/v2/{ep}/runsync?wait=60000", json={"input": {"first": True}}).json()
    assert body["status"] == "COMPLETED" and body["output"] == {"first": True}, body
    # The node reports the worker within a heartbeat; it stays for idleTimeout.
    wait_until(lambda: watch.peak(ep) >= 1, timeout_s=10, what="the worker reported")
    assert watch.peak(ep) == 1


def test_a_burst_scales_to_workers_max_and_never_beyond_then_back_to_zero(cluster, watch):
    workers_max = 3
    ep = _endpoint(cluster, watch, name="burst", workersMax=workers_max)
    inputs = [{"n": i, "sleep": 1.0} for i in range(12)]
    with cluster.client() as http:
        jobs = {http.post(f"/v2/{ep}/run", json={"input": data}).json()["id"]: data for data in inputs}
        wait_until(lambda: watch.count(ep) == workers_max, timeout_s=30, what=f"{workers_max} workers")
        bodies = wait_until(lambda: _all_completed(http, ep, jobs), timeout_s=90, interval_s=0.25,
                            what="every burst job completed")
        done_at = time.monotonic()
    assert {j: b["output"] for j, b in bodies.items()} == jobs
    assert len({b["workerId"] for b in bodies.values()}) == workers_max  # the work was spread
    assert watch.peak(ep) == workers_max  # at every reported moment, never beyond

    wait_until(lambda: watch.count(ep) == 0, timeout_s=IDLE_TIMEOUT_S + 30, what="back to zero workers")
    zero_at = watch.history(ep)[-1][0]
    # Not to zero before the endpoint had no work for idleTimeout (done_at is a little late:
    # it is when the test saw the last result).
    assert zero_at - done_at >= IDLE_TIMEOUT_S - 1.0, watch.history(ep)


def test_a_low_priority_job_waits_for_a_worker_that_normal_work_brings(cluster, watch):
    ep = _endpoint(cluster, watch, name="lowprio", workersMax=2)
    with cluster.client() as http:
        low = http.post(f"/v2/{ep}/run", json={"input": {"low": True}, "policy": {"lowPriority": True}}).json()["id"]
        # Several seconds (many autoscaler rounds) and no worker: the job just waits.
        until = time.monotonic() + 4.0
        while time.monotonic() < until:
            assert _status(http, ep, low)["status"] == "IN_QUEUE"
            assert watch.peak(ep) == 0
            time.sleep(0.2)
        assert _target(cluster, ep) == 0

        normal = http.post(f"/v2/{ep}/run", json={"input": {"low": False}}).json()["id"]
        bodies = wait_until(lambda: _all_completed(http, ep, {low: {}, normal: {}}), timeout_s=60,
                            interval_s=0.2, what="both jobs completed")
    assert bodies[low]["output"] == {"low": True} and bodies[normal]["output"] == {"low": False}
    # The normal job brought one worker (reported within a heartbeat), and it ran both.
    wait_until(lambda: watch.peak(ep) >= 1, timeout_s=10, what="the worker reported")
    assert watch.peak(ep) == 1
    assert bodies[low]["workerId"] == bodies[normal]["workerId"]

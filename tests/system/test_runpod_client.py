"""RunPod's own Python client (runpod 1.12.0) and worker SDK against a whole Runplane."""

from __future__ import annotations

import os
import signal
import time

import pytest

from runplane_testing.cluster import python_command
from runplane_testing.waiting import wait_until

pytestmark = pytest.mark.system

HANDLER = python_command("tests/fixtures/workers/rp_handler.py")
STREAMER = python_command("tests/fixtures/workers/rp_stream.py")


@pytest.fixture(scope="module")
def echo(cluster):
    ep = cluster.create_endpoint(name="echo", command=HANDLER, workersMin=1, workersMax=2)
    cluster.wait_workers(ep, 1)
    return ep


def test_run_then_status_and_output(runpod_client, echo):
    job = runpod_client.Endpoint(echo).run({"input": {"text": "hi"}, "s3Config": {"bucketName": "b"}})
    output = job.output(timeout=30)
    assert output["echo"] == {"text": "hi"}
    assert output["s3"] == {"bucketName": "b"}
    assert output["id"] == job.job_id
    assert job.status() == "COMPLETED"


def test_run_sync_fast_returns_output_in_one_call(runpod_client, echo):
    assert runpod_client.Endpoint(echo).run_sync({"text": "quick"}, timeout=30)["echo"] == {"text": "quick"}


def test_run_sync_slow_falls_back_to_polling(runpod_client, echo, cluster):
    # The gateway holds /runsync for RP_RUNSYNC_WAIT_MS (2 s here); the job takes 3 s.
    with cluster.client() as http:
        body = http.post(f"/v2/{echo}/runsync", json={"input": {"sleep": 3}}).json()
    assert body["status"] in ("IN_QUEUE", "IN_PROGRESS") and body["id"]
    started = time.monotonic()
    assert runpod_client.Endpoint(echo).run_sync({"sleep": 3, "tag": "slow"}, timeout=60)["echo"]["tag"] == "slow"
    assert time.monotonic() - started >= 3


def test_failed_job_carries_the_sdk_error(runpod_client, echo, cluster):
    job = runpod_client.Endpoint(echo).run({"input": {"fail": "bad thing"}})
    wait_until(lambda: job.status() == "FAILED", timeout_s=30)
    with cluster.client() as http:
        body = http.get(f"/v2/{echo}/status/{job.job_id}").json()
    assert "bad thing" in body["error"] and "ValueError" in body["error"]
    assert runpod_client.Endpoint(echo).run_sync({"error": "returned error"}, timeout=30) is None


def test_progress_update_is_visible_while_running(runpod_client, echo, cluster, tmp_path):
    release = tmp_path / "release"
    job = runpod_client.Endpoint(echo).run({"input": {"progress": {"pct": 50}, "release": str(release)}})
    with cluster.client() as http:
        wait_until(lambda: http.get(f"/v2/{echo}/status/{job.job_id}").json().get("output") == {"pct": 50},
                   timeout_s=30, what="progress visible")
        assert http.get(f"/v2/{echo}/status/{job.job_id}").json()["status"] == "IN_PROGRESS"
    release.touch()
    assert job.output(timeout=30)["echo"]["progress"] == {"pct": 50}
    assert job.status() == "COMPLETED"


def test_cancel_stops_a_running_job(runpod_client, echo, cluster):
    job = runpod_client.Endpoint(echo).run({"input": {"sleep": 60}})
    wait_until(lambda: job.status() == "IN_PROGRESS", timeout_s=30)
    assert job.cancel()["status"] == "CANCELLED"
    assert job.status() == "CANCELLED"
    # the worker lets go of it and takes new work
    assert runpod_client.Endpoint(echo).run_sync({"after": "cancel"}, timeout=60)["echo"] == {"after": "cancel"}
    with cluster.client() as http:
        assert http.get(f"/v2/{echo}/status/{job.job_id}").json()["status"] == "CANCELLED"


@pytest.mark.parametrize("aggregate", [False, True])
def test_stream_yields_every_chunk_once(runpod_client, cluster, aggregate):
    ep = cluster.create_endpoint(name=f"stream{int(aggregate)}", command=STREAMER, workersMin=1,
                                 env={"AGGREGATE": "1" if aggregate else "0"})
    cluster.wait_workers(ep, 1)
    job = runpod_client.Endpoint(ep).run({"input": {"n": 5, "delay": 0.3}})
    chunks = list(job.stream())
    assert chunks == [{"i": i, "text": f"chunk-{i}"} for i in range(5)]
    with cluster.client() as http:
        body = http.get(f"/v2/{ep}/status/{job.job_id}").json()
        assert body["status"] == "COMPLETED"
        assert body["output"] == (chunks if aggregate else [])
        again = http.get(f"/v2/{ep}/stream/{job.job_id}").json()
        assert again["stream"] == [] and again["status"] == "COMPLETED"


def test_health_and_purge_queue(runpod_client, cluster):
    ep = cluster.create_endpoint(name="idle", command=HANDLER, workersMin=0, workersMax=0)
    endpoint = runpod_client.Endpoint(ep)
    ids = [endpoint.run({"input": {"n": i}}).job_id for i in range(3)]
    health = endpoint.health()
    assert health["jobs"]["inQueue"] == 3 and health["workers"]["running"] == 0
    assert endpoint.purge_queue() == {"removed": 3, "status": "completed"}
    assert endpoint.health()["jobs"]["inQueue"] == 0
    with cluster.client() as http:
        assert {http.get(f"/v2/{ep}/status/{i}").json()["status"] for i in ids} == {"CANCELLED"}


def test_refresh_worker_recycles_the_process(runpod_client, cluster):
    ep = cluster.create_endpoint(name="refresh", command=HANDLER, workersMin=1, workersMax=1,
                                 env={"REFRESH": "1"})
    cluster.wait_workers(ep, 1)
    endpoint = runpod_client.Endpoint(ep)
    first = endpoint.run_sync({"n": 1}, timeout=60)["pid"]
    second = endpoint.run_sync({"n": 2}, timeout=60)["pid"]
    assert first != second


def test_worker_killed_mid_job_is_retried(runpod_client, cluster, tmp_path):
    ep = cluster.create_endpoint(name="killme", command=HANDLER, workersMin=1, workersMax=1)
    cluster.wait_workers(ep, 1)
    pidfile = tmp_path / "pid"
    job = runpod_client.Endpoint(ep).run({"input": {"pidfile": str(pidfile)}})
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), timeout_s=30))
    os.kill(pid, signal.SIGKILL)
    output = job.output(timeout=60)
    assert output["done"] is True and output["pid"] != pid
    with cluster.client() as http:
        body = http.get(f"/v2/{ep}/status/{job.job_id}").json()
    assert body["status"] == "COMPLETED"

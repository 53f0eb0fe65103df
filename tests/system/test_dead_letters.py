"""Idempotent submits and dead letters with real workers (RunPod's SDK) and all four services:
a repeated submit runs the handler once; a worker dying mid-job makes the handler see attempt 2;
a job that fails, exhausts its attempts or times out is a dead letter with every attempt's
error, worker and node; replays to the same and to another endpoint complete."""

from __future__ import annotations

import pytest

from runplane_testing.cluster import python_command
from runplane_testing.waiting import wait_until

pytestmark = pytest.mark.system

HANDLER = "tests/fixtures/workers/attempt_handler.py"


def _ended(http, ep, job_id):
    def check():
        body = http.get(f"/v2/{ep}/status/{job_id}").json()
        return body if body.get("status") in ("COMPLETED", "FAILED", "TIMED_OUT") else None
    return check


def test_a_repeat_runs_once_and_a_retried_job_sees_attempt_2(cluster, tmp_path):
    ep = cluster.create_endpoint(name="attempts", command=python_command(HANDLER), workersMin=1, workersMax=1)
    cluster.wait_workers(ep, 1)
    log = tmp_path / "attempts.log"
    body = {"input": {"log": str(log), "die_until": 1}}
    with cluster.client() as http:
        first = http.post(f"/v2/{ep}/run", json=body, headers={"Idempotency-Key": "charge-42"})
        again = http.post(f"/v2/{ep}/run", json=body, headers={"Idempotency-Key": "charge-42"})
        job_id = first.json()["id"]
        assert again.json()["id"] == job_id and again.headers["idempotent-replayed"] == "true"
        done = wait_until(_ended(http, ep, job_id), timeout_s=60, what="job ended")
        assert done["status"] == "COMPLETED" and done["output"] == {"attempt": 2}, done
        # A /runsync repeat of the finished job answers its result without running it again.
        sync = http.post(f"/v2/{ep}/runsync", json=body, headers={"Idempotency-Key": "charge-42"})
        assert sync.json()["id"] == job_id and sync.json()["output"] == {"attempt": 2}
    # One run per attempt: the first died with its worker, the second (attempt 2) finished.
    assert log.read_text().splitlines() == [f"{job_id} 1", f"{job_id} 2"]


def test_failed_exhausted_and_timed_out_jobs_are_dead_letters_and_replay(cluster, tmp_path):
    command = python_command(HANDLER)
    ep = cluster.create_endpoint(name="dlq", command=command, workersMin=2, workersMax=2)
    fixed = cluster.create_endpoint(name="dlq-fixed", command=command, env={"FIXED": "1"}, workersMin=1,
                                    workersMax=1)
    cluster.wait_workers(ep, 2)
    flag = tmp_path / "flag"
    with cluster.client() as http:
        failing = http.post(f"/v2/{ep}/run", json={"input": {"fail_unless": str(flag)}}).json()["id"]
        dying = http.post(f"/v2/{ep}/run", json={"input": {"die_until": 99}}).json()["id"]
        slow = http.post(f"/v2/{ep}/run", json={"input": {"sleep": 60},
                                                 "policy": {"executionTimeout": 5000}}).json()["id"]
        ends = {j: wait_until(_ended(http, ep, j), timeout_s=90, what=f"{j} ended")["status"]
                for j in (failing, dying, slow)}
        assert ends == {failing: "FAILED", dying: "FAILED", slow: "TIMED_OUT"}

        def letters():
            found = http.get(f"/v1/endpoints/{ep}/dead-letters").json()["deadLetters"]
            return {d["jobId"]: d for d in found} if len(found) == 3 else None

        dead = wait_until(letters, timeout_s=10, what="three dead letters")
        assert "missing" in dead[failing]["error"]
        [attempt] = dead[failing]["attempts"]
        assert attempt["number"] == 1 and "missing" in attempt["error"]
        assert attempt["workerId"] and attempt["nodeId"] == "node1"
        exhausted = dead[dying]["attempts"]
        assert [a["number"] for a in exhausted] == [1, 2, 3] and dead[dying]["error"].endswith("attempt 3 of 3")
        assert all("exit" in a["error"] and a["workerId"] for a in exhausted), exhausted
        assert len({a["workerId"] for a in exhausted}) == 3  # each attempt killed its worker
        assert dead[slow]["status"] == "TIMED_OUT" and "execution timeout" in dead[slow]["attempts"][0]["error"]
        timeouts = http.get(f"/v1/endpoints/{ep}/dead-letters?error=execution%20timeout").json()["deadLetters"]
        assert [d["jobId"] for d in timeouts] == [slow]

        # Replay the failed job to the endpoint whose workers do not fail, and (once the cause
        # is fixed) to its own endpoint: both complete, and both are linked from the dead letter.
        moved = http.post(f"/v1/endpoints/{ep}/dead-letters/replay",
                          json={"jobIds": [failing], "endpointId": fixed}).json()["replayed"][0]
        flag.write_text("fixed")
        here = http.post(f"/v1/endpoints/{ep}/dead-letters/replay", json={"jobIds": [failing]}).json()["replayed"][0]
        for target, replay in ((fixed, moved), (ep, here)):
            done = wait_until(_ended(http, target, replay["id"]), timeout_s=60, what="replay ended")
            assert done["status"] == "COMPLETED" and done["output"] == {"attempt": 1}, done
        links = http.get(f"/v1/endpoints/{ep}/dead-letters/{failing}").json()["replays"]
        assert [(r["endpointId"], r["jobId"]) for r in links] == [(fixed, moved["id"]), (ep, here["id"])]
        assert http.delete(f"/v1/endpoints/{ep}/dead-letters").json() == {"deleted": 3}

"""The worker-facing API of a real node agent fed garbage: bad and missing tokens, garbage
bodies, replayed results, results for jobs the worker does not hold, huge bodies, odd
content types, path-traversal-ish ids, unknown paths. Each gets a 4xx with a JSON body
naming the problem; the jobs the workers do hold still finish correctly.

Two placeholder workers (tests/fuzz/hand_worker.py) give the test real worker ids and
tokens; the test speaks the RunPod worker protocol in their place.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from badinput import MAX_PAYLOAD

from runplane_testing.cluster import python_command
from runplane_testing.waiting import wait_until

pytestmark = pytest.mark.fuzz

# Takes answer 204 after a second; no ping ever makes the agent expect the next one.
EXTRA_ENV = {"RP_TAKE_POLL_S": "1", "RP_WORKER_PING_INTERVAL_MS": "600000"}
FORM = {"Content-Type": "application/x-www-form-urlencoded", "charset": "utf-8"}
MB = 1024 * 1024


class Hand:
    """What a real worker would get from the agent, used by the test in its place."""

    def __init__(self, env: dict[str, str]) -> None:
        self.id = env["RUNPOD_POD_ID"]
        self.key = env["RUNPOD_AI_API_KEY"]
        self.take_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", self.id)
        self.base = self.take_url.split("/v2/")[0]
        self.endpoint_id = self.take_url.split("/v2/")[1].split("/")[0]
        self.auth = {"Authorization": self.key}

    def url(self, kind: str, job_id: str | None = None, worker_id: str | None = None,
            endpoint_id: str | None = None) -> str:
        parts = [self.base, "v2", endpoint_id or self.endpoint_id, kind, worker_id or self.id]
        if job_id is not None:
            parts.append(job_id)
        return "/".join(parts) + "?gpu=X"

    def take(self, http: httpx.Client) -> dict:
        def one() -> dict | None:
            resp = http.get(self.take_url, headers=self.auth)
            assert resp.status_code in (200, 204), resp.text
            return resp.json() if resp.status_code == 200 else None

        return wait_until(one, timeout_s=30, interval_s=0, what=f"a job for worker {self.id}")

    def done(self, http: httpx.Client, job_id: str, body: bytes, headers: dict | None = None) -> httpx.Response:
        return http.post(self.url("job-done", job_id) + "&isStream=false", content=body,
                         headers={**FORM, **self.auth, **(headers or {})})


@pytest.fixture(scope="module")
def setup(fuzz_cluster, tmp_path_factory):
    dump = tmp_path_factory.mktemp("hands")
    ep = fuzz_cluster.create_endpoint(
        name="hands", command=python_command("tests/fuzz/hand_worker.py"), env={"DUMP_DIR": str(dump)},
        workersMin=2, workersMax=2, flashboot=False)
    files = wait_until(lambda: (fs := sorted(Path(dump).glob("*.json"))) and len(fs) >= 2 and fs,
                       timeout_s=60, what="two placeholder workers")
    hands = [Hand(json.loads(f.read_text())) for f in files[:2]]
    with httpx.Client(timeout=60) as http:
        yield fuzz_cluster, ep, hands[0], hands[1], http


def _submit(cluster, ep: str, payload: object) -> str:
    with cluster.client() as gw:
        resp = gw.post(f"/v2/{ep}/run", json={"input": payload})
        assert resp.status_code == 200, resp.text
        return resp.json()["id"]


def _status(cluster, ep: str, job_id: str) -> dict:
    with cluster.client() as gw:
        return gw.get(f"/v2/{ep}/status/{job_id}").json()


def _refused(resp: httpx.Response, status: int, *words: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    message = resp.json()["error"]
    for word in words:
        assert word in message, (word, message)


def test_tokens_wrong_missing_or_someone_elses_are_401_and_a_foreign_endpoint_is_403(setup):
    cluster, ep, a, b, http = setup
    calls = [("GET", a.url("job-take")), ("GET", a.url("job-take-batch") + "&batch_size=2"),
             ("GET", a.url("job-stop")), ("GET", a.url("ping")),
             ("POST", a.url("job-done", "j1")), ("POST", a.url("job-stream", "j1"))]
    for method, url in calls:
        _refused(http.request(method, url, content=b"{}"), 401, "missing Authorization")
        _refused(http.request(method, url, content=b"{}", headers={"Authorization": "nope"}), 401, "bad key")
        _refused(http.request(method, url, content=b"{}", headers=b.auth), 401, "bad key")
        _refused(http.request(method, url, content=b"{}", headers={"Authorization": "Bearer"}), 401)
    _refused(http.get(a.url("job-take", worker_id="nosuchworker"), headers=a.auth), 401, "unknown worker")
    _refused(http.get(a.url("job-take", endpoint_id="otherendpoint"), headers=a.auth), 403, "endpoint")
    # The right key, with RunPod's Bearer prefix too, is accepted.
    assert http.get(a.url("job-take"), headers={"Authorization": f"Bearer {a.key}"}).status_code == 204


def test_unknown_paths_methods_and_odd_ids_answer_json(setup):
    cluster, ep, a, b, http = setup
    _refused(http.get(a.url("job-done", "j1"), headers=a.auth), 405, "method")
    _refused(http.get(f"{a.base}/v2/{ep}/nonsense/{a.id}", headers=a.auth), 404, "worker API path")
    _refused(http.get(f"{a.base}/", headers=a.auth), 404, "worker API path")
    odd = ["..", "%2e%2e", "..%2F..%2Fetc%2Fpasswd", "a%20b", "x" * 5000, "%C3%BC%C3%B1", "j%00", "%2F", "*", ">"]
    for job_id in odd:
        resp = http.post(a.url("job-done", job_id), content=b'{"output": 1}', headers=a.auth)
        assert resp.status_code in (404, 405), (job_id, resp.status_code, resp.text)
        assert resp.json()["error"]
    for worker_id in ("..", "..%2F" + a.id, "%2e%2e%2f"):
        resp = http.get(a.url("job-take", worker_id=worker_id), headers=a.auth)
        assert resp.status_code in (401, 404), (worker_id, resp.status_code, resp.text)
        assert resp.json()["error"]
    _refused(http.get(a.url("job-take-batch") + "&batch_size=lots", headers=a.auth), 400, "batch_size")
    for size in ("-5", "0", "10" * 20):  # clamped to 1..256: nothing queued, so 204
        assert http.get(a.url("job-take-batch") + f"&batch_size={size}", headers=a.auth).status_code == 204
    # Pings with odd parameters are recorded, not refused.
    ping = http.get(a.url("ping") + "&job_id=" + ",,../..," + "y" * 10_000 + "&status=weird&reason=%00",
                    headers=a.auth)
    assert ping.status_code == 200


def test_garbage_replays_and_strangers_never_touch_the_jobs_held(setup):
    cluster, ep, a, b, http = setup
    j1 = _submit(cluster, ep, {"n": 1})
    assert a.take(http)["id"] == j1
    j2 = _submit(cluster, ep, {"n": 2})
    assert b.take(http)["id"] == j2

    garbage = [b"", b"not json", b"[1, 2]", b'"a string"', b"null", b"42", b'{"output":', b'{"stopPod": "yes"}',
               b'{"status": 5}', b"\xff\xfe\x00", b'{"output": 1} trailing', b"[" * 100_000,
               b'{"output": "\xff"}', b"{'output': 1}"]
    for body in garbage:
        _refused(a.done(http, j1, body), 400, "JSON object")
        if not body.startswith(b'{"s'):  # any JSON object is a chunk
            _refused(http.post(a.url("job-stream", j1), content=body, headers=a.auth), 400, "JSON object")
    # Someone else's job, an unknown one: 404, and nothing changes.
    _refused(b.done(http, j1, b'{"output": "not mine"}'), 404, "not held")
    _refused(http.post(b.url("job-stream", j1), content=b'{"output": "x"}', headers=b.auth), 404, "not held")
    _refused(a.done(http, "nosuchjob-r1", b'{"output": 1}'), 404, "not held")
    # A progress update for a job the worker does not hold is ignored (late ones are normal).
    assert a.done(http, j2, b'{"status": "IN_PROGRESS", "output": "hijack"}').status_code == 200
    assert _status(cluster, ep, j1)["status"] == "IN_PROGRESS"
    assert "output" not in _status(cluster, ep, j2)

    # The real result, whatever the content type says.
    ok = a.done(http, j1, b'{"output": {"n": 1}}', headers={"Content-Type": "text/plain"})
    assert ok.status_code == 200, ok.text
    # Replayed (the same or another body), or a chunk after the end: 404, the result stays.
    _refused(a.done(http, j1, b'{"output": {"n": 1}}'), 404, "not held")
    _refused(a.done(http, j1, b'{"output": "changed"}'), 404, "not held")
    _refused(http.post(a.url("job-stream", j1), content=b'{"output": 9}', headers=a.auth), 404, "not held")
    _refused(b.done(http, j1, b'{"error": "late"}'), 404, "not held")
    done = _status(cluster, ep, j1)
    assert done["status"] == "COMPLETED" and done["output"] == {"n": 1} and done["workerId"] == a.id, done

    assert b.done(http, j2, b'{"output": {"n": 2}}', headers={"Content-Type": "application/octet-stream"}
                  ).status_code == 200
    done = _status(cluster, ep, j2)
    assert done["status"] == "COMPLETED" and done["output"] == {"n": 2} and done["workerId"] == b.id, done


def test_huge_bodies_are_413_and_a_refused_result_fails_its_job(setup):
    cluster, ep, a, b, http = setup
    j3 = _submit(cluster, ep, {"n": 3})
    assert a.take(http)["id"] == j3
    big_chunk = b'{"output": "' + b"x" * MAX_PAYLOAD + b'"}'
    _refused(http.post(a.url("job-stream", j3), content=big_chunk, headers=a.auth), 413, "1 MB")

    def chunked(n_bytes: int):  # no Content-Length: the limit holds on the bytes actually sent
        yield b'{"output": "'
        for _ in range(n_bytes // MB):
            yield b"y" * MB
        yield b'"}'

    _refused(http.post(a.url("job-stream", j3), content=chunked(2 * MB), headers=a.auth), 413, "1 MB")
    # A chunk within the limit is still stored.
    assert http.post(a.url("job-stream", j3), content=b'{"output": "small"}', headers=a.auth).status_code == 200
    _refused(a.done(http, j3, b'{"output": "' + b"z" * (20 * MB) + b'"}'), 413, "20 MB")
    failed = _status(cluster, ep, j3)
    assert failed["status"] == "FAILED" and "20 MB" in failed["error"], failed
    with cluster.client() as gw:
        assert gw.get(f"/v2/{ep}/stream/{j3}").json()["stream"] == [{"output": "small"}]

    # Another job on the same worker after all that: taken and finished as usual.
    j4 = _submit(cluster, ep, {"n": 4})
    assert a.take(http)["id"] == j4
    _refused(a.done(http, j4, b'{"output": "' + b"z" * (21 * MB) + b'"}', ), 413, "20 MB")
    j5 = _submit(cluster, ep, {"n": 5})
    assert b.take(http)["id"] == j5
    assert b.done(http, j5, b'{"output": 5}').status_code == 200
    assert _status(cluster, ep, j5) ["output"] == 5
    assert cluster.dead() == []

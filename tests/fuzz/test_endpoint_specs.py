"""Absurd endpoint specs through the management API of a real gateway.

Refused (400, the field named): out-of-range or wrong-type numbers, workersMin > workersMax,
bad scaler types/values, empty or control-character names, envs and commands a process
cannot be started with (NUL, '=' in a name, over 64 KiB), silly GPU type lists; bodies
over 1 MB are 413. Accepted and shown as unplaceable (`/health` `placement.reason` and
`workers.throttled`): an unknown GPU type and more GPUs than any node has, since nodes
with them may join later (RunPod accepts such endpoints too and shows them throttled).
Nothing crashes: the gateway answers throughout and the other endpoints keep working.
"""

from __future__ import annotations

import pytest

from runplane_testing.cluster import python_command
from runplane_testing.waiting import wait_until

pytestmark = pytest.mark.fuzz

BASE = {"name": "absurd", "command": ["true"], "workersMin": 0, "workersMax": 0}
WEEK_MS = 7 * 86_400_000

REFUSED = [
    # (changes to BASE, the field the message must name)
    ({"workersMin": -1}, "workersMin"),
    ({"workersMax": -1}, "workersMax"),
    ({"workersMin": 5, "workersMax": 2}, "workersMin"),
    ({"workersMax": 10_001}, "workersMax"),
    ({"workersMax": 10**30}, "workersMax"),
    ({"workersMax": "3"}, "workersMax"),
    ({"workersMax": 2.5}, "workersMax"),
    ({"workersMax": True}, "workersMax"),
    ({"workersMax": None}, "workersMax"),
    ({"workersMin": [1]}, "workersMin"),
    ({"gpuCount": -1}, "gpuCount"),
    ({"gpuCount": 65}, "gpuCount"),
    ({"gpuCount": 10**12}, "gpuCount"),
    ({"idleTimeout": 0}, "idleTimeout"),
    ({"idleTimeout": -5}, "idleTimeout"),
    ({"idleTimeout": 3601}, "idleTimeout"),
    ({"executionTimeoutMs": 0}, "executionTimeoutMs"),
    ({"executionTimeoutMs": 4_999}, "executionTimeoutMs"),
    ({"executionTimeoutMs": WEEK_MS + 1}, "executionTimeoutMs"),
    ({"executionTimeoutMs": -1}, "executionTimeoutMs"),
    ({"scalerType": "FAST"}, "scalerType"),
    ({"scalerType": ""}, "scalerType"),
    ({"scalerType": 1}, "scalerType"),
    ({"scalerType": None}, "scalerType"),
    ({"scalerValue": 0}, "scalerValue"),
    ({"scalerValue": -3}, "scalerValue"),
    ({"scalerValue": 10**7}, "scalerValue"),
    ({"scalerValue": "4"}, "scalerValue"),
    ({"name": ""}, "name"),
    ({"name": "x" * 257}, "name"),
    ({"name": 5}, "name"),
    ({"name": None}, "name"),
    ({"name": "line\nbreak"}, "name"),
    ({"name": "nul\x00"}, "name"),
    ({"env": {"A": 5}}, "env"),
    ({"env": ["A=1"]}, "env"),
    ({"env": {"": "x"}}, "env"),
    ({"env": {"A=B": "x"}}, "env"),
    ({"env": {"A\x00": "x"}}, "env"),
    ({"env": {"A": "x\x00y"}}, "env"),
    ({"env": {"BIG": "v" * (64 * 1024)}}, "env"),
    ({"env": {f"K{i}": "v" * 100 for i in range(1000)}}, "env"),
    ({"command": "true"}, "command"),
    ({"command": [1, 2]}, "command"),
    ({"command": ["", "x"]}, "command"),
    ({"command": ["true", "a\x00b"]}, "command"),
    ({"command": ["true"] + ["a" * 1000] * 100}, "command"),
    ({"command": [], "imageName": None}, "command"),
    ({"imageName": "   ", "command": []}, "imageName"),
    ({"imageName": "has space:latest"}, "imageName"),
    ({"imageName": "i" * 600}, "imageName"),
    ({"gpuTypeIds": "H100"}, "gpuTypeIds"),
    ({"gpuTypeIds": [""]}, "gpuTypeIds"),
    ({"gpuTypeIds": ["H100"] * 17}, "gpuTypeIds"),
    ({"gpuTypeIds": [None]}, "gpuTypeIds"),
    ({"flashboot": "yes"}, "flashboot"),
    ({"workersMinimum": 1}, "workersMinimum"),
]


def _names(message: str, field: str) -> bool:
    return field in message


@pytest.fixture(scope="module")
def http(fuzz_cluster):
    with fuzz_cluster.client() as client:
        yield client


@pytest.mark.parametrize("changes,field", REFUSED, ids=[f"{f}-{i}" for i, (_, f) in enumerate(REFUSED)])
def test_absurd_spec_is_refused_naming_the_field(http, changes, field):
    body = {**BASE, **changes}
    resp = http.post("/v1/endpoints", json=body)
    assert resp.status_code == 400, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    assert _names(resp.json()["error"], field), resp.json()


def test_the_same_values_are_refused_by_patch(http):
    ep = http.post("/v1/endpoints", json=BASE).json()["id"]
    for changes, field in REFUSED:
        if "workersMinimum" in changes or "name" in changes and changes["name"] is None:
            continue
        resp = http.patch(f"/v1/endpoints/{ep}", json=changes)
        assert resp.status_code == 400, (changes, resp.status_code, resp.text)
        assert field in resp.json()["error"], (changes, resp.json())
    # A PATCH that would leave workersMin above the stored workersMax.
    resp = http.patch(f"/v1/endpoints/{ep}", json={"workersMin": 1})
    assert resp.status_code == 400 and "workersMin" in resp.json()["error"]
    # Nothing of all that was stored.
    assert http.get(f"/v1/endpoints/{ep}").json()["workersMax"] == 0


def test_bodies_that_are_not_a_spec(http):
    for body, status, words in [
        (b"", 400, "JSON"), (b"{", 400, "JSON"), (b"[]", 400, "object"), (b"null", 400, "object"),
        (b'"name"', 400, "object"), (b"[" * 100_000, 400, "JSON"), (b"\xff\xfe", 400, "JSON"),
        (b'{"name": "a", "command": ["true"], "env": {"X": "' + b"y" * (1024 * 1024) + b'"}}', 413, "limit"),
    ]:
        resp = http.post("/v1/endpoints", content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == status, (body[:40], resp.status_code, resp.text)
        assert all(w in resp.json()["error"] for w in words.split()), resp.json()


def test_odd_but_harmless_values_are_kept_as_given(http):
    body = {**BASE, "name": "ünïcödé ✓ <script>alert(1)</script> ../../etc", "workersMax": 10_000,
            "env": {"WITH.DOTS-AND-DASHES": "=value=with=equals", "EMPTY": ""},
            "gpuTypeIds": ["NVIDIA H100 80GB HBM3", "A100"], "idleTimeout": 3600,
            "executionTimeoutMs": WEEK_MS, "scalerValue": 1_000_000}
    resp = http.post("/v1/endpoints", json=body)
    assert resp.status_code == 201, resp.text
    stored = http.get(f"/v1/endpoints/{resp.json()['id']}").json()
    # env values are answered masked (secrets); their names are kept as given.
    assert {k: stored[k] for k in body if k != "env"} == {k: v for k, v in body.items() if k != "env"}
    assert stored["env"] == {name: "***" for name in body["env"]}


def test_unplaceable_gpu_specs_are_accepted_and_shown_throttled(fuzz_cluster, http):
    unknown = http.post("/v1/endpoints", json={**BASE, "name": "no such gpu", "workersMin": 1, "workersMax": 1,
                                               "gpuCount": 1, "gpuTypeIds": ["Z9000"]})
    too_many = http.post("/v1/endpoints", json={**BASE, "name": "64 gpus", "workersMin": 1, "workersMax": 1,
                                                "gpuCount": 64})
    assert unknown.status_code == 201 and too_many.status_code == 201, (unknown.text, too_many.text)

    def throttled(ep: str, words: tuple[str, ...]):
        health = http.get(f"/v2/{ep}/health").json()
        placement = health.get("placement")
        ok = placement and health["workers"]["throttled"] == 1 and all(w in placement["reason"] for w in words)
        return health if ok else None

    health = wait_until(lambda: throttled(unknown.json()["id"], ("Z9000", "no GPUs")), timeout_s=30,
                        what="the unknown GPU type shown as unplaceable")
    assert health["workers"]["idle"] == 0
    wait_until(lambda: throttled(too_many.json()["id"], ("64 free GPU",)), timeout_s=30,
               what="64 GPUs shown as unplaceable")
    # A job waits (it is not lost, nor failed): it runs once such a node joins, or expires by its TTL.
    job = http.post(f"/v2/{unknown.json()['id']}/run", json={"input": {}}).json()
    assert http.get(f"/v2/{unknown.json()['id']}/status/{job['id']}").json()["status"] == "IN_QUEUE"


def test_other_endpoints_keep_working_after_all_that(fuzz_cluster, http):
    ep = fuzz_cluster.create_endpoint(name="still fine", command=python_command("examples/fast/handler.py"),
                                      workersMin=1, workersMax=1)
    resp = http.post(f"/v2/{ep}/runsync?wait=60000", json={"input": {"ok": True}})
    assert resp.json()["status"] == "COMPLETED" and resp.json()["output"] == {"ok": True}, resp.text
    assert fuzz_cluster.dead() == []

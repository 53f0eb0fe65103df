"""Bad input through the real gateway: each gets its status code and a message naming the problem."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def ep(cluster):
    return cluster.create_endpoint(name="errors", command=["true"], workersMin=0, workersMax=0)


def test_wrong_or_missing_key_is_401(cluster, ep):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "nope"}):
        resp = httpx.post(f"{cluster.gateway_url}/v2/{ep}/run", json={"input": {}}, headers=headers)
        assert resp.status_code == 401
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json()["error"]


def test_bare_key_is_accepted(cluster, ep):
    resp = httpx.post(f"{cluster.gateway_url}/v2/{ep}/run", json={"input": {"a": 1}},
                      headers={"Authorization": cluster.api_key})
    assert resp.status_code == 200 and resp.json()["status"] == "IN_QUEUE"


def test_bad_json_missing_input_and_unknown_endpoint(cluster, ep):
    with cluster.client() as http:
        resp = http.post(f"/v2/{ep}/run", content=b"{not json")
        assert resp.status_code == 400 and "JSON" in resp.json()["error"]
        resp = http.post(f"/v2/{ep}/run", json={"inputs": {}})
        assert resp.status_code == 400 and "input" in resp.json()["error"]
        resp = http.post("/v2/doesnotexist/run", json={"input": {}})
        assert resp.status_code == 404 and "doesnotexist" in resp.json()["error"]
        resp = http.get(f"/v2/{ep}/status/nope-r1")
        assert resp.status_code == 404


def test_oversized_bodies_are_413(cluster, ep):
    big = b'{"input":"' + b"x" * (10 * 1024 * 1024 + 10) + b'"}'
    with cluster.client() as http:
        resp = http.post(f"/v2/{ep}/run", content=big)
        assert resp.status_code == 413 and "10" in resp.json()["error"]
        # runsync allows 20 MB: the same body is accepted there (answered once the wait runs out)
        resp = http.post(f"/v2/{ep}/runsync?wait=1000", content=big)
        assert resp.status_code == 200 and resp.json()["status"] == "IN_QUEUE"


def test_invalid_endpoint_specs_name_the_field(cluster):
    with cluster.client() as http:
        resp = http.post("/v1/endpoints", json={"name": "x", "command": ["true"], "workersMin": 5, "workersMax": 2})
        assert resp.status_code == 400 and "workersMin" in resp.json()["error"]
        resp = http.post("/v1/endpoints", json={"name": "x", "command": ["true"], "scalerType": "FAST"})
        assert resp.status_code == 400 and "scalerType" in resp.json()["error"]
        assert http.get("/v1/endpoints/nope").status_code == 404

"""API keys and secrets end to end, every service a process: `runplane keys` makes a key
scoped to one endpoint, RunPod's own client uses it there and is refused elsewhere, the
revoked key is refused; an endpoint's secret env value reaches its worker but never an
answer of the API or the CLI."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

from runplane_testing.cluster import ROOT, python_command
from tests.system.test_cli import RUNPLANE, as_json, cli_env, runplane

pytestmark = pytest.mark.system

SECRET = "hf_system_test_secret_0123456789"


@pytest.fixture(scope="module")
def endpoints(cluster) -> tuple[str, str]:
    env_ep = cluster.create_endpoint(name="env-worker", env={"HF_TOKEN": SECRET, "MODE": "x"},
                                     command=python_command("tests/fixtures/workers/env_handler.py"),
                                     workersMin=1, workersMax=1)
    other = cluster.create_endpoint(name="other", command=["true"], workersMin=0, workersMax=1)
    cluster.wait_workers(env_ep, 1)
    return env_ep, other


def test_a_secret_env_value_reaches_the_worker_but_no_answer(cluster, endpoints):
    env_ep, _ = endpoints
    with cluster.client() as http:
        out = http.post(f"/v2/{env_ep}/runsync", json={"input": {"env": ["HF_TOKEN", "MODE"]}}).json()
        assert out["status"] == "COMPLETED" and out["output"] == {"HF_TOKEN": SECRET, "MODE": "x"}
        answers = [http.get(f"/v1/endpoints/{env_ep}").text, http.get("/v1/endpoints").text]
    assert as_json(cluster, "endpoint", "get", "env-worker")["env"] == {"HF_TOKEN": "***", "MODE": "***"}
    answers += [runplane(cluster, "endpoint", "get", "env-worker").stdout,
                runplane(cluster, "endpoint", "list", "--json").stdout]
    assert not [a for a in answers if SECRET in a]


def test_a_scoped_key_from_the_cli_works_for_its_endpoint_only_until_revoked(cluster, endpoints):
    import runpod

    env_ep, other = endpoints
    made = as_json(cluster, "keys", "create", "ci", "--endpoint", "env-worker")
    assert made["scope"] == "endpoint" and made["endpoints"] == [env_ep] and made["key"].startswith("rpk_")
    listed = runplane(cluster, "keys", "list").stdout
    random_part = made["key"][len(made["prefix"]) + 1:]
    assert made["id"] in listed and random_part not in listed

    runpod.api_key = made["key"]
    runpod.endpoint_url_base = f"{cluster.gateway_url}/v2"
    assert runpod.Endpoint(env_ep).run_sync({"env": ["MODE"]}, timeout=60) == {"MODE": "x"}
    with pytest.raises(requests.HTTPError) as refused:
        runpod.Endpoint(other).run({"x": 1})
    assert refused.value.response.status_code == 403 and other in refused.value.response.json()["error"]

    # The CLI with the scoped key: its endpoint by name, nothing of the others, no key management.
    scoped = dict(cli_env(cluster), RP_API_KEY=made["key"])
    assert [ep["id"] for ep in as_json_with(scoped, "endpoint", "list")] == [env_ep]
    denied = runplane_with(scoped, "keys", "list", ok=False)
    assert denied.returncode == 1 and "HTTP 403" in denied.stderr

    runplane(cluster, "keys", "revoke", made["id"])
    with pytest.raises(RuntimeError):  # the runpod client's answer to a 401
        runpod.Endpoint(env_ep).run_sync({"env": ["MODE"]}, timeout=10)
    assert made["id"] not in [k["id"] for k in as_json(cluster, "keys", "list")]


def runplane_with(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([RUNPLANE, *args], env=env, capture_output=True, text=True, timeout=90, cwd=ROOT)
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def as_json_with(env: dict[str, str], *args: str) -> object:
    return json.loads(runplane_with(env, *args, "--json").stdout)
